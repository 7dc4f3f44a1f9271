"""Loading a config: read the YAML, apply --set overrides, validate once, explain errors by dotted key
(with a did-you-mean hint) and file, resolve relative paths against the config file's folder."""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ValidationError

from .. import yaml_loader
from ..common import redact
from ..errors import ConfigError
from . import secrets
from .job import Config
from .templates import check_prompt

MINUTES_A_DAY = 24 * 60


def load_config(
    source: str | Path | dict[str, Any] | Config,
    overrides: list[str] | dict[str, Any] | None = None,
) -> Config:
    """Read, override and validate a config once. Raises ConfigError naming the key and file."""
    if isinstance(source, Config):
        if not overrides:
            return source
        raw, base, name = source.model_dump(by_alias=True, exclude={"source"}), Path.cwd(), source.source
    elif isinstance(source, dict):
        raw, base, name = _deep_copy(source), Path.cwd(), "<dict>"
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise ConfigError("config file not found (give the path to a .yaml file)", file=name)
        try:
            raw = yaml_loader.load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"not valid YAML: {exc}", file=name) from None
        if not isinstance(raw, dict):
            raise ConfigError("the config must be a mapping of sections (input, endpoint, prompt, ...)", file=name)
        base = path.resolve().parent
    for key, value in _normalise_overrides(overrides).items():
        _set_dotted(raw, key, value, name)
    yaml_loader.check_shape(raw, name)  # before validation and the fingerprint walk it recursively
    secrets.resolve(raw, name)  # !env / !secret values, registered with the scrubber before any message
    try:
        cfg = Config.model_validate({**raw, "source": name})
    except ValidationError as exc:
        raise ConfigError(_explain(exc, raw), file=name) from None
    secrets.register_defaults(raw)  # a webhook URL, storage credentials: secret however they were given
    _resolve_paths(cfg, base)
    _check_budget_price(cfg)
    check_prompt(cfg.prompt, name)  # compiled before any input is read or anything is sent
    _check_batch_mode(cfg)
    _check_packs(cfg)
    _check_ray_workers(cfg)
    _check_rates(cfg)
    _check_quality(cfg)
    return cfg


def _check_quality(cfg: Config) -> None:
    """A cascade needs a confidence to route by. Its stages and the audit run in either mode on the local
    engine (batch mode in rounds, batch/rounds.py) and on Ray in sync mode (each worker runs them per shard;
    Ray has no batch mode)."""
    q, stages, src = cfg.quality, cfg.cascade, cfg.source
    if stages is not None:
        if len(stages) < 2:
            raise ConfigError("a cascade needs at least two stages (one model alone: set endpoint.model)",
                              key="cascade", file=src)
        for i, stage in enumerate(stages[:-1]):
            if stage.min_confidence is None:
                raise ConfigError("every stage but the last needs min_confidence (rows under it go on to the "
                                  "next stage)", key=f"cascade.{i}.min_confidence", file=src)
        if stages[-1].min_confidence is not None:
            raise ConfigError("the last stage always decides; remove its min_confidence",
                              key=f"cascade.{len(stages) - 1}.min_confidence", file=src)
        if q.confidence == "off":
            raise ConfigError("a cascade routes rows by their confidence: set quality.confidence to logprobs or "
                              "votes", key="quality.confidence", file=src)
    if q.confidence == "logprobs" and cfg.structured is not None and cfg.structured.mode == "tool":
        q.fall_back_to_votes("structured.mode: tool answers in tool-call arguments, which carry no logprobs")
    if q.confidence == "logprobs" and cfg.params.logprobs is False:
        raise ConfigError("quality.confidence: logprobs needs the answer's logprobs; remove params.logprobs: false",
                          key="params.logprobs", file=src)
    if cfg.params.top_logprobs is not None and not cfg.params.logprobs and q.confidence != "logprobs":
        # quality.confidence: logprobs asks for the logprobs itself, at the top_logprobs given here
        raise ConfigError("top_logprobs requires params.logprobs: true (or quality.confidence: logprobs)",
                          key="params.top_logprobs", file=src)
    if q.confidence == "votes":
        if "n" in cfg.params.extra or "n" in cfg.params.from_columns:
            raise ConfigError("quality.confidence: votes sets n (quality.votes); remove it from params",
                              key="params.extra.n", file=src)


