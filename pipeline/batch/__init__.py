"""run.mode: batch — the job through the provider's Batch API (OpenAI protocol), with the sync mode's
guarantees: driver (the phases), ledger (intents in the store), files (JSONL on disk), client (the
protocol over the transport seam), collect (result lines -> records through the one classifier),
progress (the bar while waiting), mode (the seam with the local runner)."""
