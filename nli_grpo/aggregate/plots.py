"""Plots of a sweep (PNG, via matplotlib's object API and Agg canvas): metric vs LoRA rank (with the
zero-shot baseline), metric vs model size, zero-shot vs GRPO per set and the quantization cost per
set (bars on one axis), and reward/KL training curves averaged over seeds. Error bars are the
tables' 95% bootstrap intervals, else ± std over several seeds, else none. matplotlib is
imported inside the drawing functions only, so tables and `--no-plots` never load it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..layout import TRAIN_LOG_FILENAME
from ..results import read_train_log
from .tables import MISSING, Stat, SweepResults, Variant, baseline_axes, format_axis, quantization_table, slug, sort_key


def _label(axes: dict, shown: list[str]) -> str:
    return ", ".join(format_axis(a, axes[a]) for a in shown) or "all"


def _new_figure(width: float, height: float, *, left=0.7, right=0.2, top=0.6, bottom=0.6, hspace=0.6, wspace=0.3):
    """A figure with fixed margins in inches (a layout engine would cost more than the drawing)."""
    # The object API with the Agg canvas: no global pyplot state, no display needed on a cluster.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        hspace=hspace, wspace=wspace)
    return fig


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def _errors(stats: list[Stat]) -> tuple[np.ndarray, np.ndarray]:
    """(which points have an error bar, 2 x k lower/upper lengths in points): the 95% bootstrap
    interval where there is one, else ± the sample std over several seeds; a single seed without
    predictions has none (no zero-length bar pretending to be a precise number)."""
    lower, upper = [], []
    for s in stats:
        if s.low is not None:      # a percentile interval need not contain the mean: no negative length
            lower.append(max(0.0, 100 * (s.mean - s.low)))
            upper.append(max(0.0, 100 * (s.high - s.mean)))
        elif s.std is not None and (s.n or 0) > 1:
            lower.append(100 * s.std)
            upper.append(100 * s.std)
        else:
            lower.append(np.nan)
            upper.append(np.nan)
    errors = np.array([lower, upper]).reshape(2, len(stats))
    has = ~np.isnan(errors).any(axis=0) & (errors.sum(axis=0) > 0)
    return has, errors


def _draw(ax, x, stats: list[Stat], *, bars: bool = False, width: float = 0.8, **style):
    """Points joined by a line (or bars) with their error bars, drawn only where there is an error."""
    x = np.asarray(x, dtype=float)
    y = np.array([100 * s.mean for s in stats])
    if bars:
        ax.bar(x, y, width, **style)
    else:
        ax.plot(x, y, marker="o", ms=3, **style)
    has, errors = _errors(stats)
    if has.any():
        ax.errorbar(x[has], y[has], yerr=errors[:, has], fmt="none", ecolor="0.2" if bars else style.get("color"),
                    capsize=2 if not bars else 1.5, lw=0.8)


def _ok(variant: Variant | None, column: str) -> Stat | None:
    stat = variant.stats[column] if variant else None
    return stat if stat is not None and stat.state == "ok" else None


def _column_panels(sweep: SweepResults):
    """A figure with one small panel per table column, four to a row."""
    ncols = min(4, len(sweep.columns))
    nrows = math.ceil(len(sweep.columns) / ncols)
    fig = _new_figure(3.2 * ncols, 2.6 * nrows + 1.0, bottom=1.0, left=0.5)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).flat)


def _finish_panels(fig, panels: list, sweep: SweepResults, path: Path, title: str, legend_columns: int) -> Path:
    """Titles and labels of the column panels, the spare panels hidden, one legend; saved to `path`."""
    for ax, column in zip(panels, sweep.columns):
        ax.set_title(sweep.column_label(column), fontsize=9)
        ax.set_ylabel("%", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in panels[len(sweep.columns):]:
        ax.set_visible(False)
    handles, labels = panels[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), legend_columns), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_accuracy_vs_rank(sweep: SweepResults, path: Path) -> Path | None:
    """One panel per column: metric vs LoRA rank, a line per other-axes group, dashed zero-shot
    (the group's baseline, found as the tables find it)."""
    ranks = sweep.values("lora_rank", having="lora_rank")
    if len(ranks) < 2:
        return None
    group_axes = [a for a in sweep.axes if a not in ("stage", "lora_rank")]
    groups = sweep.groups(group_axes, having="lora_rank")
    shown = [a for a in group_axes if sweep.varies(a, having="lora_rank")]
    fig, panels = _column_panels(sweep)
    for color, group in zip(_colors(len(groups)), groups):
        zero_shot = sweep.find(**baseline_axes(sweep, group))
        for ax, column in zip(panels, sweep.columns):
            points = [(r, s) for r in ranks if (s := _ok(sweep.find(**group, stage="grpo", lora_rank=r), column))]
            if points:
                _draw(ax, [r for r, _ in points], [s for _, s in points], color=color, label=_label(group, shown))
            if base := _ok(zero_shot, column):
                ax.axhline(100 * base.mean, color=color, ls="--", lw=1)
    for ax in panels:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, labels=[str(r) for r in ranks])
        ax.minorticks_off()
    return _finish_panels(fig, panels, sweep, path, legend_columns=6,
                          title=f"{sweep.name}: {sweep.metric} vs LoRA rank ({ERROR_BARS}; dashed: zero-shot)")


