"""Bootstrap over test examples: a run's intervals, and the paired difference of two methods.

The unit of sampling error is the test example. Every stage of a run answers the same test
examples again, and every run of a comparison answers the same ones, so one resample draws each
test set's examples once (with replacement) and uses that draw at every stage of every run that
answered it. A difference between two methods is then computed on the same draw for both: the
examples both get right or both get wrong cancel, which is what makes the interval of a
*paired* difference narrower than the two runs' own intervals suggest.

A draw is stored as counts (how often resample b drew example k), so a cell's resampled
accuracy is one matrix product, `counts @ hits`, for all resamples and all cells that share the
test set at once: 13 methods x 4 tasks x 100 examples x 10 000 resamples take well under a
second. Each test set's draw comes from its own generator, seeded by the bootstrap seed and the
test set's key, so a run's resamples do not depend on which other runs are being compared.

Matrix rows and columns follow eval/metrics.py: row i = after stage i+1 (0-based), column j =
task j in sequence order; AA, BWT and FT are the vectorised `average_accuracy`,
`backward_transfer` and `mean_forgetting` (FT, new_methods_spec.md §5) of that module, and
missing cells are skipped as there.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
LEVEL = 0.95
METRICS = ("average_accuracy", "backward_transfer", "forgetting")


@dataclass(frozen=True)
class RunHits:
    """One run's per-example exact-match hits: the input of every bootstrap here.

    hits[(i, j)]: bool per test example of task j, answered correctly after stage i (0-based row).
    test_sets[j]: a key naming task j's test examples; runs with equal keys answered the same
    examples in the same order, so they share a draw. n_rows: rows of the accuracy matrix
    (1 for a joint run, whose BWT and FT are undefined)."""
    n_rows: int
    test_sets: Sequence[str]
    hits: Mapping[tuple[int, int], np.ndarray]
    joint: bool = False

    def __post_init__(self) -> None:
        for (i, j), hits in self.hits.items():
            if not (0 <= i < self.n_rows and 0 <= j < len(self.test_sets)):
                raise ValueError(f"cell ({i}, {j}) outside a {self.n_rows} x {len(self.test_sets)} matrix")
            if len(hits) == 0:
                raise ValueError(f"cell ({i}, {j}) has no test examples")
        for j in range(len(self.test_sets)):
            sizes = {len(h) for (_, jj), h in self.hits.items() if jj == j}
            if len(sizes) > 1:
                raise ValueError(f"task {j} has cells of different sizes {sorted(sizes)}: not one test set")

    def size(self, j: int) -> int | None:
        return next((len(h) for (_, jj), h in self.hits.items() if jj == j), None)


@dataclass
class Resampled:
    """A run's metrics on the unresampled examples (`point`) and on every resample (`samples`,
    one value per resample; None where the metric is undefined, e.g. BWT of a joint run)."""
    point: dict[str, float | None]
    samples: dict[str, np.ndarray | None] = field(repr=False)


# --- the vectorised metrics ------------------------------------------------------------------------

def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over the known (non-NaN) entries; NaN where none is known, without numpy's warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _nanmax(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(values, axis=axis)


def matrix_metrics(acc: np.ndarray, *, joint: bool = False) -> dict[str, np.ndarray | None]:
    """AA, BWT and FT of accuracy matrices stacked as acc[b, row, task] (NaN = missing).

    AA: mean of the last row. BWT: mean over j < T of acc[T, j] − acc[j, j]. FT: mean over j < T
    of max over stages j..T−1 of acc[i, j], minus acc[T, j] (as `metrics.forgetting`: a score
    before the task was learned is forward transfer, not something to forget). Each skips what
    is missing; a value that has no known term at all is NaN."""
    last = acc.shape[1] - 1
    out: dict[str, np.ndarray | None] = {"average_accuracy": _nanmean(acc[:, last, :], axis=1)}
    n_earlier = min(last, acc.shape[2])
    if joint or n_earlier == 0:
        out["backward_transfer"] = out["forgetting"] = None
        return out
    final = acc[:, last, :n_earlier]
    diagonal = acc[:, np.arange(n_earlier), np.arange(n_earlier)]
    out["backward_transfer"] = _nanmean(final - diagonal, axis=1)
    # Entries before the task was learned (row < column) and the last row are left out of the max.
    rows = np.arange(acc.shape[1])[:, None]
    learned = (rows >= np.arange(n_earlier)[None, :]) & (rows < last)
    earlier = np.where(learned[None], acc[:, :, :n_earlier], np.nan)
    out["forgetting"] = _nanmean(_nanmax(earlier, axis=1) - final, axis=1)
    return out


# --- resampling ------------------------------------------------------------------------------------

def _generator(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(key.encode()).digest()
    words = [int.from_bytes(digest[k:k + 4], "little") for k in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([seed, *words]))


_CHUNK = 1000  # resamples drawn at a time: bounds memory on large test sets (15 tasks x 1000 examples)


def draw_counts(key: str, n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED):
    """counts[b, k]: how often resample b draws example k of the n examples of test set `key`
    (n draws with replacement per resample, each row summing to n), yielded as (first resample,
    counts) in chunks of _CHUNK resamples, all from the test set's one generator. float32 holds
    the counts and their sums over hits exactly (integers far below 2^24) at half float64's cost."""
    generator = _generator(seed, key)
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        picks = generator.integers(0, n, size=(size, n))
        picks += (np.arange(size) * n)[:, None]
        yield start, np.bincount(picks.ravel(), minlength=size * n).reshape(size, n).astype(np.float32)


