"""Per-column feature normalisation fitted on the server and shipped inside every model.

Raw ranking features span many orders of magnitude (term counts, BM25, PageRank-like values
from 0 to 1e5 and beyond). A small per-item student trained on them directly diverges; a
fixed, data-fitted transform in front of the model fixes that without any client ever seeing
another client's data:

    z_j = clip((g_j(x_j) - shift_j) / scale_j, -clip, clip)
    g_j(x) = sign(x) * log1p(|x|)   for the heavy-tailed columns (``log_columns``)
    g_j(x) = x                       for the others

:class:`FeatureTransform` is an ``nn.Module`` with buffers only (``log_columns`` bool,
``shift`` and ``scale`` float32; no parameters, nothing to train), so its values travel in the
state dict (``transform.*`` keys inside a model), in Flower's ``ArrayRecord``, in checkpoints
and in exports; its ``spec`` (width and clip) lets :func:`fedrank.common.models.build_model` rebuild
it before ``load_state_dict(strict=True)`` fills it.

:meth:`FeatureTransform.fit` chooses the columns and values from a feature matrix:

- **heavy tail** (robust, scale-free): a column is logged when its most extreme finite value
  lies more than ``HEAVY_TAIL_Z`` robust standard deviations from its median (robust scale:
  the interquartile range / 1.349, or a wider quantile range when that is 0) *and* the signed
  log1p shrinks that robust z by at least half. Gaussian (z about 4.5 at 1e5 rows), uniform
  (about 1.4) and exponential (about 13) columns stay linear; log-normal, power-law counts and
  zero-inflated counts are logged;
- **standardisation**: mean and standard deviation of the (logged) finite values;
- **constant and all-zero columns** (standard deviation ~0): ``scale = 1``, ``shift`` = the
  value, so they map to exactly 0;
- **non-finite inputs** never reach the model as NaN: NaN maps to 0 (the column mean) and
  +-inf to +-``clip``. Standardised values are clipped to ``[-clip, clip]`` (default 10: a
  value ten standard deviations out carries no more information than one at ten, and the
  clip bounds what a hostile or broken feature can do to a score).

Non-finite values are ignored when fitting. Fitting is deterministic (no randomness).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedrank.common.errors import ConfigError, DataFormatError

__all__ = [
    "TRANSFORM_VERSION",
    "DEFAULT_CLIP",
    "HEAVY_TAIL_Z",
    "FeatureTransform",
    "fit_transform",
    "heavy_tail_z",
]

# changes whenever fitting or applying changes (part of the teacher cache key)
TRANSFORM_VERSION = "signed-log1p-standardize-v1"
DEFAULT_CLIP = 10.0
HEAVY_TAIL_Z = 20.0
# (lower quantile, upper quantile, width of that range for a unit normal) for the robust scale
_ROBUST_RANGES = ((0.25, 0.75, 1.3490), (0.10, 0.90, 2.5631), (0.01, 0.99, 4.6527))
# rows used to fit: an evenly spaced subsample beyond this (deterministic, keeps fitting fast)
_MAX_FIT_ROWS = 1_000_000


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def heavy_tail_z(values: np.ndarray) -> float:
    """Robust z of the most extreme finite value of ``values``: ``max |x - median| / s`` with
    ``s`` the first positive of IQR/1.349, (q90-q10)/2.563, (q99-q01)/4.653; ``inf`` when all
    those ranges are 0 but the values are not constant, 0 for a constant column."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0
    qs = np.quantile(v, [0.5, 0.01, 0.10, 0.25, 0.75, 0.90, 0.99])
    median = qs[0]
    spread = float(np.max(np.abs(v - median)))
    if spread == 0.0:
        return 0.0
    lookup = dict(zip((0.01, 0.10, 0.25, 0.75, 0.90, 0.99), qs[1:].tolist(), strict=True))
    for lo, hi, width in _ROBUST_RANGES:
        scale = (lookup[hi] - lookup[lo]) / width
        if scale > 0:
            return spread / scale
    return float("inf")


