"""Plots of a sweep (PNG, via matplotlib's object API and Agg canvas): metric vs LoRA rank,
zero-shot vs GRPO per set, and reward/KL training curves averaged over seeds. matplotlib is
imported inside the drawing functions only, so tables and `--no-plots` never load it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..layout import TRAIN_LOG_FILENAME
from ..results import read_train_log
from .tables import MISSING, Stat, SweepResults, column_label, format_axis, slug, sort_key


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


def plot_accuracy_vs_rank(sweep: SweepResults, path: Path) -> Path | None:
    """One panel per column: metric vs LoRA rank, a line per other-axes group, dashed zero-shot."""
    ranks = sweep.values("lora_rank", having="lora_rank")
    if len(ranks) < 2:
        return None
    group_axes = [a for a in sweep.axes if a not in ("stage", "lora_rank")]
    groups = sweep.groups(group_axes, having="lora_rank")
    shown = [a for a in group_axes if sweep.varies(a, having="lora_rank")]
    ncols = min(4, len(sweep.columns))
    nrows = math.ceil(len(sweep.columns) / ncols)
    fig = _new_figure(3.2 * ncols, 2.6 * nrows + 1.0, bottom=1.0, left=0.5)
    panels = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for color, group in zip(_colors(len(groups)), groups):
        zero_shot = sweep.find(**group, stage="zero_shot", lora_rank=None)
        for ax, column in zip(panels, sweep.columns):
            stats = [(r, s) for r in ranks if (v := sweep.find(**group, stage="grpo", lora_rank=r))
                     and (s := v.stats[column]).state == "ok"]
            if stats:
                ax.errorbar([r for r, _ in stats], [100 * s.mean for _, s in stats],
                            yerr=[100 * (s.std or 0) for _, s in stats], color=color, marker="o", ms=3,
                            capsize=2, label=_label(group, shown))
            if zero_shot and zero_shot.stats[column].state == "ok":
                ax.axhline(100 * zero_shot.stats[column].mean, color=color, ls="--", lw=1)
    for ax, column in zip(panels, sweep.columns):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, labels=[str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_title(column_label(column), fontsize=9)
        ax.set_ylabel("%", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in panels[len(sweep.columns):]:
        ax.set_visible(False)
    handles, labels = panels[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 6), fontsize=8)
    fig.suptitle(f"{sweep.name}: {sweep.metric} vs LoRA rank (mean ± std over seeds; dashed: zero-shot)", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


def plot_stage_bars(sweep: SweepResults, path: Path) -> Path | None:
    """Per-set bars, zero-shot vs GRPO (one bar per rank), one panel per model/quantization group."""
    stages = sweep.values("stage")
    if stages != ["zero_shot", "grpo"]:
        return None
    group_axes = [a for a in sweep.axes if a not in ("stage", "lora_rank")]
    groups = sweep.groups(group_axes)
    shown = [a for a in group_axes if sweep.varies(a)]
    series = [("zero_shot", None)] + [("grpo", r) for r in sweep.values("lora_rank", having="lora_rank")]
    colors = ["0.6"] + _colors(len(series) - 1)
    fig = _new_figure(min(18.0, max(7.0, 0.22 * len(sweep.columns) * len(series))) + 1.6, 2.8 * len(groups) + 1.0,
                      right=1.6, top=0.8, bottom=1.0, hspace=0.9)
    x = np.arange(len(sweep.columns))
    width = 0.8 / len(series)
    for ax, group in zip(fig.subplots(len(groups), 1, squeeze=False).flat, groups):
        for i, ((stage, rank), color) in enumerate(zip(series, colors)):
            variant = sweep.find(**group, stage=stage, lora_rank=rank)
            stats = [variant.stats[c] if variant else Stat(state=MISSING) for c in sweep.columns]
            ok = np.array([s.state == "ok" for s in stats], dtype=bool)
            if not ok.any():
                continue            # the gap in the group of bars shows it; no legend entry without data
            ax.bar(x[ok] + (i - (len(series) - 1) / 2) * width, [100 * s.mean for s in stats if s.state == "ok"],
                   width, yerr=[100 * (s.std or 0) for s in stats if s.state == "ok"], color=color, capsize=1.5,
                   label="zero-shot" if stage == "zero_shot" else f"GRPO r{rank}")
        ax.set_xticks(x, labels=[column_label(c) for c in sweep.columns], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{sweep.metric} (%)", fontsize=8)
        ax.set_title(_label(group, shown), fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{sweep.name}: zero-shot vs GRPO per set", fontsize=10)
    fig.savefig(path, dpi=110)
    return path


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


PLOTS = {"accuracy_vs_rank": plot_accuracy_vs_rank, "zero_shot_vs_grpo": plot_stage_bars,
         "train_curves": plot_train_curves}


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
