"""The drivers around the core (pipeline/core/): `runner` drives it locally (job folder, SQLite store,
part files), `api` is the synchronous `pipeline.run()` over it, `ray/` runs it on Ray actors, `estimate*`
is the dry run and `savings` what it could save."""
