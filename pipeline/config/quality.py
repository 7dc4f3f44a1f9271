"""Trusting the labels: `quality` (confidence per row, the audit and its gate) and `cascade` (cheap model
first, the uncertain rows to the next stage)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator

from .base import Section

ConfidenceMode = Literal["logprobs", "votes", "off"]
DEFAULT_TOP_LOGPROBS = 5  # enough alternatives for a field's values to show; OpenAI allows 0-20


class AuditConfig(Section):
    """A seeded random share of rows is also answered by a reference model; agreement per field."""

    share: float = Field(..., gt=0, le=1, description="Share of rows audited (0.02: one in fifty).")
    model: str = Field(..., min_length=1, description="The reference model that answers the audited rows.")
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="The gate: exit 4 when a field's 95% lower bound falls under it.")
    seed: int = Field(0, description="Which rows are sampled; the same seed samples the same rows.")


class QualityConfig(Section):
    confidence: ConfidenceMode = Field(
        "off", description="logprobs: from the answer's token probabilities; votes: K samples' agreement.")
    votes: int = Field(5, ge=2, le=20, description="Samples per row with confidence: votes (sent as n).")
    vote_temperature: float = Field(1.0, gt=0, le=2, description="Sampling temperature of the votes.")
    vote_by: Literal["auto", "n", "requests"] = Field(
        "auto", description="n: one request asks for K samples; requests: K requests (seeds seed..seed+K-1), for "
                            "endpoints without n; auto: requests on OpenRouter (it documents no n), else n.")
    audit: AuditConfig | None = None
    _notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("confidence", mode="before")
    @classmethod
    def _off(cls, v: object) -> object:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    def fall_back_to_votes(self, why: str) -> None:
        """logprobs cannot measure this job's answers: sample votes instead, and say so in the summary."""
        self.confidence = "votes"
        self._notes.append(f"quality.confidence: logprobs falls back to votes: {why}")

    def notes(self) -> list[str]:
        return list(self._notes)

    def samples_by_requests(self, base_url: str) -> int:
        """K when votes are K separate requests (else 1: one request, or n samples in one)."""
        if self.confidence != "votes":
            return 1
        by_requests = self.vote_by == "requests" or (self.vote_by == "auto" and "openrouter.ai" in base_url)
        return self.votes if by_requests else 1

    def body_fields(self, params: dict[str, Any], base_url: str) -> dict[str, Any]:
        """What the request body gains to measure confidence (fields the user set are kept as set)."""
        if self.confidence == "logprobs":
            return {"logprobs": True, "top_logprobs": params.get("top_logprobs") or DEFAULT_TOP_LOGPROBS}
        if self.confidence == "votes" and self.samples_by_requests(base_url) > 1:
            return {"temperature": self.vote_temperature}  # each of the K requests carries its own seed
        if self.confidence == "votes":
            return {"n": self.votes, "temperature": self.vote_temperature}
        return {}


class CascadeStage(Section):
    model: str = Field(..., min_length=1)
    min_confidence: float | None = Field(
        None, ge=0, le=1, description="Rows under it (or failing) go to the next stage; the last stage decides.")
