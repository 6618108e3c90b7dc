"""Exact match, ROUGE and the continual-learning metrics (AA, BWT, FWT, forgetting FT).

Per-example scoring follows upstream `compute_metrics.py` (gorp_olora_spec.md §1.3,
deal_spec.md §2.5): normalise (lower-case, drop ASCII punctuation, collapse whitespace), then
string equality, reported in percent.

Accuracy matrix convention used everywhere in dealcl:

    R[i][j] = exact match (percent) on task j after training stage i (0-based),
    T rows (stages) x T columns (tasks in sequence order), None where not evaluated or missing.
    reference[j] = zero-shot exact match of the untouched model on task j (stage 0), may be None.

AA is the **macro** mean over tasks of the last row (deal_spec.md §2.7), not upstream's
sample-weighted `predict_exact_match`. Missing entries are skipped, never counted as zero; the
caller reports them (`summarize` lists them under "missing").
"""
from __future__ import annotations

import functools
import string
from typing import Optional, Sequence

Matrix = Sequence[Sequence[Optional[float]]]

_PUNCTUATION = set(string.punctuation)


# --- per-example scores (gorp_olora_spec.md §1.3) ---------------------------------------------

def normalize_answer(s: str) -> str:
    """Upstream normalisation: lower-case, remove ASCII punctuation, collapse whitespace."""
    without_punctuation = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(without_punctuation.split())


