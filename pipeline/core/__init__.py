"""The core of every run, below its drivers: the transformer (rows in, outcome batches out), interrupts,
progress and the one finish path. The local runner, Ray and batch mode drive it (see docs/architecture.md)."""
