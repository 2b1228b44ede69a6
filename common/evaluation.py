"""The one evaluator: ranking metrics of scores (or of a model's scores) on example sets.

Every place that measures a ranker goes through here, so the teacher, the server's global
student, a client's local model, the central references and an exported student file are
measured the same way (``docs/metrics_models.md`` has the conventions: NDCG gain ``2^y - 1``,
a set without a relevant item counts 0, ties broken by item order):

- :func:`evaluate_scores`: the full summary of flat scores (NDCG@1/5/10, MAP, MRR, precision,
  pairwise accuracy, AUC, log loss, ECE; with the teacher's scores the teacher-student
  agreement; with the data's true relevance ``true_ndcg@10``; with a composite loss each
  loss term), plus ``num_examples``;
- :func:`evaluate_model`: the same for a model's scores;
- :func:`mean_ndcg`: mean NDCG@k only, in chunks (cheap enough for every epoch or round).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedrank.common.example_sets import ExampleSets
from fedrank.common.metrics import nanmean, ndcg, ranking_summary
from fedrank.common.models import score_sets

__all__ = ["evaluate_model", "evaluate_scores", "mean_ndcg"]


def evaluate_scores(
    sets: ExampleSets,
    scores: np.ndarray,
    *,
    teacher: np.ndarray | None = None,
    loss: Any = None,
) -> dict[str, float]:
    """Ranking metrics of flat ``scores`` (item order) on ``sets``.

    ``teacher``: the teacher's flat scores of the same items (adds ``kendall_tau``,
    ``spearman``, ``topk_overlap@10``); ``loss``: a :class:`~fedrank.common.losses.CompositeLoss`
    whose terms are reported as ``loss_<family>`` when they can be computed (the teacher's
    scores given, or not needed).
    """
    extra = {"s": np.asarray(scores, dtype=np.float32)}
    if teacher is not None:
        extra["t"] = teacher
    if sets.relevance is not None:
        extra["r"] = sets.relevance
    batch = sets.pad(extra=extra)
    t = batch.extra.get("t")
    summary = ranking_summary(batch.extra["s"], batch.labels, batch.mask, teacher=t)
    out = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
    if "r" in batch.extra:
        # synthetic data keeps the true relevance behind the clicks: rank quality against it
        # is what a user cares about (clicks are a noisy, position-biased view of it)
        true = ndcg(batch.extra["s"], batch.extra["r"], batch.mask, k=10)
        out["true_ndcg@10"] = float(torch.nanmean(true))
    if loss is not None and (t is not None or not loss.needs_teacher):
        with torch.no_grad():
            _, values = loss(batch.extra["s"], batch.labels, t, batch.mask)
        out.update({f"loss_{k}": float(v) for k, v in values.items()})
    out["num_examples"] = int(sets.num_sets)
    return out


def evaluate_model(
    model: torch.nn.Module,
    sets: ExampleSets,
    *,
    teacher: np.ndarray | None = None,
    loss: Any = None,
) -> dict[str, float]:
    """:func:`evaluate_scores` of ``model``'s scores on ``sets``."""
    return evaluate_scores(sets, score_sets(model, sets), teacher=teacher, loss=loss)


def mean_ndcg(sets: ExampleSets, scores: np.ndarray, ks: Sequence[int] = (10,)) -> dict[str, float]:
    """``{"ndcg@k": mean NDCG@k}`` of flat ``scores`` over ``sets``, padded in chunks of 512
    sets of similar size (memory stays small for any number of sets)."""
    out = {f"ndcg@{k}": 0.0 for k in ks}
    total = 0
    for positions in sets.batch_positions(512, bucket=True):
        batch = sets.pad(positions, extra={"s": scores})
        for k in ks:
            out[f"ndcg@{k}"] += nanmean(ndcg(batch.extra["s"], batch.labels, batch.mask, k)) * (
                batch.batch_size
            )
        total += batch.batch_size
    return {key: value / max(total, 1) for key, value in out.items()}
