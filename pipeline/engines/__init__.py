"""The drivers that run the stages: the local runner, the dry run and the progress display."""
