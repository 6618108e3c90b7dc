"""The plots a reader looks at first: accuracy-matrix heatmaps, AA/BWT bars, forgetting curves,
the training loss across the whole sequence.

Every axis names its tasks and units and every title says method, model and order, so a
figure still reads correctly when it is copied into a README on its own.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from .report import RunSummary  # noqa: E402
from .store import atomic_write_bytes  # noqa: E402


def _title(run: RunSummary, what: str) -> str:
    known = " on ".join(x for x in (run.method, run.model) if x)
    return f"{what}: {known} ({run.name})" if known else f"{what}: {run.name}"


def _save(figure, path: Path) -> Path:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def heatmap(run: RunSummary, path: Path) -> Path:
    """R[i][j]: exact match on task j (columns) after training stage i (rows)."""
    n_rows, n_cols = len(run.matrix), len(run.task_order)
    size = max(4.0, 0.55 * n_cols + 2)
    figure, axes = plt.subplots(figsize=(size, max(3.0, 0.45 * n_rows + 1.8)))
    values = [[float("nan") if v is None else v for v in row] for row in run.matrix]
    image = axes.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    axes.set_xticks(range(n_cols), run.task_order, rotation=45, ha="right")
    stage_names = run.task_order if not run.joint else ["joint"]
    axes.set_yticks(range(n_rows), [f"{i + 1}: {name}" for i, name in enumerate(stage_names[:n_rows])])
    axes.set_xlabel("evaluated task")
    axes.set_ylabel("after training stage")
    if n_cols <= 8:
        for i, row in enumerate(run.matrix):
            for j, value in enumerate(row):
                if value is not None:
                    axes.text(j, i, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black",
                              fontsize=8)
    figure.colorbar(image, ax=axes, label="exact match (%)")
    axes.set_title(_title(run, "Accuracy matrix"), fontsize=10)
    return _save(figure, path)


def forgetting_curves(run: RunSummary, path: Path) -> Path:
    """Each task's exact match across the stages after it was learned."""
    figure, axes = plt.subplots(figsize=(6.5, 3.8))
    stages = range(1, len(run.matrix) + 1)
    for j, task in enumerate(run.task_order):
        points = [(i, row[j]) for i, row in zip(stages, run.matrix) if j < len(row) and row[j] is not None]
        if points:
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=task)
    axes.set_xlabel("after training stage")
    axes.set_ylabel("exact match (%)")
    axes.set_ylim(-2, 102)
    axes.set_xticks(list(stages))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2 if len(run.task_order) > 6 else 1, loc="best")
    axes.set_title(_title(run, "Per-task accuracy across stages"), fontsize=10)
    return _save(figure, path)


def loss_curve(run: RunSummary, path: Path) -> Path:
    """Every training step's loss, stage after stage on one axis, a dashed line where a stage
    ends and its task named above it (a stage that trains nothing takes no width)."""
    stages = run.step_losses or []
    figure, axes = plt.subplots(figsize=(max(6.5, min(14.0, 0.004 * sum(len(s) for _, s in stages) + 6)), 3.8))
    many = sum(bool(losses) for _, losses in stages) > 6
    start = 0
    for k, (task, losses) in enumerate(stages):
        if not losses:
            continue
        steps = range(start + 1, start + len(losses) + 1)
        axes.plot(steps, losses, linewidth=1, color=f"C{k % 10}")
        if start > 0:
            axes.axvline(start + 0.5, color="grey", linestyle="--", linewidth=0.8)
        axes.annotate(task, (start + 0.5 + len(losses) / 2, 1.01), xycoords=("data", "axes fraction"),
                      ha="left" if many else "center", va="bottom", fontsize=7, rotation=45 if many else 0)
        start += len(losses)
    axes.set_xlabel("training step (whole sequence)")
    axes.set_ylabel("loss (task + method terms)")
    axes.set_xlim(0.5, start + 0.5)
    axes.grid(alpha=0.3)
    axes.set_title(_title(run, "Training loss per step, stage boundaries dashed"), fontsize=10, pad=40 if many else 14)
    return _save(figure, path)


def _bar_extents(errors, count: int) -> tuple[list[float], list[float]]:
    """matplotlib's yerr (None, one list, or [below, above]) as two lists."""
    if errors is None:
        return [0.0] * count, [0.0] * count
    if errors and isinstance(errors[0], (list, tuple)):
        return list(errors[0]), list(errors[1])
    return list(errors), list(errors)


def metric_bars(labels: list[str], aa: list[float | None], bwt: list[float | None], path: Path, title: str,
                aa_err: list[float] | None = None, bwt_err: list[float] | None = None) -> Path:
    """AA and BWT side by side per method (or run); error bars where given."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(6.0, 0.9 * len(labels) + 3), 3.8))
    positions = range(len(labels))
    left.bar(positions, [v or 0 for v in aa], yerr=aa_err, capsize=3, color="tab:blue")
    left.set_ylabel("average accuracy AA (%)")
    left.set_ylim(0, 100)
    right.bar(positions, [v or 0 for v in bwt], yerr=bwt_err, capsize=3, color="tab:red")
    right.set_ylabel("backward transfer BWT (points)")
    right.axhline(0, color="black", linewidth=0.8)
    for axes, values, errors in ((left, aa, aa_err), (right, bwt, bwt_err)):
        axes.set_xticks(list(positions), labels, rotation=45, ha="right")
        axes.grid(axis="y", alpha=0.3)
        below, above = _bar_extents(errors, len(labels))
        for x, value in zip(positions, values):
            # The label goes past the end of the error bar, where it cannot be crossed by it.
            up = (value or 0) >= 0
            y = (value or 0) + (above[x] if up else -below[x])
            axes.annotate("n/a" if value is None else f"{value:.1f}", (x, y), ha="center",
                          va="bottom" if up else "top", fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)
