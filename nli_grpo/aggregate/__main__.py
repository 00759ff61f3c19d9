"""The command line, `python -m nli_grpo.aggregate RESULTS... [options]`: read, filter, build the
tables, print the Markdown report, write table files and plots (see the package docstring)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from ..data import BENCHMARK_NAMES
from .collect import apply_filters, collect, parse_filters
from .items import ItemCache
from .plots import write_plots
from .render import FORMATS, render_report, write_tables
from .tables import DEFAULT_REFERENCE, METRICS, build_sweep_results, load_references, tables_for

#: The per-item scores read from predictions files, kept under `<out>/tables/` for the next run.
ITEM_CACHE_NAME = ".item_cache.npz"


def _comma_list(text: str, allowed: Iterable[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown or not items:
        raise ValueError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from: {', '.join(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    """The options of `python -m nli_grpo.aggregate`."""
    parser = argparse.ArgumentParser(
        prog="python -m nli_grpo.aggregate",
        description="Merge result.json files into ablation tables (Markdown to stdout; md/csv/tex files) and plots.")
    parser.add_argument("results", nargs="+", help="results folders (searched recursively) or result.json files")
    parser.add_argument("--metric", choices=METRICS, default="accuracy",
                        help="accuracy: paper-comparable (unparseable answers dropped); "
                             "accuracy_strict: unparseable = wrong")
    parser.add_argument("--benchmarks", help="comma list of benchmarks to show (default: every one present)")
    parser.add_argument("--format", default="md,csv,tex", help="table files to write: comma list of md,csv,tex")
    parser.add_argument("--out", help="folder for tables/ and plots/ (default: the first results folder)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--filter", action="append", default=[], metavar="AXIS=V1,V2",
                        help="keep cells whose axis has one of the values (repeatable; 'none' matches null, "
                             "e.g. lora_rank=64,none keeps the zero-shot baselines)")
    parser.add_argument("--reference", default=str(DEFAULT_REFERENCE),
                        help="CSV of published numbers shown as reference rows ('' for none)")
    parser.add_argument("--strict", action="store_true", help="exit non-zero if any result file is unusable")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Aggregate the results named in `argv`; the exit status (usage errors exit 2 through argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        formats = _comma_list(args.format, FORMATS, "format")
        benchmarks = _comma_list(args.benchmarks, BENCHMARK_NAMES, "benchmark") if args.benchmarks else None
        filters = parse_filters(args.filter)
    except ValueError as err:
        parser.error(str(err))
    for root in args.results:
        if not os.path.exists(root):
            parser.error(f"{root} does not exist; pass the folder the jobs write to (e.g. results/)")
    if args.reference and args.reference != str(DEFAULT_REFERENCE) and not os.path.isfile(args.reference):
        parser.error(f"--reference {args.reference}: no such file (use --reference '' for no reference rows)")

    collection = collect(args.results)
    for bad in collection.skipped:
        print(f"skipped {bad.path}: {bad.reason}", file=sys.stderr)
    if args.strict and collection.skipped:
        print(f"--strict: {len(collection.skipped)} unusable result file(s) (above); fix or move them, "
              f"or run without --strict to skip them", file=sys.stderr)
        return 1
    try:
        runs = apply_filters(collection.runs, filters)
    except ValueError as err:
        parser.error(str(err))
    if not runs:
        what = "matching the filters" if collection.runs else "usable"
        print(f"no {what} result.json under {', '.join(args.results)}; "
              f"`python -m nli_grpo.status` shows what the jobs are doing", file=sys.stderr)
        return 1

    out = Path(args.out or args.results[0])
    if out.is_file():
        out = out.parent
    references = load_references(args.reference)
    items = ItemCache(out / "tables" / ITEM_CACHE_NAME)
    sweeps = build_sweep_results(runs, args.metric, benchmarks, items)
    items.save()
    sweep_tables = [(sweep, tables_for(sweep, references)) for sweep in sweeps]
    report = render_report(sweep_tables, len(collection.runs), collection.skipped, args.metric)
    sys.stdout.write(report)

    written = write_tables(sweep_tables, out / "tables", formats, report)
    if not args.no_plots:
        written += write_plots(sweeps, out / "plots")
    print(f"wrote {len(written)} files under {out}/tables" + ("" if args.no_plots else f" and {out}/plots"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