class FeatureTransform(nn.Module):
    """``x [..., F] -> clip((g(x) - shift) / scale, -clip, clip)`` per column (see the module
    docstring). Buffers: ``log_columns`` (bool ``[F]``), ``shift``, ``scale`` (float32 ``[F]``).

    Built untrained (``FeatureTransform(F)``: identity on finite values, up to the clip) and
    filled by :meth:`fit` or ``load_state_dict``.
    """

    def __init__(self, num_features: int, clip: float = DEFAULT_CLIP) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise ConfigError(
                f"transform option 'num_features' must be an integer, got {num_features!r}"
            )
        if num_features < 1:
            raise ConfigError(f"transform option 'num_features' must be >= 1, got {num_features}")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
            raise ConfigError(f"transform option 'clip' must be a number > 0, got {clip!r}")
        if not np.isfinite(clip):
            raise ConfigError(f"transform option 'clip' must be finite, got {clip!r}")
        self.num_features = int(num_features)
        self.clip = float(clip)
        self.register_buffer("log_columns", torch.zeros(self.num_features, dtype=torch.bool))
        self.register_buffer("shift", torch.zeros(self.num_features, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(self.num_features, dtype=torch.float32))

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        clip: float = DEFAULT_CLIP,
        heavy_tail: float = HEAVY_TAIL_Z,
    ) -> FeatureTransform:
        """Fit on a feature matrix ``[items, F]`` (see the module docstring)."""
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] < 1:
            raise DataFormatError(
                f"feature transform: expected features [items, F], got shape {x.shape}"
            )
        if x.shape[0] > _MAX_FIT_ROWS:
            x = x[np.linspace(0, x.shape[0] - 1, _MAX_FIT_ROWS).astype(np.int64)]
        width = x.shape[1]
        log_columns = np.zeros(width, dtype=bool)
        shift = np.zeros(width, dtype=np.float64)
        scale = np.ones(width, dtype=np.float64)
        for j in range(width):
            col = x[:, j].astype(np.float64)
            col = col[np.isfinite(col)]
            if col.size == 0:
                continue  # no finite value: shift 0, scale 1 (inputs map through the clip)
            z_raw = heavy_tail_z(col)
            if z_raw > heavy_tail:
                logged = _signed_log1p(col)
                if heavy_tail_z(logged) <= 0.5 * z_raw:
                    log_columns[j] = True
                    col = logged
            mean = float(col.mean())
            std = float(col.std())
            shift[j] = mean
            # constant (or numerically constant) columns map to exactly 0
            if std > 1e-7 * max(1.0, abs(mean)):
                scale[j] = std
        out = cls(width, clip=clip)
        out.log_columns.copy_(torch.from_numpy(log_columns))
        out.shift.copy_(torch.from_numpy(shift.astype(np.float32)))
        out.scale.copy_(torch.from_numpy(scale.astype(np.float32)))
        return out

    def subset(self, columns: Sequence[int] | np.ndarray | torch.Tensor) -> FeatureTransform:
        """The transform of ``columns`` only (for a model that reads those columns)."""
        idx = torch.as_tensor(np.asarray(columns, dtype=np.int64))
        out = FeatureTransform(int(idx.numel()), clip=self.clip)
        out.log_columns.copy_(self.log_columns[idx])
        out.shift.copy_(self.shift[idx])
        out.scale.copy_(self.scale[idx])
        return out

    @property
    def spec(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "clip": self.clip}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> FeatureTransform:
        """An unfilled transform of the shape ``spec`` describes (ConfigError on a bad spec)."""
        if not isinstance(spec, Mapping):
            raise ConfigError(f"transform spec must be a mapping, got {type(spec).__name__}")
        unknown = sorted(set(spec) - {"num_features", "clip"})
        if unknown:
            raise ConfigError(
                f"unknown keys in transform spec: {unknown}; valid: clip, num_features"
            )
        if "num_features" not in spec:
            raise ConfigError("transform spec is missing 'num_features'")
        return cls(spec["num_features"], clip=spec.get("clip", DEFAULT_CLIP))

    def describe(self) -> dict[str, Any]:
        """What a log or a summary shows: width, logged columns, clip."""
        return {
            "columns": self.num_features,
            "log_columns": [int(c) for c in torch.nonzero(self.log_columns).flatten().tolist()],
            "clip": self.clip,
        }

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.num_features:
            raise DataFormatError(
                f"feature transform was fitted on {self.num_features} columns, input has "
                f"{x.shape[-1]}"
            )
        x = x.to(self.shift.dtype)
        logged = torch.sign(x) * torch.log1p(torch.abs(x))
        x = torch.where(self.log_columns, logged, x)
        z = (x - self.shift) / self.scale
        z = torch.nan_to_num(z, nan=0.0, posinf=self.clip, neginf=-self.clip)
        return z.clamp(-self.clip, self.clip)


def fit_transform(*parts: Any, clip: float = DEFAULT_CLIP) -> FeatureTransform:
    """Fit on the features of one or more ``ExampleSets`` (e.g. train and vali; never test)."""
    present = [p for p in parts if p is not None]
    if not present:
        raise DataFormatError("feature transform: no sets to fit on")
    if len(present) == 1:
        return FeatureTransform.fit(present[0].features, clip=clip)
    return FeatureTransform.fit(np.concatenate([p.features for p in present], axis=0), clip=clip)
