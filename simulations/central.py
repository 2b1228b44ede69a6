"""Central reference students: the federation's student trained on one machine.

A federated student is judged against what the same model could learn without federation:
:func:`train_central_student` builds exactly the student a federation with ``config`` starts
from (:func:`fedrank.server.student_setup.build_student`: architecture, device feature columns, the
server's feature transform, seed) and trains it on the whole training split at once, for the
same number of passes over the data a client makes (``num-server-rounds * local-epochs``),
with the run's learning rate, batch size and loss weights. ``labels="all"`` uses every set's
labels (the "central student, all labels" reference: every client's labels pooled);
``labels="scarce"`` keeps the run's ``label-fraction``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedrank.client.trainer import TrainSettings, train_student
from fedrank.common.config import FedrankConfig
from fedrank.common.datasets import Dataset, load_dataset
from fedrank.common.errors import ConfigError
from fedrank.common.evaluation import evaluate_model
from fedrank.common.models import StudentModel, count_parameters
from fedrank.common.partitioners import label_availability
from fedrank.server.student_setup import build_student

__all__ = ["CentralResult", "train_central_student"]

LABEL_CHOICES = ("all", "scarce")


@dataclass(frozen=True)
class CentralResult:
    """A centrally trained student and its metrics on the run's evaluation split."""

    model: StudentModel
    metrics: dict[str, float]
    parameters: int
    epochs: int
    label_sets: int  # training sets whose labels were used


def train_central_student(
    config: Mapping[str, Any],
    *,
    labels: str = "all",
    teacher_scores: Mapping[str, np.ndarray] | None = None,
    dataset: Dataset | None = None,
) -> CentralResult:
    """Train the run's student centrally (see the module docstring).

    ``config``: the run's configuration keys; its loss weights are used as they are (give the
    labels-only weights for a labels-only reference). ``teacher_scores``: ``{"train": ...,
    "eval": ...}`` flat teacher logits aligned with the training and evaluation splits, needed
    when the loss uses the teacher; ``eval`` also adds teacher-agreement metrics.
    """
    if labels not in LABEL_CHOICES:
        raise ConfigError(f"central student: labels must be one of {LABEL_CHOICES}, got {labels!r}")
    cfg = FedrankConfig.from_run_config(dict(config))
    dataset = dataset or load_dataset(cfg.data_path, seed=cfg.seed)
    train = dataset.splits["train"]
    sets = dataset.splits[cfg.eval_split]
    scores = dict(teacher_scores or {})
    loss = cfg.composite_loss()
    if loss.needs_teacher and "train" not in scores:
        raise ConfigError("central student: the loss uses the teacher, give teacher_scores")
    mask = None
    if labels == "scarce" and cfg.label_fraction < 1.0:
        mask = label_availability(train.num_sets, cfg.label_fraction, seed=cfg.seed)
    model = build_student(cfg, dataset)
    epochs = cfg.num_server_rounds * max(cfg.local_epochs, 1)
    # the federation's optimiser settings, for whole epochs (no step floor or fixed count)
    settings = replace(
        TrainSettings.from_config(cfg, seed=cfg.seed), epochs=epochs, min_steps=0, steps=0
    )
    train_student(model, train, loss, settings, teacher=scores.get("train"), label_mask=mask)
    metrics = evaluate_model(model, sets, teacher=scores.get("eval"))
    return CentralResult(
        model=model,
        metrics={k: float(v) for k, v in metrics.items()},
        parameters=count_parameters(model),
        epochs=epochs,
        label_sets=int(train.num_sets if mask is None else mask.sum()),
    )
