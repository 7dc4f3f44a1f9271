"""The engine and its drivers: `core` turns input batches into outcome batches (no files, no store, no
signals); `runner` drives it locally (job folder, SQLite store, part files; `interrupt` for Ctrl-C);
`estimate` is the dry run; `progress` the bar."""
