"""Ranking models: a set-aware teacher for the server and a small per-item student for devices.

Both models score padded batches: ``forward(features [B, N, F], mask [B, N]) -> [B, N]`` logits,
with ``mask`` True for real items. Scores of padded items are returned as ``0`` and the content
of padded items never changes the scores of real items.

- :class:`TeacherModel` sees every feature and every other item of the set: an item MLP encoder,
  Transformer encoder layers whose self-attention runs across the items of a set (padded items
  are masked out as keys), and an MLP head. It is the context-aware learning-to-rank architecture
  of "Context-Aware Learning to Rank with Self-Attention" (Pobrotyn et al., allRank) without
  positional encodings, so it is permutation equivariant over the items of a set.
- :class:`StudentModel` scores each item on its own from the columns ``feature_indices`` of the
  input with a linear model or a tiny MLP: cheap enough to run on a device.

Both take an optional :class:`~fedrank.common.feature_transform.FeatureTransform` (``transform=``):
the per-column normalisation the server fitted on the full data, applied to the raw features first
(the student's covers only the columns it reads). Its values are buffers under ``transform.``
in the state dict and its shape is ``spec["transform"]`` (``None``: no transform).

Every model has a JSON-able ``.spec``; :func:`build_model` rebuilds an untrained model of the
same shape from it (load the weights with ``load_state_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fedrank.common.errors import ConfigError, DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.feature_transform import FeatureTransform

__all__ = [
    "TeacherModel",
    "StudentModel",
    "build_model",
    "count_parameters",
    "score_sets",
    "MODEL_KINDS",
]

MODEL_KINDS = ("teacher", "student")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"model option {name!r} must be a positive integer, got {value!r}")
    return int(value)


def _check_transform(transform: Any, width: int, model: str) -> FeatureTransform | None:
    if transform is None:
        return None
    if not isinstance(transform, FeatureTransform):
        raise ConfigError(
            f"{model} option 'transform' must be a FeatureTransform or None, "
            f"got {type(transform).__name__}"
        )
    if transform.num_features != width:
        raise ConfigError(
            f"{model} reads {width} feature columns, its transform was fitted on "
            f"{transform.num_features}"
        )
    return transform


def _transform_spec(transform: FeatureTransform | None) -> dict[str, Any] | None:
    return None if transform is None else transform.spec


def _check_width(features: torch.Tensor, num_features: int, model: str) -> None:
    if features.dim() != 3:
        raise DataFormatError(
            f"{model} expects features [B, N, F], got shape {tuple(features.shape)}"
        )
    if features.shape[-1] != num_features:
        raise DataFormatError(
            f"{model} was built for {num_features} features, input has {features.shape[-1]}"
        )


class TeacherModel(nn.Module):
    """Set-aware scorer: item encoder -> self-attention across the set's items -> MLP head.

    Args:
        num_features: width ``F`` of the input features.
        d_model: width of the item embeddings and of the attention layers.
        num_heads: attention heads (must divide ``d_model``).
        num_layers: Transformer encoder layers (pre-norm, feed-forward width ``4 * d_model``).
        dropout: dropout inside the encoder layers and the head.
        transform: the feature transform over all ``num_features`` columns (None: none).

    Rows with no real item are safe: they return all-zero scores, never NaN.
    """

    kind = "teacher"

    def __init__(
        self,
        num_features: int,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        dropout: float = 0.1,
        transform: FeatureTransform | None = None,
    ) -> None:
        super().__init__()
        num_features = _positive_int("num_features", num_features)
        self.transform = _check_transform(transform, num_features, "TeacherModel")
        d_model = _positive_int("d_model", d_model)
        num_heads = _positive_int("num_heads", num_heads)
        if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
            raise ConfigError(f"model option 'num_layers' must be an integer, got {num_layers!r}")
        if num_layers < 0:
            raise ConfigError(f"model option 'num_layers' must be >= 0, got {num_layers}")
        if d_model % num_heads:
            raise ConfigError(
                f"model option 'd_model' ({d_model}) must be divisible by 'num_heads' ({num_heads})"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise ConfigError(f"model option 'dropout' must be a number, got {dropout!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ConfigError(f"model option 'dropout' must lie in [0, 1), got {dropout}")
        self.num_features = num_features
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_layers = int(num_layers)
        self.dropout = float(dropout)

        self.encoder = nn.Sequential(
            nn.Linear(num_features, d_model),
            nn.GELU(),
            nn.Linear(d_model, d_model),
        )
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model,
                num_heads,
                dim_feedforward=4 * d_model,
                dropout=self.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(self.num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Sequential(
            nn.Linear(d_model, d_model),
            nn.GELU(),
            nn.Dropout(self.dropout),
            nn.Linear(d_model, 1),
        )

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_features": self.num_features,
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
            "feature_indices": None,
            "transform": _transform_spec(self.transform),
        }

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, N]`` for ``features [B, N, F]``; ``mask`` (bool ``[B, N]``) marks real
        items (None: all real). Padded items score 0."""
        _check_width(features, self.num_features, "TeacherModel")
        b, n, _ = features.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        mask = mask.to(torch.bool)
        if self.transform is not None:
            features = self.transform(features)
        # padded items are zeroed before the encoder, so their content can never leak in
        x = features.masked_fill(~mask.unsqueeze(-1), 0.0)
        h = self.encoder(x)
        # A row with no real item would attend to nothing (softmax over -inf -> NaN): let such
        # rows attend to their first slot; their outputs are discarded below.
        attend = mask.clone()
        if n > 0:
            attend[:, 0] |= ~mask.any(dim=1)
        padding = ~attend
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=padding)
            h = h.masked_fill(~attend.unsqueeze(-1), 0.0)
        out = self.head(self.norm(h)).squeeze(-1)
        return out.masked_fill(~mask, 0.0)


