"""The global student a run starts from, built one way for the server and the references.

:func:`build_student` picks the student's feature columns (the data's device columns, or what
``student-features`` / ``device-features`` say), fits the feature transform on the server's
training and validation sets (never the test split; ``feature-transform = false`` leaves it
out), and initialises the student with the run's seed. The server and the central reference
students of :mod:`fedrank.simulations.central` both call it, so they start from the same model.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrank.common.config import FedrankConfig
from fedrank.common.datasets import Dataset
from fedrank.common.feature_transform import FeatureTransform, fit_transform
from fedrank.common.models import StudentModel

__all__ = ["build_student", "fit_server_transform"]


def fit_server_transform(dataset: Dataset) -> FeatureTransform:
    """The transform over every column, fitted on ``train`` (+ ``vali``) features."""
    return fit_transform(dataset.splits["train"], dataset.splits.get("vali"))


def build_student(cfg: FedrankConfig, dataset: Dataset) -> StudentModel:
    """The untrained student of a run with ``cfg`` on ``dataset`` (seeded by ``cfg.seed``)."""
    columns = cfg.device_columns(
        dataset.num_features, default=np.asarray(dataset.student_columns).tolist()
    )
    transform = None
    if cfg.feature_transform:
        fitted = fit_server_transform(dataset)
        transform = fitted if columns is None else fitted.subset(columns)
    torch.manual_seed(cfg.seed)
    return StudentModel(
        dataset.num_features,
        hidden=cfg.hidden_sizes(),
        feature_indices=columns,
        transform=transform,
    )