def day_note(cfg: Config, rows: int) -> str | None:
    """What to say before sending when the input's rows cannot all be sent within a day under
    limits.requests_per_minute (said, not refused: a resumed job may need only a few of them)."""
    rpm = cfg.limits.requests_per_minute
    if rpm is None or rows / rpm <= MINUTES_A_DAY:
        return None
    return (f"limits.requests_per_minute={rpm:g}: the input's {rows:,} rows need up to "
            f"{rows / rpm / MINUTES_A_DAY:,.1f} "
            "days to send, so the job cannot finish within a day; raise the limit, or let it run over several days "
            "(every run resumes)")


def _check_rates(cfg: Config) -> None:
    """Limits under which nothing could ever be sent are said now, not as a hang or a failure per row."""
    lim = cfg.limits
    if lim.requests_per_minute is not None and lim.requests_per_minute * MINUTES_A_DAY < 1:
        raise ConfigError(f"{lim.requests_per_minute:g} requests a minute is less than one a day: the job could "
                          "not finish; give requests a minute (e.g. 60), or null for no limit",
                          key="limits.requests_per_minute", file=cfg.source)
    least = cfg.params.max_tokens  # every request reserves its max_tokens plus its prompt's tokens
    if lim.tokens_per_minute is not None and least is not None and lim.tokens_per_minute <= least:
        raise ConfigError(f"{lim.tokens_per_minute:g} tokens a minute is less than any request needs (params."
                          f"max_tokens {least} plus the prompt): no request could be sent; raise it, or lower "
                          "params.max_tokens", key="limits.tokens_per_minute", file=cfg.source)


def _check_ray_workers(cfg: Config) -> None:
    """Each Ray worker holds at least one concurrency slot: more workers than slots would exceed the limit."""
    if cfg.run.engine == "ray" and cfg.run.workers > cfg.limits.max_concurrency:
        raise ConfigError(f"run.workers={cfg.run.workers} is more than limits.max_concurrency="
                          f"{cfg.limits.max_concurrency}, which the workers share; lower run.workers or raise "
                          "limits.max_concurrency", key="run.workers", file=cfg.source)


def _check_batch_mode(cfg: Config) -> None:
    """A Batch API line is answered whole, never streamed; batch mode is a mode of the local engine."""
    if cfg.run.mode == "batch" and cfg.run.engine != "local":
        raise ConfigError("run.mode: batch runs on run.engine: local (the provider does the work; the local "
                          "driver only writes files and polls)", key="run.engine", file=cfg.source)
    if cfg.run.mode == "batch" and cfg.params.stream:
        raise ConfigError("run.mode: batch cannot stream answers; remove params.stream (or use run.mode: sync)",
                          key="params.stream", file=cfg.source)


def _check_packs(cfg: Config) -> None:
    """Several rows per request are split back by id from a structured answer; what cannot be packed is refused."""
    k = cfg.prompt.rows_per_request
    if k == 1:
        return
    why = None
    if cfg.structured is None:
        why = ("needs structured.schema: a pack's answer is split back into rows by id from JSON", "structured.schema")
    elif cfg.prompt.images:
        why = ("cannot pack rows with images (prompt.images): an image part cannot be tied to its row in a shared "
               "message; label images one by one (rows_per_request: 1)", "prompt.images")
    elif cfg.prompt.messages_column:
        why = ("cannot pack rows whose whole conversation comes from prompt.messages_column: nothing is shared; "
               "use prompt.system and prompt.user", "prompt.messages_column")
    if why is not None:
        raise ConfigError(f"prompt.rows_per_request: {k} {why[0]}", key=why[1], file=cfg.source)


