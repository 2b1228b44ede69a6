"""Server-side evaluation of the global student on held-out sets, as Flower's ``evaluate_fn``.

:func:`make_evaluate_fn` returns a callable ``(server_round, arrays) -> MetricRecord`` (the
signature of ``Strategy.start``'s ``evaluate_fn``) that loads the weights into a copy of the
student and reports NDCG@1/5/10, MAP, MRR, log loss, ... and, with the teacher's scores of the
same sets, teacher-student Kendall tau, Spearman and top-10 overlap.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from fedrank.common.evaluation import evaluate_model
from fedrank.common.example_sets import ExampleSets
from fedrank.common.records import load_arrays

__all__ = ["make_evaluate_fn"]


def make_evaluate_fn(
    template: torch.nn.Module, sets: ExampleSets, teacher: np.ndarray | None = None
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """An ``evaluate_fn`` for the global student on ``sets``."""
    model = copy.deepcopy(template)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.perf_counter()
        load_arrays(model, arrays)
        metrics = evaluate_model(model, sets, teacher=teacher)
        metrics["eval_seconds"] = time.perf_counter() - start
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    return evaluate_fn
