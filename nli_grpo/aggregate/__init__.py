"""Merge per-cell result files into ablation tables (Markdown, CSV, LaTeX) and plots.

    python -m nli_grpo.aggregate results/                       # every sweep under results/
    python -m nli_grpo.aggregate results/lora_rank --filter quantization=awq --filter lora_rank=8,64,none
    python -m nli_grpo.aggregate results/ --metric accuracy_strict --format md,tex --no-plots

Markdown goes to stdout; files go to `<out>/tables/<sweep>/<table>.{md,csv,tex}` (plus
`<out>/tables/report.md`, the stdout text) and `<out>/plots/<sweep>/*.png`; `<out>` defaults to the
first results folder.

How a sweep becomes tables: every result file is one seed of a *variant* (its cell axes minus the
seed). Seeds are merged per variant (mean, sample std, n) over the row's seeds: the complete ones with
a number on every shown set, so that every column, average and delta of a row uses the same seeds;
an average column is computed per seed first (every member benchmark required). Deltas between
trained cells are paired over the seeds both used. Every number gets a 95% bootstrap interval over
evaluation items from the cells' per-item predictions (`items`), the same item draws for every
cell on a set, so that deltas are paired over items too. Each
layout in `tables.TABLE_LAYOUTS` looks at the axes present in the sweep and returns a table or None,
so a new sweep needs no new code. Rows the sweep's axes imply but that have no complete seed show the
state of their seeds (running / preempted / failed) or "—" when no file exists: nothing is dropped.

Modules, each importing only the ones above it:

- `collect`: finding and reading result.json files (skipped ones with the reason), cell axes, `--filter`.
- `items`: per-item predictions (cached) and the bootstrap: resample counts, intervals, p-values.
- `tables`: seeds merged into `SweepResults` of `Variant`s, the table layouts, best marks, reference
  rows, the unparseable rates and the paper's claims checked against the sweep.
- `render`: tables as Markdown, CSV and LaTeX text, the report, the table files.
- `plots`: the PNG plots (matplotlib is imported only while drawing).
- `__main__`: the command line (`build_parser`, `main`).

Nothing is re-exported here: import from the modules (importing `__main__` with the package would
make `python -m nli_grpo.aggregate` warn that it runs a module already imported).
"""
