"""Detection before merging: score each incoming model by how far its task vector points along the defender's own
injection BVs, flag outliers without labels, and measure the separation (ROC AUC). Plain tensor math on state dicts.

    τ_m        = θ_m − θ_pre                                   (the model's task vector)
    c_b(m, v)  = cos(τ_m|_b, v|_b)                             per block b (backdoor_vectors.block_of), v a defender BV
    score(m)   = max_v  mean_b c_b(m, v)                       (aggregate "mean"; "max": max_b; "whole": cos(τ_m, v))
    projected  (``references``: the defender's clean task vector τ_c of each pair, per tensor t):
                 τ_m ← τ_m − proj_{τ_c} τ_m,  v ← v − proj_{τ_c} v   before the cosines. Without it a model's task
                 dominates the score: a clean fine-tune of the defender's task has τ ≈ τ_c, and a BV points against
                 τ_c (the poisoned run learns less of the clean task), so every model of that task scores low.
    flagged(m) ⇔ z(m) = 0.6745·(score(m) − median) / MAD > threshold (3.5)
                 over the scores of the models considered together (modified z-score, Iglewicz & Hoaglin; one-sided:
                 only a high score is suspicious); MAD = 0: 1.2533·mean absolute deviation instead; both 0: none flagged
    AUC        = P(score_bd > score_clean) + ½·P(score_bd = score_clean)   (Mann–Whitney, over every pair)

Labels enter only ``roc_auc``; the scores and the flags never see them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .backdoor_vectors import cosine_similarity, project_out
from .io import MergeInputError

__all__ = ["AGGREGATES", "block_cosines", "flag_outliers", "model_score", "modified_z_scores", "roc_auc"]

AGGREGATES = ("mean", "max", "whole")
StateDict = Mapping[str, torch.Tensor]


def block_cosines(task_vector: StateDict, vector: StateDict) -> dict[str, float]:
    """{block: cos(τ|_b, v|_b)} (a zero part has cosine 0)."""
    return cosine_similarity(task_vector, vector, per_block=True)


def model_score(task_vector: StateDict, vectors: Sequence[StateDict], aggregate: str = "mean",
                references: Sequence[StateDict] | None = None) -> tuple[float, dict]:
    """(score, {block: the per-block cosine with the BV that gave the score}) of one model against the defender's BVs;
    ``references[i]``: the defender's clean task vector of ``vectors[i]``'s pair, projected out of both first."""
    if aggregate not in AGGREGATES:
        raise MergeInputError(f"aggregate={aggregate!r} is unknown; use one of {', '.join(AGGREGATES)}")
    if not vectors:
        raise MergeInputError("no defender backdoor vectors given; pass at least one")
    if references is not None and len(references) != len(vectors):
        raise MergeInputError(f"{len(references)} reference task vectors for {len(vectors)} backdoor vectors; give one "
                              "per defender pair")
    best = None
    original = task_vector
    for i, vector in enumerate(vectors):
        task_vector = original
        if references is not None:
            task_vector, vector = project_out(original, references[i]), project_out(vector, references[i])
        blocks = block_cosines(task_vector, vector)
        if aggregate == "whole":
            score = cosine_similarity(task_vector, vector)
        elif aggregate == "max":
            score = max(blocks.values())
        else:
            score = sum(blocks.values()) / len(blocks)
        if best is None or score > best[0]:
            best = (score, blocks)
    return best


def modified_z_scores(scores: Sequence[float]) -> list[float]:
    """0.6745·(s − median)/MAD per score (MAD = 0: (s − median)/(1.2533·mean absolute deviation)); all 0 when the
    scores do not spread at all."""
    values = [float(s) for s in scores]
    if not values:
        return []
    median = _median(values)
    deviations = [abs(v - median) for v in values]
    mad = _median(deviations)
    if mad > 0:
        return [0.6745 * (v - median) / mad for v in values]
    mean_ad = sum(deviations) / len(deviations)
    if mean_ad > 0:
        return [(v - median) / (1.253314 * mean_ad) for v in values]
    return [0.0 for _ in values]


def _median(values: Sequence[float]) -> float:
    """The median; the mean of the two middle values for an even count."""
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def flag_outliers(scores: Sequence[float], threshold: float = 3.5) -> list[bool]:
    """True for every score whose modified z-score exceeds ``threshold`` (high side only)."""
    return [z > threshold for z in modified_z_scores(scores)]


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (True = backdoored): the fraction of (backdoored, clean)
    pairs the score orders correctly, ties counting one half. Both classes must be present."""
    if len(scores) != len(labels):
        raise MergeInputError(f"{len(scores)} scores for {len(labels)} labels; give one label per model")
    positive = [float(s) for s, y in zip(scores, labels) if y]
    negative = [float(s) for s, y in zip(scores, labels) if not y]
    if not positive or not negative:
        raise MergeInputError("ROC AUC needs backdoored and clean models; label at least one of each")
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positive for n in negative)
    return wins / (len(positive) * len(negative))