def resample_runs(runs: Sequence[RunHits], resamples: int = DEFAULT_RESAMPLES,
                  seed: int = DEFAULT_SEED) -> list[Resampled]:
    """Every run's AA, BWT and FT on every resample. Runs that share a test-set key share its draw;
    each draw is made once and dropped once every cell that uses it is computed."""
    accuracies = [np.full((resamples, run.n_rows, len(run.test_sets)), np.nan) for run in runs]
    cells_by_test_set: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for r, run in enumerate(runs):
        for (i, j), hits in run.hits.items():
            cells_by_test_set.setdefault((run.test_sets[j], len(hits)), []).append((r, i, j))
    for (key, n), cells in sorted(cells_by_test_set.items()):
        stacked = np.stack([np.asarray(runs[r].hits[(i, j)], dtype=np.float32) for r, i, j in cells], axis=1)
        for start, counts in draw_counts(key, n, resamples, seed):
            # (chunk, cells): examples answered correctly in each resample, then percent.
            resampled = (counts @ stacked).astype(np.float64) * (100.0 / n)
            for c, (r, i, j) in enumerate(cells):
                accuracies[r][start:start + len(counts), i, j] = resampled[:, c]
    out = []
    for run, acc in zip(runs, accuracies):
        point = np.full((1, run.n_rows, len(run.test_sets)), np.nan)
        for (i, j), hits in run.hits.items():
            # The same arithmetic as the resamples' (count x 100/n), so equal counts give equal floats.
            point[0, i, j] = float(np.count_nonzero(hits)) * (100.0 / len(hits))
        points = matrix_metrics(point, joint=run.joint)
        samples = matrix_metrics(acc, joint=run.joint)
        defined = {name: points[name] is not None and not np.isnan(points[name][0]) for name in METRICS}
        out.append(Resampled(
            point={name: float(points[name][0]) if defined[name] else None for name in METRICS},
            samples={name: samples[name] if defined[name] else None for name in METRICS},
        ))
    return out


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The (1 − level)/2 and (1 + level)/2 quantiles of the resampled values."""
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def run_intervals(run: RunHits, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                  level: float = LEVEL) -> dict[str, tuple[float, float] | None]:
    """One run's percentile intervals of AA, BWT and FT (None where the metric is undefined)."""
    resampled = resample_runs([run], resamples, seed)[0]
    return {name: None if s is None else percentile_interval(s, level) for name, s in resampled.samples.items()}


# --- paired differences ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PairedDifference:
    """A − B: the difference on the examples as they are, its percentile interval over the
    resamples, and whether that interval excludes 0 (the difference is significant at 1 − level)."""
    difference: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(groups: Sequence[Sequence[tuple[Resampled, Resampled]]], metric: str, *,
                      seed: int = DEFAULT_SEED, level: float = LEVEL) -> PairedDifference | None:
    """The difference of `metric` between methods A and B over paired runs, with its interval.

    groups[o] holds the (A run, B run) pairs of task order o, one pair per seed both ran, each
    resampled on the same draws (`resample_runs` of both together). The difference is the mean
    over orders of the mean over that order's seeds of A − B. A resample uses the same example
    draw for both methods and, within an order of several seeds, draws the seeds with
    replacement (the same seeds for A and B); the orders are kept as they are, since a benchmark
    defines them rather than samples them. None when the metric is undefined for either method
    of some pair (BWT of a joint run)."""
    if not groups or any(not pairs for pairs in groups):
        raise ValueError("paired_difference needs at least one pair in every order")
    point_by_order, samples_by_order = [], []
    for o, pairs in enumerate(groups):
        points, samples = [], []
        for a, b in pairs:
            if a.point[metric] is None or b.point[metric] is None:
                return None
            points.append(a.point[metric] - b.point[metric])
            samples.append(a.samples[metric] - b.samples[metric])
        by_seed = np.stack(samples)  # (seeds, resamples)
        if len(pairs) > 1:
            n_resamples = by_seed.shape[1]
            seeds = _generator(seed, f"seeds of order {o} ({len(pairs)})")
            picks = seeds.integers(0, len(pairs), size=(n_resamples, len(pairs)))
            by_seed = np.take_along_axis(by_seed.T, picks, axis=1).T
        point_by_order.append(float(np.mean(points)))
        samples_by_order.append(by_seed.mean(axis=0))
    difference = float(np.mean(point_by_order))
    low, high = percentile_interval(np.mean(samples_by_order, axis=0), level)
    return PairedDifference(difference=difference, low=low, high=high)
