"""`pipeline run | check | simulate | status | report | review | show`: a thin layer that parses arguments and
formats a Summary.

Exit codes: 0 every row succeeded; 1 finished with failed rows; 2 bad config, input or usage (nothing
sent); 3 stopped early (run-fatal or budget), resumable; 4 finished but the quality gate failed
(quality.audit.min_agreement: outputs written, output.publish skipped); 70 internal error (a bug; the
traceback is written to a file in output.dir); 75 batches submitted and still running at the provider
(run.mode: batch with --no-wait; run the same command again to collect); 130 interrupted, resumable; 141
the reader of stdout went away (`| head`): ended quietly, as Unix tools do.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any

from .common import diagnosis, redact
from .common.terminal import printable
from .errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, InternalError, PipelineError, UsageError


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="Batch LLM labelling over OpenAI-compatible APIs.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,simulate,status}")

    run = sub.add_parser("run", help="run (or resume) a job", description="Run or resume the job a config describes.")
    run.add_argument("config", help="path to the job's YAML config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value by dotted key, e.g. --set output.dir=/tmp/x (repeatable)")
    run.add_argument("--retry-failed", action="store_true", help="also re-request rows that failed permanently")
    run.add_argument("--force-new", action="store_true",
                     help="the job changed: move the old answers in output.dir aside and start over")
    run.add_argument("--dry-run", action="store_true",
                     help="read and render every request, estimate tokens, cost and time; send nothing")
    run.add_argument("--json", action="store_true",
                     help="with --dry-run: print the estimate as one JSON object on stdout (for scripts and CI)")
    run.add_argument("--compare", action="store_true",
                     help="with --dry-run: the same requests priced and timed under each run mode (sync, flex, batch)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar (for cron); errors still printed")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="mirror pipeline.log (failed attempts, limits learned, pauses, stops) to stderr, with debug")
    run.add_argument("--limit", type=int, metavar="N",
                     help="only the first N input rows (a cheap trial; outputs and resume are those of a job "
                          "over them)")
    run.add_argument("--no-wait", action="store_true",
                     help="run.mode: batch: submit the batches and exit 75; run the same command again to collect")
    run.add_argument("--cancel-batches", action="store_true",
                     help="run.mode: batch: cancel this job's running batches at the provider, then exit")

    sim = sub.add_parser("simulate", help="serve the built-in OpenAI-compatible simulator on 127.0.0.1")
    if argv is None or "simulate" in argv:
        # Only then: the simulator pulls in aiohttp and pydantic, which `pipeline --help` does not need.
        from pipeline_simulator import add_arguments

        add_arguments(sim)

    status = sub.add_parser("status", help="counts, tokens and cost of a job, finished or not, and its last runs")
    status.add_argument("out_dir", metavar="OUT_DIR|CONFIG", help="the job's output.dir, or its config file")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    check = sub.add_parser("check", help="before paying: the key, the endpoint (and its Batch API), and every "
                                         "place the run writes, each checked with a free call or a probe file")
    check.add_argument("config", help="path to the job's YAML config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value by dotted key, as for run (repeatable)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    _add_report_commands(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # every subcommand, whichever module added it
    return parser


def _add_report_commands(sub: Any) -> None:
    report = sub.add_parser("report", help="a self-contained HTML report of one or more runs (compares several)")
    report.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="job output.dir(s); several: a comparison")
    report.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default report.html)")
    report.add_argument("--gold", metavar="COLUMN[=FIELD]",
                        help="score each run against this carried input column (the output field of the same "
                             "name, or the one given after =); without it, the labels `pipeline review import` "
                             "stored beside a job")
    report.add_argument("--by", metavar="COLUMN", help="slice the comparison by this carried input column")
    report.add_argument("--target-precision", type=float, metavar="P",
                        help="with gold and confidences: name the lowest confidence threshold whose auto-accepted "
                             "rows reach this precision (e.g. 0.98)")
    _add_review_commands(sub)
    show = sub.add_parser("show", help="one row's request (key redacted), attempts, raw answer, output and cost")
    show.add_argument("out_dir", help="the job's output.dir")
    show.add_argument("row_id", help="the row's id (input.id_column)")
    show.add_argument("--config", help="the job's config, if the one recorded in the folder has moved")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    rows = sub.add_parser("rows", help="browse a job's rows: id, carried input, output fields or error, cost")
    rows.add_argument("out_dir", help="the job's output.dir")
    rows.add_argument("--failed", action="store_true", help="only the rows in failures.parquet")
    rows.add_argument("--where", metavar="EXPR",
                      help="a SQL condition over the columns, e.g. \"sentiment = 'negative' AND score < 3\"")
    rows.add_argument("-n", type=int, default=20, metavar="N", help="at most N rows (default 20; 0: all)")
    rows.add_argument("--json", action="store_true", help="one JSON object per row and line, values whole")


def _add_review_commands(sub: Any) -> None:
    review = sub.add_parser("review", help="human review of uncertain rows: Label Studio tasks out, gold labels in")
    steps = review.add_subparsers(dest="review_command", required=True, metavar="{export,import}")
    export = steps.add_parser("export", help="the uncertain rows and a random sample as Label Studio tasks and CSV")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the job's output.dir")
    export.add_argument("--below", type=float, metavar="CONFIDENCE",
                        help="every answered row whose confidence is under this (e.g. 0.8)")
    export.add_argument("--sample", type=int, default=0, metavar="N",
                        help="plus N rows drawn at random from the others (an audit of what would pass unreviewed)")
    export.add_argument("--seed", type=int, default=0, help="the random sample's seed (default 0)")
    export.add_argument("-o", "--output", default="tasks.json",
                        help="the tasks file (default tasks.json); the CSV and the labeling config go beside it")
    imp = steps.add_parser("import", help="store reviewers' labels beside the job as gold (used by `report`)")
    imp.add_argument("out_dir", metavar="OUT_DIR", help="the job's output.dir")
    imp.add_argument("annotations", help="Label Studio's export (JSON, JSON-MIN or CSV) or the filled-in CSV")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command == "run" and args.json and not args.dry_run:
        parser.error("--json goes with --dry-run (a run's own figures are in output.dir/summary.json)")
    if args.command == "run" and args.compare and not args.dry_run:
        parser.error("--compare goes with --dry-run: it prices the job under each run mode without sending anything")
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away (`| head`) is a broken pipe handled below
        return code
    except BrokenPipeError:
        return _reader_gone()
    except InternalError as exc:  # a broken invariant of our own: a bug, traceback in a file like any other
        return diagnosis.report_internal(exc, getattr(args, "out_dir", None))
    except PipelineError as exc:
        print(redact.scrub(printable(f"error: {exc}", lines=True)), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the environment failed (say what to do) or a bug (exit 70)
        out_dir = getattr(args, "out_dir", None)
        known = diagnosis.explain(exc, out_dir, getattr(args, "max_concurrency", None))
        if known is None:
            return diagnosis.report_internal(exc, out_dir)
        print(redact.scrub(printable(f"error: {known[0]}", lines=True)), file=sys.stderr)
        return known[1]


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "simulate":
        from pipeline_simulator import serve

        return serve(args)
    if args.command in ("report", "show", "rows"):
        return _report(args)
    if args.command == "review":
        return _review(args)
    if args.command == "check":
        from .ops.check import print_checks, run_checks

        return print_checks(run_checks(args.config, args.overrides), as_json=args.json)
    from .reporting.status import print_status

    return print_status(args.out_dir, as_json=args.json)


def _reader_gone() -> int:
    """stdout's reader went away (`pipeline show OUT ID | head -1`): stop quietly, as Unix tools do; stdout
    now points at /dev/null so the interpreter's last flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # a stream without a file descriptor (a test's StringIO): nothing to flush
        pass
    return EXIT_BROKEN_PIPE