def exact_match(prediction: str, label: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(label)


ROUGE_TYPES = ("rouge1", "rougeL")


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    """One Google `rouge-score` scorer for all examples (upstream rebuilds it per example)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, label: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measures (0..1) from Google's `rouge-score` with the Porter stemmer,
    on the raw strings, as upstream `compute_metrics.py` scores (deal_spec.md §2.5): its tokenizer
    lower-cases and splits on anything not a-z or 0-9."""
    scores = _rouge_scorer().score(target=label, prediction=prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def rouge_l(prediction: str, label: str) -> float:
    """ROUGE-L F-measure (0..1), stemmed, as `rouge` computes it."""
    return rouge(prediction, label)["rougeL"]


def score_task(predictions: list[str], labels: list[str], label_set: list[str], *, with_rouge: bool = False) -> dict:
    """Scores of one task's test set after one stage, all in percent.

    exact_match: upstream EM x 100. invalid_rate: share of predictions that are not (after
    normalisation) any label of the task's closed label set. rouge1 and rougeL (with_rouge): mean
    ROUGE-1 and ROUGE-L F-measure x 100 (`rouge`), the scale upstream logs. Empty inputs or
    mismatched lengths are a bug: ValueError."""
    if not predictions:
        raise ValueError("score_task needs at least one prediction")
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not label_set:
        raise ValueError("score_task needs the task's label set")
    n = len(predictions)
    allowed = {normalize_answer(label) for label in label_set}
    normalized = [normalize_answer(p) for p in predictions]
    correct = sum(p == normalize_answer(label) for p, label in zip(normalized, labels))
    invalid = sum(p not in allowed for p in normalized)
    scores = {"exact_match": 100.0 * correct / n, "invalid_rate": 100.0 * invalid / n, "n": n}
    if with_rouge:
        per_example = [rouge(p, label) for p, label in zip(predictions, labels)]
        for name in ROUGE_TYPES:
            scores[name] = 100.0 * sum(r[name] for r in per_example) / n
    return scores


# --- continual-learning metrics over the accuracy matrix ---------------------------------------

def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _entry(R: Matrix, i: int, j: int) -> float | None:
    row = R[i]
    return row[j] if j < len(row) else None


def average_accuracy(R: Matrix) -> float | None:
    """AA: macro mean over tasks of the last row, over the entries present (deal_spec.md §2.7).

    None only when the whole last row is missing. Works for a joint (one-row) matrix too."""
    if not R:
        return None
    return _mean([v for v in R[-1] if v is not None])


def backward_transfer_terms(R: Matrix) -> dict[int, float]:
    """Task index j → R[T][j] − R[j][j] for every j < T where both are known (gorp_olora_spec.md §1.3)."""
    last = len(R) - 1
    terms = {}
    for j in range(last):
        final, just_learned = _entry(R, last, j), _entry(R, j, j)
        if final is not None and just_learned is not None:
            terms[j] = final - just_learned
    return terms


def backward_transfer(R: Matrix) -> float | None:
    """BWT = mean over j < T of R[T][j] − R[j][j], skipping unknown pairs; None when T == 1 or none known."""
    return _mean(list(backward_transfer_terms(R).values()))


def forward_transfer_terms(R: Matrix, reference: Sequence[Optional[float]] | None) -> dict[int, float]:
    """Task index j ≥ 1 → R[j−1][j] − b[j] (accuracy on task j just before learning it, minus zero-shot)."""
    if reference is None:
        return {}
    terms = {}
    for j in range(1, min(len(R), len(reference))):
        before, zero_shot = _entry(R, j - 1, j), reference[j]
        if before is not None and zero_shot is not None:
            terms[j] = before - zero_shot
    return terms


def forward_transfer(R: Matrix, reference: Sequence[Optional[float]] | None) -> float | None:
    """FWT = mean over tasks 2..T of R[j−1][j] − b[j] where both are known; None otherwise.

    Upstream never evaluates a task before learning it, so its logs give no FWT."""
    return _mean(list(forward_transfer_terms(R, reference).values()))


def forgetting(R: Matrix) -> list[float | None]:
    """Per task j < T: max over stages i in [j, T−1) of R[i][j] − R[T][j]; None for the last task
    or when the final entry or every earlier entry is unknown.

    The max starts at the stage that learned task j: with eval_all_stages a task is also scored
    before it is learned, and that score is forward transfer, not knowledge that can be
    forgotten. GainLoRA/InfLoRA predict only the tasks seen so far, so on their matrices this is
    their max over j < T (new_methods_spec.md §5)."""
    last = len(R) - 1
    n_tasks = len(R[0]) if R else 0
    result: list[float | None] = []
    for j in range(n_tasks):
        final = _entry(R, last, j)
        earlier = [_entry(R, i, j) for i in range(j, last)]
        earlier = [v for v in earlier if v is not None]
        result.append(max(earlier) - final if final is not None and earlier and j < last else None)
    return result


def mean_forgetting(R: Matrix) -> float | None:
    """FT, the forgetting GainLoRA and InfLoRA publish next to AP (= AA): the mean over tasks
    j < T of `forgetting` (new_methods_spec.md §5), skipping unknown terms. FT ≥ −BWT, with
    equality when every task peaks on its own stage. results.json keeps it as `mean_forgetting`."""
    return _mean([v for v in forgetting(R) if v is not None])


# --- results.json --------------------------------------------------------------------------------

def _round(value):
    """Round floats to 4 decimals (recursively) so identical runs give byte-identical JSON."""
    if isinstance(value, float):
        rounded = round(value, 4)
        return 0.0 if rounded == 0 else rounded  # no "-0.0"
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def missing_entries(task_order: Sequence[str], R: Matrix, *, joint: bool = False) -> list[list]:
    """[stage (1-based), task] pairs the headline metrics need but lack: the last row and, for a
    continual run, the diagonal (each task right after learning it)."""
    if not R:
        return [[1, task] for task in task_order]
    last = len(R) - 1
    needed = [(last, j) for j in range(len(task_order))]
    if not joint:
        needed = [(j, j) for j in range(min(last, len(task_order)))] + needed
    return [[i + 1, task_order[j]] for i, j in needed if _entry(R, i, j) is None]


def summarize(
    task_order: list[str],
    R: Matrix,
    reference: Sequence[Optional[float]] | None = None,
    invalid: Matrix | None = None,
    unknown_labels: dict[str, int] | None = None,
    *,
    joint: bool = False,
    rouge: dict[str, tuple[Matrix, Sequence[Optional[float]] | None]] | None = None,
) -> dict:
    """The content of results.json.

    joint=True: a multi-task run, one row covering all tasks; only AA is defined, BWT, FWT and
    forgetting are None. `rouge` (with_rouge runs): per ROUGE type ("rouge1", "rougeL") its
    matrix, laid out as R, and its zero-shot row; they go in as `<type>_matrix`,
    `reference_<type>` and `average_<type>` (the macro mean of the last row, as AA)."""
    if joint:
        bwt = fwt = mean_forget = None
        per_task_forgetting: list[float | None] = [None] * len(task_order)
    else:
        bwt, fwt = backward_transfer(R), forward_transfer(R, reference)
        per_task_forgetting, mean_forget = forgetting(R), mean_forgetting(R)
    summary = {
        "task_order": list(task_order),
        "joint": joint,
        "accuracy_matrix": [list(row) for row in R],
        "reference": list(reference) if reference is not None else None,
        "invalid_rate_matrix": [list(row) for row in invalid] if invalid is not None else None,
        "average_accuracy": average_accuracy(R),
        "backward_transfer": bwt,
        "forward_transfer": fwt,
        "forgetting": dict(zip(task_order, per_task_forgetting)),
        "mean_forgetting": mean_forget,
        "missing": missing_entries(task_order, R, joint=joint),
        "unknown_test_labels": dict(unknown_labels) if unknown_labels is not None else None,
    }
    for name, (matrix, zero_shot) in (rouge or {}).items():
        summary[f"{name}_matrix"] = [list(row) for row in matrix]
        summary[f"reference_{name}"] = list(zero_shot) if zero_shot is not None else None
        summary[f"average_{name}"] = average_accuracy(matrix)
    return _round(summary)