#: What the error bars of every plot are.
ERROR_BARS = "bars: 95% item bootstrap, else ± std over seeds"


def plot_accuracy_vs_model(sweep: SweepResults, path: Path) -> Path | None:
    """One panel per column: metric vs model (ordered by size), a line per quantization/stage/rank."""
    models = sweep.values("model")
    if len(models) < 2:
        return None
    line_axes = [a for a in sweep.axes if a != "model"]
    lines = sweep.groups(line_axes)
    shown = [a for a in line_axes if len({line[a] for line in lines}) > 1]
    fig, panels = _column_panels(sweep)
    for color, line in zip(_colors(len(lines)), lines):
        for ax, column in zip(panels, sweep.columns):
            points = [(i, s) for i, m in enumerate(models) if (s := _ok(sweep.find(**line, model=m), column))]
            if points:
                _draw(ax, [i for i, _ in points], [s for _, s in points], color=color,
                      ls="--" if line.get("stage") == "zero_shot" else "-", label=_label(line, shown))
    for ax in panels:
        ax.set_xticks(range(len(models)), labels=models, rotation=20, fontsize=7)
    return _finish_panels(fig, panels, sweep, path, legend_columns=5,
                          title=f"{sweep.name}: {sweep.metric} vs model size ({ERROR_BARS})")