def _report(args: argparse.Namespace) -> int:
    if args.command == "show":
        from .reporting.show import print_story, row_story

        return print_story(row_story(args.out_dir, args.row_id, config=args.config), as_json=args.json)
    if args.command == "rows":
        from .reporting.rows import print_rows, select_rows

        if args.n < 0:
            raise UsageError("-n takes a number of rows, 0 for all")
        return print_rows(select_rows(args.out_dir, failed=args.failed, where=args.where, n=args.n),
                          as_json=args.json)
    from .reporting import write_report

    path, seconds = write_report(args.out_dirs, args.output, gold=args.gold, by=args.by,
                                 target_precision=args.target_precision)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:,.0f} KB) in {seconds:.1f}s", file=sys.stderr)
    return 0


def _review(args: argparse.Namespace) -> int:
    from .reporting import review

    if args.review_command == "export":
        return review.print_exported(review.export_tasks(args.out_dir, args.output, below=args.below,
                                                         sample=args.sample, seed=args.seed))
    return review.print_imported(review.import_labels(args.out_dir, args.annotations))


def _run(args: argparse.Namespace) -> int:
    from .ops.logfile import HumanFormatter

    # stderr shows warnings and errors; -v shows everything pipeline.log gets (and debug), in a human form.
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(HumanFormatter(full_time=not sys.stderr.isatty()))
    stderr.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    # A bug's traceback goes to pipeline.log and a file; the terminal gets diagnosis's one line, unless -v.
    stderr.addFilter(lambda r: args.verbose or getattr(r, "event", None) != "internal_error")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[stderr])
    logging.getLogger("pipeline").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from .config import load_config

    if args.limit is not None:
        args.overrides.append(f"input.limit={args.limit}")
    cfg = load_config(args.config, args.overrides)
    args.out_dir, args.max_concurrency = cfg.output.dir, cfg.limits.max_concurrency  # for diagnosis
    if args.dry_run:
        from .engines.estimate import dry_run

        return dry_run(cfg, out=sys.stdout, as_json=args.json, compare=args.compare)
    from .engines.runner import run_async

    summary = asyncio.run(run_async(cfg, retry_failed=args.retry_failed, force_new=args.force_new,
                                    quiet=args.quiet, handle_signals=True, config_path=args.config,
                                    overrides=args.overrides, no_wait=args.no_wait,
                                    cancel_batches=args.cancel_batches))
    _print_summary(summary, quiet=args.quiet)
    return summary.exit_code


