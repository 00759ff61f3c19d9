"""The paper's training pool: ANLI training items hard for Qwen2.5-7B, rebuilt by sampling; shards
as one job array, then a merge job after them (training sweeps build it by themselves when needed).

    python sweeps/bootstrap.py --partition gpu [--shards 16]
    python sweeps/bootstrap.py --smoke              # the tiny model on this machine, seconds
"""
from nli_grpo.pool import Pool
from nli_grpo.sweep import PoolSweep

SWEEP = PoolSweep(pool=Pool(base="Qwen/Qwen2.5-7B-Instruct", samples=4, below=0.5, shards=8))

if __name__ == "__main__":
    raise SystemExit(SWEEP.main())
