"""Reading input: files, globs and folders as streaming Arrow batches with a stable id per row."""