class StudentModel(nn.Module):
    """Per-item scorer over the columns ``feature_indices`` of the input.

    Args:
        num_features: width ``F`` of the input it is given (all columns, as the teacher sees).
        hidden: hidden layer widths of the MLP (ReLU); ``()`` gives a linear model.
        feature_indices: the input columns the student may use (what a device can compute);
            ``None`` uses all columns. Stored as a buffer, so it travels with the weights.
        transform: the feature transform of the columns it reads (``len(feature_indices)``
            wide, e.g. ``FeatureTransform.subset(feature_indices)``; None: none).
    """

    kind = "student"

    def __init__(
        self,
        num_features: int,
        hidden: Sequence[int] | int = (16,),
        feature_indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        transform: FeatureTransform | None = None,
    ) -> None:
        super().__init__()
        num_features = _positive_int("num_features", num_features)
        if isinstance(hidden, (int, np.integer)) and not isinstance(hidden, bool):
            hidden = (int(hidden),)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, (Sequence, np.ndarray)):
            raise ConfigError(f"model option 'hidden' must be a list of widths, got {hidden!r}")
        widths = tuple(_positive_int("hidden", h) for h in hidden)
        self.num_features = num_features
        self.hidden = widths
        if feature_indices is None:
            self._all_columns = True
            cols = np.arange(num_features, dtype=np.int64)
        else:
            self._all_columns = False
            if isinstance(feature_indices, torch.Tensor):
                feature_indices = feature_indices.detach().cpu().numpy()
            raw = np.asarray(feature_indices)
            if raw.ndim != 1 or raw.size == 0 or not np.issubdtype(raw.dtype, np.integer):
                raise ConfigError(
                    "model option 'feature_indices' must be a non-empty list of column indices, "
                    f"got {feature_indices!r}"
                )
            cols = raw.astype(np.int64)
            if cols.min() < 0 or cols.max() >= num_features:
                raise ConfigError(
                    f"model option 'feature_indices' must lie in 0..{num_features - 1}, "
                    f"got {cols.min()}..{cols.max()}"
                )
            if np.unique(cols).size != cols.size:
                raise ConfigError("model option 'feature_indices' repeats a column")
        self.register_buffer("feature_indices", torch.from_numpy(cols.copy()))
        self.transform = _check_transform(transform, int(cols.size), "StudentModel")
        layers: list[nn.Module] = []
        width = int(cols.size)
        for h in widths:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    @property
    def spec(self) -> dict[str, Any]:
        cols = None if self._all_columns else [int(c) for c in self.feature_indices.tolist()]
        return {
            "kind": self.kind,
            "num_features": self.num_features,
            "hidden": list(self.hidden),
            "feature_indices": cols,
            "transform": _transform_spec(self.transform),
        }

    @property
    def num_inputs(self) -> int:
        """Number of feature columns the student reads."""
        return int(self.feature_indices.numel())

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, N]`` for ``features [B, N, F]``; with ``mask``, padded items score 0."""
        _check_width(features, self.num_features, "StudentModel")
        x = features.index_select(-1, self.feature_indices)
        if self.transform is not None:
            x = self.transform(x)
        out = self.net(x).squeeze(-1)
        if mask is not None:
            out = out.masked_fill(~mask.to(torch.bool), 0.0)
        return out


_SPEC_KEYS = {
    "teacher": {
        "kind",
        "num_features",
        "d_model",
        "num_heads",
        "num_layers",
        "dropout",
        "feature_indices",
        "transform",
    },
    "student": {"kind", "num_features", "hidden", "feature_indices", "transform"},
}


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild an (untrained) model from its ``.spec``; raises ConfigError on a bad spec."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"model spec must be a mapping, got {type(spec).__name__}")
    kind = spec.get("kind")
    if kind not in _SPEC_KEYS:
        raise ConfigError(f"model spec 'kind' must be one of {list(MODEL_KINDS)}, got {kind!r}")
    unknown = sorted(set(spec) - _SPEC_KEYS[kind])
    if unknown:
        raise ConfigError(
            f"unknown keys in {kind} model spec: {unknown}; valid: {sorted(_SPEC_KEYS[kind])}"
        )
    if "num_features" not in spec:
        raise ConfigError(f"{kind} model spec is missing 'num_features'")
    options = {k: v for k, v in spec.items() if k != "kind"}
    transform_spec = options.pop("transform", None)
    if transform_spec is not None:
        options["transform"] = FeatureTransform.from_spec(transform_spec)
    if kind == "teacher":
        if options.pop("feature_indices", None) is not None:
            raise ConfigError("teacher model spec: 'feature_indices' must be null (uses all)")
        return TeacherModel(**options)
    hidden = options.get("hidden", (16,))
    if isinstance(hidden, list):
        options["hidden"] = tuple(hidden)
    return StudentModel(**options)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as ``feature_indices`` are not counted)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


@torch.no_grad()
def score_sets(model: nn.Module, sets: ExampleSets, batch_size: int = 256) -> np.ndarray:
    """Scores of every item of ``sets`` as a flat float32 array in item order.

    Runs in eval mode without gradients (the model's previous mode is restored) on the device
    of the model's parameters, in size-bucketed batches of ``batch_size`` sets.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    out = np.empty(sets.num_items, dtype=np.float32)
    try:
        for positions in sets.batch_positions(batch_size, bucket=True):
            batch = sets.pad(positions)
            mask = batch.mask.to(device)
            scores = model(batch.features.to(device), mask)
            items = sets.item_index(positions)
            out[items] = scores[mask].float().cpu().numpy()
    finally:
        model.train(was_training)
    if not np.all(np.isfinite(out)):
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        set_pos = int(np.searchsorted(sets.offsets, bad, side="right") - 1)
        raise FloatingPointError(
            f"model produced a non-finite score for set {sets.set_ids[set_pos]!r}"
        )
    return out
