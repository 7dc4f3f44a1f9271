"""Every name a job creates in its output.dir, defined once.

The writers (jobdir, store, output, ops/history, ops/logfile, diagnosis, safefs temp files) take their
names from here, and the reader uses the same list to never read a job's own files back as input when
the input folder is itself output.dir (read/formats.py). A new file in output.dir goes here first.
"""
from __future__ import annotations

import re

LOCK = ".lock"
MANIFEST = "manifest.json"
STORE = "store.sqlite"
PARTS = "parts"
BATCH = "batch"                        # run.mode: batch, the request/answer files of its batches
RESULTS = "results.parquet"
FAILURES = "failures.parquet"
SUMMARY = "summary.json"
HISTORY = "history.jsonl"
LOG = "pipeline.log"
GOLD = "gold.parquet"                  # human labels (`pipeline review import`), kept by --force-new
PREVIOUS_PREFIX = "previous-"          # --force-new moves an old job aside into previous-<time>/
INTERNAL_ERROR_PREFIX = "internal-error-"

# What JobDir creates first: a folder holding one of these beside parts/ is a job's output folder.
MARKERS = (STORE, MANIFEST, LOCK)

_FILES = frozenset({LOCK, MANIFEST, STORE, RESULTS, FAILURES, SUMMARY, HISTORY, LOG, GOLD})
_FILE_RE = re.compile(
    rf"^(?:{re.escape(STORE)}-(?:wal|shm|journal)"          # SQLite's companions
    rf"|{re.escape(LOG)}\.\d+"                               # rotated logs
    rf"|{re.escape(INTERNAL_ERROR_PREFIX)}.*\.txt"           # diagnosis.report_internal
    r"|\..+\.[0-9a-f]{16}\.tmp)$")                           # safefs.temp_name (a killed run's leftovers)


def is_job_file(name: str) -> bool:
    """A file name (no folder) that a job writes directly in its output.dir."""
    return name in _FILES or _FILE_RE.match(name) is not None


def is_job_folder(name: str) -> bool:
    """A folder name (no parent) that a job creates in its output.dir."""
    return name in (PARTS, BATCH) or name.startswith(PREVIOUS_PREFIX)