def _bar_chart(sweep: SweepResults, path: Path, series: list[tuple[str, list[Stat]]], title: str, ylabel: str) -> Path:
    """Grouped bars, one group per column, one bar per series, all on one axis."""
    fig = _new_figure(min(18.0, max(7.0, 0.2 * len(sweep.columns) * len(series))) + 2.4, 4.2,
                      right=2.4, top=0.6, bottom=1.1)
    ax = fig.subplots(1, 1)
    x = np.arange(len(sweep.columns))
    width = 0.8 / max(len(series), 1)
    for i, ((label, stats), color) in enumerate(zip(series, _colors(len(series)))):
        ok = np.array([s.state == "ok" for s in stats], dtype=bool)
        if ok.any():       # the gap in the group of bars shows a missing one
            _draw(ax, x[ok] + (i - (len(series) - 1) / 2) * width, [s for s in stats if s.state == "ok"],
                  bars=True, width=width, color=color, label=label)
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xticks(x, labels=[sweep.column_label(c) for c in sweep.columns], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{sweep.name}: {title} ({ERROR_BARS})", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_stage_bars(sweep: SweepResults, path: Path) -> Path | None:
    """Per-set bars, zero-shot and GRPO (one bar per rank) of every model/quantization group, on one
    axis, so that heights compare across groups."""
    if sweep.values("stage") != ["zero_shot", "grpo"]:
        return None
    group_axes = [a for a in sweep.axes if a not in ("stage", "lora_rank")]
    shown = [a for a in group_axes if sweep.varies(a)]
    series = []
    for group in sweep.groups(group_axes, having="lora_rank"):
        prefix = _label(group, shown) + ": " if shown else ""
        baseline = sweep.find(**baseline_axes(sweep, group))
        series.append((prefix + "zero-shot", [baseline.stats[c] if baseline else Stat(state=MISSING) for c in sweep.columns]))
        for rank in sweep.values("lora_rank", having="lora_rank"):
            variant = sweep.find(**group, stage="grpo", lora_rank=rank)
            series.append((f"{prefix}GRPO r{rank}", [variant.stats[c] if variant else Stat(state=MISSING)
                                                      for c in sweep.columns]))
    return _bar_chart(sweep, path, series, "zero-shot vs GRPO per set", f"{sweep.metric} (%)")


def plot_quantization(sweep: SweepResults, path: Path) -> Path | None:
    """Per-set bars of the quantization cost (quantized − bf16, paired deltas as in the table)."""
    table = quantization_table(sweep)
    if table is None:
        return None
    series = [(", ".join(v for v in row.labels.values() if v), [row.cells[c] for c in sweep.columns])
              for row in table.rows]
    return _bar_chart(sweep, path, series, "quantization cost per set", "quantized − bf16 (points)")


def mean_train_curve(result_dirs: list[str]) -> pd.DataFrame | None:
    """Reward and KL per step (the index), averaged over the runs (seeds) in `result_dirs`: one
    record per step and run (of a step a restart replayed, the last attempt's). None when no run
    has a training log."""
    records = [r for d in result_dirs for r in read_train_log(os.path.join(d, TRAIN_LOG_FILENAME))]
    if not records:
        return None
    log = pd.DataFrame.from_records(records, columns=["step", "reward", "kl"]).apply(pd.to_numeric, errors="coerce")
    return log.groupby("step").mean().sort_index()


def plot_train_curves(sweep: SweepResults, path: Path) -> Path | None:
    """Reward and KL vs step from the train logs, averaged over seeds, one line per GRPO variant."""
    variants = [v for v in sweep.variants if v.axes["stage"] == "grpo"]
    shown = [a for a in sweep.axes if a != "stage" and sweep.varies(a, having="lora_rank")]
    curves = []
    for variant in sorted(variants, key=lambda v: tuple(sort_key(a, v.axes[a]) for a in sweep.axes)):
        curve = mean_train_curve(variant.result_dirs)
        if curve is not None:
            curves.append((_label(variant.axes, shown), curve))
    if not curves:
        return None
    fig = _new_figure(10, 3.8, right=2.2, wspace=0.35)
    reward_ax, kl_ax = fig.subplots(1, 2)
    for (label, curve), color in zip(curves, _colors(len(curves))):
        # Only steps that generated log a reward / KL (num_iterations > 1 reuses a batch; skipped
        # zero-advantage steps have no KL): join the logged points, or the lines break into dots.
        for ax, column in ((reward_ax, "reward"), (kl_ax, "kl")):
            logged = curve[column].dropna()
            ax.plot(logged.index, logged, color=color, lw=1, label=label)
    for ax, name in ((reward_ax, "reward"), (kl_ax, "KL")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(f"{name} (mean over seeds)", fontsize=9)
    kl_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{sweep.name}: training curves", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


PLOTS = {"accuracy_vs_rank": plot_accuracy_vs_rank, "accuracy_vs_model": plot_accuracy_vs_model,
         "zero_shot_vs_grpo": plot_stage_bars, "quantization": plot_quantization, "train_curves": plot_train_curves}


def write_plots(sweeps: list[SweepResults], out_dir: Path) -> list[Path]:
    """Every plot that applies to each sweep, as `<out_dir>/<sweep>/<plot>.png`."""
    written = []
    for sweep in sweeps:
        folder = out_dir / slug(sweep.name)
        folder.mkdir(parents=True, exist_ok=True)
        for name, plot in PLOTS.items():
            path = plot(sweep, folder / f"{name}.png")
            if path:
                written.append(path)
    return written