def _check_budget_price(cfg: Config) -> None:
    """A budget is only enforceable when the worst case of a request in flight can be priced."""
    if cfg.budget.max_cost_usd is None:
        return
    from ..models.prices import (  # the library loads only when a budget is set
        find_price,
        missing_price_hint,
    )

    models = [cfg.endpoint.model, *(cfg.params.models or [])]
    models += [stage.model for stage in cfg.cascade or ()]
    models += [cfg.quality.audit.model] if cfg.quality.audit else []
    for model in dict.fromkeys(models):
        if find_price(cfg, model) is None:
            raise ConfigError(f"needs a price for {model!r} to count requests in flight at their maximum cost; "
                              + missing_price_hint(model), key="budget.max_cost_usd", file=cfg.source)


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def _normalise_overrides(overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return overrides
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE with a dotted key (e.g. output.dir=/tmp/x), got {item!r}")
        try:
            out[key.strip()] = yaml_loader.load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            if text.lstrip().startswith(("!env", "!secret")):  # meant as a tag: never sent as a literal
                raise ConfigError(f"--set {key.strip()}: {exc}", key=key.strip()) from None
            out[key.strip()] = text
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any, file: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:  # absent, or an optional section dumped as null (structured: None)
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section", key=key, file=file)
        node = nxt
    node[parts[-1]] = value


def _explain(exc: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        # pydantic puts union member names in the location; they mean nothing to a user.
        loc = [p for p in loc if p not in {"str", "list[str]", "dict[str,any]"} and not p.startswith("literal[")]
        dotted = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            hint = _did_you_mean(loc)
            lines.append(f"{dotted}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{dotted}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            # Header values may be credentials: never echo them into a message.
            # A secret value (config/secrets.py) is masked before it is shortened, so no part of it shows.
            quoted = not dotted.startswith("endpoint.headers") and secrets.shown_in_errors(dotted)
            got = f" (got {_short(redact.scrub_any(err.get('input')))})" if quoted else ""
            lines.append(f"{dotted}: {msg}{got}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _did_you_mean(loc: list[str]) -> str:
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return ""
        ann = field.annotation
        inner = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return ""
        model = inner[0]
    names = []
    for fname, f in model.model_fields.items():
        if fname == "source":
            continue
        names.append(f.alias or fname)
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known keys: {', '.join(sorted(names))}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _resolve_paths(cfg: Config, base: Path) -> None:
    def resolve(p: str) -> str:
        expanded = os.path.expanduser(p)
        return os.path.normpath(expanded if os.path.isabs(expanded) else str(base / expanded))

    if "://" not in cfg.input.path:  # object-store URIs are absolute already
        cfg.input.path = resolve(cfg.input.path)
    if "://" not in cfg.output.dir:
        cfg.output.dir = resolve(cfg.output.dir)
    if cfg.output.metrics_file:
        cfg.output.metrics_file = resolve(cfg.output.metrics_file)
    if cfg.cache.dir:
        cfg.cache.dir = resolve(cfg.cache.dir)
    cfg.prompt.image_roots = [resolve(r) for r in cfg.prompt.image_roots]
    if cfg.structured and isinstance(cfg.structured.schema_, str):
        # Load the file now so the job fingerprint covers the schema's content, not its path.
        path = Path(resolve(cfg.structured.schema_))
        try:
            loaded = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"schema file {path} not found", key="structured.schema", file=cfg.source) from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a folder; give the path to a JSON Schema file (.json)",
                              key="structured.schema", file=cfg.source) from None
        except OSError as exc:
            raise ConfigError(f"cannot read schema file {path}: {exc.strerror or exc}", key="structured.schema",
                              file=cfg.source) from None
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"schema file {path} is not valid JSON: {exc}", key="structured.schema",
                              file=cfg.source) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"schema file {path} must hold a JSON object", key="structured.schema", file=cfg.source)
        yaml_loader.check_shape(loaded, cfg.source, "structured.schema")
        cfg.structured.schema_ = loaded
