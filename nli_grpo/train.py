"""Train and evaluate one cell: `python -m nli_grpo.train --config <recipe> [key=value ...]`.

A thin command line over the cell job (nli_grpo.job): GRPO training (nli_grpo.training), then the
13-set evaluation (nli_grpo.evaluation), writing `<output.dir>/result.json`. Rerunning the same
command after a crash, a preemption or a `scontrol requeue` continues from the last complete
checkpoint; the same command with other settings is refused unless --force (see nli_grpo.job).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError
from .job import EXIT_REFUSED, RunConflict, config_for_run, run

log = logging.getLogger("nli_grpo.train")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m nli_grpo.train",
        description="Train (GRPO + LoRA) and evaluate one cell; resumes from its last complete checkpoint.",
    )
    parser.add_argument("--config", default="paper", help="recipe name (paper, lora_rank, smoke) or a YAML path")
    parser.add_argument("--output-dir", help="shortcut for output.dir=...")
    parser.add_argument("--force", action="store_true",
                        help="where the output folder holds a run with other settings, move it aside to "
                             "<parent>/.replaced/ and start afresh (default: refuse)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.rank=16 grpo.max_steps=100")
    # intermixed: overrides may come before and after the options
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = config_for_run(args.config, args.overrides, args.output_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    log.info("run folder %s (cell %s)", cfg.output.dir, cfg.output.cell_id)
    try:
        return run(cfg, force=args.force)
    except RunConflict as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    raise SystemExit(main())
