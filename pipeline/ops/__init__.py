"""Operating a job that runs unattended: run history, pipeline.log, alerts and metrics (ops = operations)."""
