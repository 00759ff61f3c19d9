"""Per-item scores and the bootstrap over evaluation items: every number's 95% interval and every
delta's paired interval and p-value, computed on the login node from `predictions/<set>.jsonl.gz`
(numpy only, no torch).

The scheme, in one place:

- An evaluation set's items, in the order a job wrote them, form a *universe* (keyed by the set
  and a hash of its item ids). Each universe gets ONE matrix of `RESAMPLES` multinomial resample
  counts (`resample_counts`), seeded by its key: every number computed on that set, in every
  cell, seed and sweep, is bootstrapped on the same item draws. A delta between two cells on the
  same items is therefore paired (the bootstrap of the per-item difference) without any extra
  work; cells on different items (another data version) get independent draws, the unpaired
  bootstrap.
- Seeds: the items are resampled, with the same draw for every seed (the seeds evaluated the
  same items), and the statistic is the mean over seeds of each seed's metric. The interval
  says how much the evaluation set's sampling moves the number for these training seeds; the
  spread between seeds is the ± std beside it. (A hierarchical bootstrap that also resamples
  seeds is meaningless with the 1-3 seeds a cell has: 3 seeds give 10 distinct resamples.)
- Averages over sets: the mean of the member sets' replicates (sets resampled independently).
- Interval: the 2.5th and 97.5th percentiles of the replicates. p-value of a delta: two-sided,
  `min(1, 2 * min(#{rep <= 0} + 1, #{rep >= 0} + 1) / (RESAMPLES + 1))`.

Reading the predictions (gzip JSON lines, a few hundred bytes an item) is the slow part, so the
compact scores (bit-packed) are cached in one npz file, keyed by path, size and modification time.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from ..data import BENCHMARKS, HANS
from ..layout import PREDICTIONS_DIRNAME

#: Bootstrap resamples per evaluation set (documented in the README; the p-value's resolution).
RESAMPLES = 1000
#: Coverage of every interval.
CONFIDENCE = 0.95
#: Bumped when the cached fields change: an old cache is then ignored, not misread.
CACHE_VERSION = 2


@dataclass(frozen=True)
class ItemScores:
    """One seed's items of one set: `correct` under the set's rule, `parsed` (the authors'
    accuracy counts only these; HANS sets count every item), in the universe's item order."""
    universe: str
    correct: np.ndarray
    parsed: np.ndarray


def predictions_path(result_dir: str | os.PathLike, benchmark: str) -> str:
    """Where a cell's per-item predictions of a set are (layout.CellFolder.predictions; a plain
    string join: pathlib costs seconds over the 130,000 files of a 10,000-cell sweep)."""
    return os.path.join(result_dir, PREDICTIONS_DIRNAME, f"{benchmark}.jsonl.gz")


def parse_predictions(raw: bytes, benchmark: str) -> ItemScores:
    """Scores from the bytes of a predictions file (gzip or plain JSON lines). The lines are parsed
    as one JSON array by one orjson call, the fields gathered by list comprehensions: per-line
    parsing and generators cost several times more on a 10,000-cell sweep's 130,000 files."""
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).strip()
    try:
        records = orjson.loads(b"[" + text.replace(b"\n", b",") + b"]")
    except orjson.JSONDecodeError:     # blank lines or CRLF: join the non-blank lines instead
        records = orjson.loads(b"[" + b",".join(line for line in text.splitlines() if line.strip()) + b"]")
    ids = orjson.dumps([r["id"] for r in records])
    correct = np.array([bool(r["correct"]) for r in records], dtype=bool)
    spec = BENCHMARKS.get(benchmark)
    if spec is not None and spec.scoring == HANS:
        parsed = np.ones(len(records), dtype=bool)          # HANS drops nothing (scoring.py)
    else:
        parsed = np.array([r.get("prediction", -1) != -1 for r in records], dtype=bool)
    universe = f"{benchmark}:{len(records)}:{hashlib.sha256(ids).hexdigest()[:16]}"
    return ItemScores(universe, correct, parsed)


