"""Tables as text: formatting a merged value, Markdown (the report on stdout), long-form CSV and
LaTeX (booktabs) renderings of a `Table`, the whole report, and the table files on disk."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from .collect import SkippedFile
from .items import RESAMPLES
from .tables import MISSING, Stat, SweepResults, Table, column_label, slug

FORMATS = ("md", "csv", "tex")
AXIS_LABELS = {"quantization": "quant.", "lora_rank": "rank", "system": "system", "delta": "Δ"}


#: After a number computed on data that differs from its column's (see tables.mark_mixed_data).
MIXED_MARK = "†"
#: After a delta whose 95% interval excludes zero.
SIGNIFICANT_MARK = "‡"


def format_stat(stat: Stat) -> str:
    """Percent with 2 decimals like the paper; `± std` when several seeds; signed for deltas;
    † when its column mixes data versions; ‡ on a delta whose interval excludes zero; the 95%
    bootstrap interval over items in brackets when the predictions files were there."""
    if stat.state != "ok":
        return "—" if stat.state == MISSING else stat.state
    if stat.kind == "delta":
        text = f"{100 * stat.mean:+.2f}"
    else:
        text = f"{100 * stat.mean:.2f}" + (f" ± {100 * stat.std:.2f}" if stat.std is not None else "")
    text += (MIXED_MARK if stat.mixed else "") + (SIGNIFICANT_MARK if stat.significant else "")
    return text + (f" [{100 * stat.low:.1f}, {100 * stat.high:.1f}]" if stat.low is not None else "")


_LATEX_SPECIALS = {MIXED_MARK: r"$^\dagger$", SIGNIFICANT_MARK: r"$^\ddagger$",
                   "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "±": r"$\pm$", "−": r"$-$", "—": "---", "Δ": r"$\Delta$"}


_LATEX_TRANSLATION = str.maketrans(_LATEX_SPECIALS)


def latex_escape(text: str) -> str:
    return text.translate(_LATEX_TRANSLATION)


def display_cells(table: Table, style: str = "md") -> tuple[list[str], list[list[str]]]:
    """Header and rows as text, best values in bold (`**` for Markdown, `\\textbf` for LaTeX)."""
    escape = latex_escape if style == "tex" else str

    def cell(stat: Stat, row_n: int | None) -> str:
        shown = format_stat(stat)
        if stat.state == "ok" and stat.kind in ("result", "delta") and row_n is not None and stat.n != row_n:
            shown += f" (n {stat.n})"        # over other seeds than the rest of its row
        text = escape(shown)
        if not stat.best:
            return text
        return f"\\textbf{{{text}}}" if style == "tex" else f"**{text}**"

    headers = ([AXIS_LABELS.get(a, a) for a in table.label_columns]
               + [table.column_labels.get(c) or column_label(c) for c in table.columns] + ["runs"])
    rows = [[escape(row.labels.get(a, "")) for a in table.label_columns]
            + [cell(row.cells[c], row.n) for c in table.columns] + [escape(row.runs)]
            for row in table.rows]
    return [escape(h) for h in headers], rows


CSV_FIELDS = ("column", "mean", "std", "n", "low", "high", "p_value", "significant", "state", "kind", "best", "display",
              "runs", "source", "mixed_data", "data")


def long_records(table: Table) -> list[dict]:
    """One CSV line per table cell: labels, column, mean/std as fractions, n, state, best flag."""
    return [
        {**{a: row.labels.get(a, "") for a in table.label_columns}, "column": column, "mean": stat.mean,
         "std": stat.std, "n": stat.n, "low": stat.low, "high": stat.high, "p_value": stat.p,
         "significant": stat.significant, "state": stat.state, "kind": stat.kind, "best": stat.best,
         "display": format_stat(stat), "runs": row.runs, "source": row.source, "mixed_data": stat.mixed,
         "data": " ".join(sorted(stat.data))}
        for row in table.rows for column, stat in ((c, row.cells[c]) for c in table.columns)
    ]


def table_csv(table: Table) -> str:
    fields = [*table.label_columns, *CSV_FIELDS]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")  # plain rows: DictWriter costs 2x on big sweeps
    writer.writerow(fields)
    writer.writerows([record[f] for f in fields] for record in long_records(table))
    return out.getvalue()


def _caption(table: Table) -> str:
    fixed = ", ".join(f"{AXIS_LABELS.get(a, a)} = {v}" for a, v in table.fixed.items())
    return table.title + (f" ({fixed})" if fixed else "")


def table_markdown(table: Table) -> str:
    """A pipe table (labels left-aligned, numbers right-aligned, padded for reading in a terminal),
    preceded by its caption and followed by the sources of its reference rows."""
    headers, rows = display_cells(table, "md")
    right = [False] * len(table.label_columns) + [True] * len(table.columns) + [False]
    widths = [max(len(text) for text in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else ":" + "-" * (w + 1) for w, r in zip(widths, right)) + "|"
    notes = "".join(f"\n- {r.labels['system']}: {r.source}" for r in table.rows if r.source)
    mixed = "".join(f"\n- {MIXED_MARK} {note}" for note in table.notes)
    remarks = "".join(f"\n{remark}\n" for remark in table.remarks)
    return "\n".join([f"### {_caption(table)}", "", line(headers), rule, *map(line, rows), ""]) + (
        f"\nReference rows:{notes}\n" if notes else "") + (f"\nData:{mixed}\n" if mixed else "") + remarks


def table_latex(table: Table, sweep: str) -> str:
    """A booktabs table float (needs \\usepackage{booktabs}); reference sources as comments."""
    headers, rows = display_cells(table, "tex")
    columns = "l" * len(table.label_columns) + "r" * len(table.columns) + "l"
    return "\n".join([
        f"% {sweep}: {table.title}; best per column in bold. Needs \\usepackage{{booktabs}}.",
        *(f"% {r.labels['system']}: {r.source}" for r in table.rows if r.source),
        *(f"% {MIXED_MARK} {note}" for note in table.notes),
        *(f"% {remark}" for remark in table.remarks),
        "\\begin{table}", "\\centering", f"\\caption{{{latex_escape(_caption(table))}}}",
        f"\\label{{tab:{sweep}-{table.name}}}", f"\\begin{{tabular}}{{{columns}}}", "\\toprule",
        " & ".join(headers) + " \\\\", "\\midrule", *(" & ".join(r) + " \\\\" for r in rows),
        "\\bottomrule", "\\end{tabular}", "\\end{table}", ""])


#: Below this many items per set, a sweep's report says that its tables decide nothing.
FEW_ITEMS = 100


def sample_size_note(sweep: SweepResults) -> str | None:
    """What the sweep's evaluation sets can decide: a warning when they are tiny (the smoke run's
    4-8 items), or when no per-item predictions were found (numbers without intervals)."""
    counts = sorted(n for n in sweep.items.values() if n)
    has_intervals = any(s.low is not None for v in sweep.variants for s in v.stats.values())
    notes = []
    if counts and counts[0] < FEW_ITEMS:
        notes.append(f"**Sample size: {counts[0]}-{counts[-1]} items per set.** At this size one item moves a set's "
                     f"accuracy by {100 / counts[-1]:.0f}-{100 / counts[0]:.0f} points and the 95% intervals span "
                     "tens of points: these tables decide nothing; no difference in them is evidence of anything.")
    if not has_intervals:
        notes.append("No per-item predictions (`predictions/<set>.jsonl.gz`) were found: the numbers have no "
                     "intervals, and no delta can be called significant.")
    return "\n\n".join(notes) or None


def render_report(sweep_tables: list[tuple[SweepResults, list[Table]]], n_read: int, skipped: list[SkippedFile],
                  metric: str) -> str:
    """The whole Markdown report (what goes to stdout and tables/report.md)."""
    lines = [f"# nli_grpo results: `{metric}`", "",
             ("Values in % (mean ± sample std over the row's seeds: the complete seeds with every shown set; "
              "`runs` = seeds used/expected; a cell over other seeds shows its n). [low, high]: 95% bootstrap "
              f"interval over evaluation items ({RESAMPLES} resamples, items drawn alike for every seed). "
              f"Deltas are paired (same items; same seeds where both are trained); {SIGNIFICANT_MARK} = interval "
              "excludes zero. Averages are unweighted means over their sets, (k/m) = sets covered. "
              "Best per column in **bold** (among rows over the most seeds); — = no result; "
              "running/preempted/failed = no complete seed yet; no parse = evaluated, but no completion had a "
              "parseable answer."),
             "", f"{n_read} result files read" + (f", {len(skipped)} skipped (listed on stderr)." if skipped else "."),
             ""]
    for sweep, tables in sweep_tables:
        lines += [f"## Sweep `{sweep.name}`", ""]
        if note := sample_size_note(sweep):
            lines += [note, ""]
        lines += [table_markdown(t) for t in tables]
    return "\n".join(lines).rstrip() + "\n"


def write_tables(sweep_tables: list[tuple[SweepResults, list[Table]]], out_dir: Path, formats: Iterable[str],
                 report: str) -> list[Path]:
    """`<out_dir>/<sweep>/<table>.{md,csv,tex}` for each requested format, plus report.md."""
    written = []
    for sweep, tables in sweep_tables:
        folder = out_dir / slug(sweep.name)
        folder.mkdir(parents=True, exist_ok=True)
        renderers = {"md": table_markdown, "csv": table_csv, "tex": partial(table_latex, sweep=sweep.name)}
        for table in tables:
            for fmt in formats:
                path = folder / f"{table.name}.{fmt}"
                path.write_text(renderers[fmt](table))
                written.append(path)
    if "md" in formats:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.md").write_text(report)
        written.append(out_dir / "report.md")
    return written