def _print_summary(s: Any, *, quiet: bool) -> None:
    line = (
        f"{s.succeeded:,} succeeded, {s.failed:,} failed, {s.pending:,} pending of {s.rows_total:,} rows | "
        f"{s.prompt_tokens + s.completion_tokens:,} tokens, ${s.cost_usd:.4f} "
        f"(this run ${s.run_cost_usd:.4f}) | {s.requests_sent:,} requests in {s.wall_s:.1f}s | "
        f"rows {s.rows_new:,} new, {s.rows_edited:,} edited, {s.rows_retried:,} retried, {s.rows_reused:,} reused, "
        f"{s.rows_input_failed:,} input-failed, {s.rows_removed:,} removed"
    )
    if s.stopped and s.stopped != "incomplete":
        # The stop message may quote the server (a 401's body): shown on the terminal, never obeyed.
        print(redact.scrub(printable(f"stopped ({s.stopped}): {s.stop_message or ''}".rstrip(": "))), file=sys.stderr)
    if not quiet or s.exit_code not in (0,):
        print(line, file=sys.stderr)
        if s.retries:
            print("retries: " + ", ".join(f"{k}={v}" for k, v in sorted(s.retries.items())), file=sys.stderr)
        if s.structured.get("fallbacks"):
            for note in s.structured["notes"]:
                print(printable(f"structured: {note}"), file=sys.stderr)
        print(f"outputs in {s.out_dir}", file=sys.stderr)
    if s.next_step:
        print(redact.scrub(printable(s.next_step)), file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