class ItemCache:
    """`ItemScores` of predictions files, read once and kept (bit-packed) in `path` between runs;
    an entry is used while its file keeps its size and modification time. `path` None: no file."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self.entries: dict[str, tuple] = {}     # path -> ((size, mtime_ns), universe, n, packed correct, packed parsed)
        self.changed = False
        self.read = self.reused = 0
        if self.path and self.path.is_file():
            try:
                self.entries = self._load(self.path)
            except Exception:  # a damaged or foreign cache is rebuilt, never trusted
                self.entries = {}

    # A plain npz of arrays, loaded without pickle: results folders are shared within a lab, and a
    # pickle written there by someone else would run code in whoever aggregates.
    @staticmethod
    def _load(path: Path) -> dict[str, tuple]:
        with np.load(path, allow_pickle=False) as saved:
            if int(saved["version"]) != CACHE_VERSION:
                return {}
            columns = [saved[k] for k in ("paths", "sizes", "mtimes", "universe_names", "universes", "ns", "bytes",
                                          "correct", "parsed")]
        paths, sizes, mtimes, names, universes, ns, nbytes, correct, parsed = columns
        paths = paths.tobytes().decode().split("\n") if len(paths) else []
        universes = [str(names[i]) for i in universes]
        ends = np.cumsum(nbytes)
        return {str(p): ((int(size), int(mtime)), str(u), int(n), correct[end - k:end], parsed[end - k:end])
                for p, size, mtime, u, n, k, end in zip(paths, sizes, mtimes, universes, ns, nbytes, ends)}

    def save(self) -> None:
        """Write the cache (atomically) when something was added."""
        if not (self.path and self.changed):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        values = list(self.entries.values())
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        names = sorted({v[1] for v in values})
        index = {name: i for i, name in enumerate(names)}
        # Paths as one UTF-8 blob (a numpy string array pads every path to the longest, 4 bytes a character).
        np.savez(tmp, version=CACHE_VERSION, paths=np.frombuffer("\n".join(self.entries).encode(), dtype=np.uint8),
                 sizes=np.array([v[0][0] for v in values], dtype=np.int64),
                 mtimes=np.array([v[0][1] for v in values], dtype=np.int64),
                 universe_names=np.array(names, dtype=str), universes=np.array([index[v[1]] for v in values], dtype=np.int32),
                 ns=np.array([v[2] for v in values], dtype=np.int64),
                 bytes=np.array([len(v[3]) for v in values], dtype=np.int64),
                 correct=np.concatenate([v[3] for v in values]) if values else np.zeros(0, np.uint8),
                 parsed=np.concatenate([v[4] for v in values]) if values else np.zeros(0, np.uint8))
        os.replace(tmp, self.path)

    @staticmethod
    def predicted_sets(result_dir: str | os.PathLike) -> set[str]:
        """The sets a cell folder has predictions of (one listing: cheaper than a stat per set)."""
        try:
            names = os.listdir(os.path.join(result_dir, PREDICTIONS_DIRNAME))
        except OSError:
            return set()
        return {name.removesuffix(".jsonl.gz") for name in names if name.endswith(".jsonl.gz")}

    def scores(self, result_dir: str | os.PathLike, benchmark: str) -> ItemScores | None:
        """The scores of a cell's set; None when it has no (readable) predictions file."""
        key = predictions_path(result_dir, benchmark)
        try:
            stat = os.stat(key)
        except OSError:
            return None
        stamp = (stat.st_size, stat.st_mtime_ns)
        entry = self.entries.get(key)
        if entry is not None and entry[0] == stamp:
            self.reused += 1
            _, universe, n, correct, parsed = entry
            return ItemScores(universe, np.unpackbits(correct, count=n).astype(bool),
                              np.unpackbits(parsed, count=n).astype(bool))
        try:
            scores = parse_predictions(Path(key).read_bytes(), benchmark)
        except (OSError, EOFError, ValueError, KeyError, TypeError, gzip.BadGzipFile):
            return None     # a damaged file: the number keeps its value, without an interval
        self.read += 1
        self.entries[key] = (stamp, scores.universe, len(scores.correct), np.packbits(scores.correct),
                             np.packbits(scores.parsed))
        self.changed = True
        return scores

def resample_counts(universe: str, n: int, resamples: int = RESAMPLES) -> np.ndarray:
    """resamples x n multinomial counts of the items (each row sums to n), the same for every
    caller given the universe's key: the draws that pair every number computed on these items."""
    seed = int.from_bytes(hashlib.sha256(universe.encode()).digest()[:8], "little")
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    # Row r's draws counted in one bincount (offset r * n): 10x faster than rng.multinomial.
    counts = np.bincount((draws + n * np.arange(resamples)[:, None]).ravel(), minlength=resamples * n)
    return counts.reshape(resamples, n).astype(np.float32)


def seed_replicates(scores: dict[tuple, ItemScores], metric: str) -> dict[tuple, np.ndarray]:
    """Bootstrap replicates (float32, RESAMPLES) of every (run, set) key's metric: one matrix
    product per universe, its counts drawn once."""
    by_universe: dict[str, list[tuple]] = {}
    for key, item in scores.items():
        by_universe.setdefault(item.universe, []).append(key)
    out = {}
    for universe, keys in by_universe.items():
        counts = resample_counts(universe, len(scores[keys[0]].correct))
        correct = np.stack([scores[k].correct for k in keys], axis=1).astype(np.float32)
        if metric == "accuracy_strict":
            reps = counts @ correct / counts.shape[1]
        else:
            parsed = np.stack([scores[k].parsed for k in keys], axis=1).astype(np.float32)
            hits, kept = counts @ (correct * parsed), counts @ parsed
            with np.errstate(invalid="ignore", divide="ignore"):
                reps = np.where(kept > 0, hits / kept, np.nan)
        for i, key in enumerate(keys):
            out[key] = reps[:, i]
    return out


def interval(replicates: np.ndarray) -> tuple[float, float] | None:
    """The percentile interval at CONFIDENCE; None when too few replicates are defined (a set
    where most resamples hold no parsed answer)."""
    defined = replicates[~np.isnan(replicates)]
    if len(defined) < 0.9 * len(replicates):
        return None
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


def p_value(replicates: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value of "the difference is zero" from a delta's replicates."""
    defined = replicates[~np.isnan(replicates)]
    if len(defined) < 0.9 * len(replicates):
        return None
    below, above = int((defined <= 0).sum()), int((defined >= 0).sum())
    return min(1.0, 2 * (min(below, above) + 1) / (len(defined) + 1))
