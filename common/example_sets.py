"""The example-set data model: a ragged container of sets, padding and size-bucketed batching.

An *example set* is the group of items shown together in one context (a query). Items of all
sets live in flat arrays; ``offsets`` marks where each set starts, so set ``k`` owns items
``offsets[k]:offsets[k + 1]``. Models and losses see padded ``[B, N_max, ...]`` tensors with a
boolean ``mask`` (True for real items); padding content is always zero and never meaningful.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from fedrank.common.errors import DataFormatError, FedrankError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PaddedBatch:
    """Sets ``positions`` of an :class:`ExampleSets`, padded to ``[B, N_max]``."""

    features: torch.Tensor  # [B, N, F] float32, zero where mask is False
    labels: torch.Tensor  # [B, N] float32, zero where mask is False
    mask: torch.Tensor  # [B, N] bool, True for real items
    positions: np.ndarray  # [B] int64, set positions in the source ExampleSets
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # per-item arrays, padded

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])


@dataclass(frozen=True, eq=False)
class ExampleSets:
    """Ragged example sets: flat item arrays plus per-set offsets.

    Attributes:
        features: ``[items, F]`` float32.
        labels: ``[items]`` float32 (binary or graded).
        offsets: ``[sets + 1]`` int64, ``offsets[0] == 0``, every set non-empty.
        set_ids: ``[sets]`` unique string ids (``qid`` in LETOR files).
        item_ids: optional ``[items]`` string ids (``docid``).
        relevance: optional ``[items]`` float32 true relevance (synthetic data only).
        feature_names: optional names of the ``F`` feature columns.
    """

    features: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    set_ids: np.ndarray
    item_ids: np.ndarray | None = None
    relevance: np.ndarray | None = None
    feature_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise dtypes once, here
        set_(self, "features", np.ascontiguousarray(self.features, dtype=np.float32))
        set_(self, "labels", np.ascontiguousarray(self.labels, dtype=np.float32))
        set_(self, "offsets", np.ascontiguousarray(self.offsets, dtype=np.int64))
        set_(self, "set_ids", np.asarray(self.set_ids).astype(str))
        if self.item_ids is not None:
            set_(self, "item_ids", np.asarray(self.item_ids).astype(str))
        if self.relevance is not None:
            set_(self, "relevance", np.ascontiguousarray(self.relevance, dtype=np.float32))
        if self.feature_names is not None:
            set_(self, "feature_names", tuple(str(n) for n in self.feature_names))
        self._validate()

    def _validate(self) -> None:
        f, y, off, ids = self.features, self.labels, self.offsets, self.set_ids
        if f.ndim != 2:
            raise DataFormatError(f"features must be [items, F], got shape {f.shape}")
        n_items = f.shape[0]
        if y.shape != (n_items,):
            raise DataFormatError(f"labels must be [{n_items}], got shape {y.shape}")
        if off.ndim != 1 or off.size < 1 or off[0] != 0 or off[-1] != n_items:
            raise DataFormatError(
                f"offsets must run from 0 to {n_items}, got {off[:3]}...{off[-3:]}"
            )
        if np.any(np.diff(off) <= 0):
            raise DataFormatError("every example set must hold at least one item")
        if ids.shape != (off.size - 1,):
            raise DataFormatError(f"set_ids must be [{off.size - 1}], got shape {ids.shape}")
        if np.unique(ids).size != ids.size:
            values, counts = np.unique(ids, return_counts=True)
            repeated = values[counts > 1][:5].tolist()
            raise DataFormatError(f"set ids must be unique; repeated: {repeated}")
        for name in ("item_ids", "relevance"):
            arr = getattr(self, name)
            if arr is not None and arr.shape != (n_items,):
                raise DataFormatError(f"{name} must be [{n_items}], got shape {arr.shape}")
        if self.feature_names is not None and len(self.feature_names) != f.shape[1]:
            raise DataFormatError(
                f"feature_names has {len(self.feature_names)} names for {f.shape[1]} features"
            )

    # ---- sizes -------------------------------------------------------------------------
    @property
    def num_sets(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def num_items(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def sizes(self) -> np.ndarray:
        """``[sets]`` number of items in each set."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.num_sets

    def __repr__(self) -> str:
        return (
            f"ExampleSets(sets={self.num_sets}, items={self.num_items}, "
            f"features={self.num_features})"
        )

    # ---- selection ---------------------------------------------------------------------
    def set_index(self, set_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Positions of ``set_ids`` in this container; unknown ids raise naming them."""
        wanted = np.asarray(set_ids).astype(str)
        order = np.argsort(self.set_ids, kind="stable")
        sorted_ids = self.set_ids[order]
        pos = np.searchsorted(sorted_ids, wanted)
        pos = np.clip(pos, 0, max(sorted_ids.size - 1, 0))
        found = sorted_ids.size > 0
        hit = (sorted_ids[pos] == wanted) if found else np.zeros(wanted.shape, bool)
        if not np.all(hit):
            missing = wanted[~hit][:5].tolist()
            raise FedrankError(f"unknown set ids (first {len(missing)}): {missing}")
        return order[pos]

    def item_index(self, positions: np.ndarray) -> np.ndarray:
        """Flat item indices of the sets at ``positions``, in set order then item order."""
        positions = np.asarray(positions, dtype=np.int64)
        starts = self.offsets[positions]
        sizes = self.offsets[positions + 1] - starts
        if sizes.size == 0:
            return np.zeros(0, dtype=np.int64)
        # ranges concatenated without a Python loop: repeat each start, add a running index
        run = np.arange(int(sizes.sum()), dtype=np.int64)
        first = np.repeat(np.cumsum(sizes) - sizes, sizes)
        return np.repeat(starts, sizes) + (run - first)

    def take(self, positions: Sequence[int] | np.ndarray) -> ExampleSets:
        """A new container with the sets at ``positions`` (in that order)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_sets):
            raise IndexError(f"set positions out of range 0..{self.num_sets - 1}")
        items = self.item_index(positions)
        sizes = self.offsets[positions + 1] - self.offsets[positions]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if positions.size == 0:
            raise FedrankError("selection is empty: an ExampleSets needs at least one set")
        return ExampleSets(
            features=self.features[items],
            labels=self.labels[items],
            offsets=offsets,
            set_ids=self.set_ids[positions],
            item_ids=None if self.item_ids is None else self.item_ids[items],
            relevance=None if self.relevance is None else self.relevance[items],
            feature_names=self.feature_names,
        )

    def subset(self, set_ids: Sequence[str] | np.ndarray) -> ExampleSets:
        """A new container with the sets named by ``set_ids`` (in that order)."""
        return self.take(self.set_index(set_ids))

    def select_features(self, columns: Sequence[int] | np.ndarray) -> ExampleSets:
        """A new container with only the feature ``columns`` (e.g. what a device may see)."""
        cols = np.asarray(columns, dtype=np.int64)
        if cols.size and (cols.min() < 0 or cols.max() >= self.num_features):
            raise FedrankError(f"feature columns must lie in 0..{self.num_features - 1}")
        names = None if self.feature_names is None else tuple(self.feature_names[c] for c in cols)
        return ExampleSets(
            features=self.features[:, cols],
            labels=self.labels,
            offsets=self.offsets,
            set_ids=self.set_ids,
            item_ids=self.item_ids,
            relevance=self.relevance,
            feature_names=names,
        )

    @classmethod
    def concat(cls, parts: Sequence[ExampleSets]) -> ExampleSets:
        """Concatenate containers with the same feature count and disjoint set ids."""
        if not parts:
            raise FedrankError("nothing to concatenate")
        widths = {p.num_features for p in parts}
        if len(widths) != 1:
            raise DataFormatError(f"cannot concatenate sets with different feature counts {widths}")
        sizes = np.concatenate([p.sizes for p in parts])

        def cat_optional(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if any(a is None for a in arrays) else np.concatenate(arrays)

        return cls(
            features=np.concatenate([p.features for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            offsets=np.concatenate([[0], np.cumsum(sizes)]),
            set_ids=np.concatenate([p.set_ids for p in parts]),
            item_ids=cat_optional("item_ids"),
            relevance=cat_optional("relevance"),
            feature_names=parts[0].feature_names,
        )

    # ---- padding and batching ----------------------------------------------------------
    def _padding(
        self, positions: Sequence[int] | np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions as int64, mask ``[B, N_max]``, flat item index ``[B, N_max]``, 0 where
        the mask is False) for the sets at ``positions`` (default: all)."""
        positions = (
            np.arange(self.num_sets, dtype=np.int64)
            if positions is None
            else np.asarray(positions, dtype=np.int64)
        )
        starts = self.offsets[positions]
        sizes = self.offsets[positions + 1] - starts
        n_max = int(sizes.max()) if sizes.size else 0
        cols = np.arange(n_max, dtype=np.int64)
        mask = cols[None, :] < sizes[:, None]
        index = np.where(mask, starts[:, None] + cols[None, :], 0)
        return positions, mask, index

    def pad_features(
        self, positions: Sequence[int] | np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Features ``[B, N_max, F]`` float32 (zero where padded) and the boolean mask
        ``[B, N_max]`` of the sets at ``positions``, as numpy arrays: what a runtime without
        torch (ONNX Runtime) scores."""
        _, mask, index = self._padding(positions)
        features = self.features[index]
        features[~mask] = 0
        return np.ascontiguousarray(features, dtype=np.float32), mask

    def pad(
        self,
        positions: Sequence[int] | np.ndarray | None = None,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> PaddedBatch:
        """Pad the sets at ``positions`` (default: all) to ``[B, N_max]`` with a boolean mask.

        ``extra`` maps names to flat per-item arrays (e.g. aligned teacher scores, true
        relevance); each is padded like the labels and returned in ``PaddedBatch.extra``.
        """
        positions, mask, index = self._padding(positions)
        torch = _torch()

        def padded(values: np.ndarray) -> torch.Tensor:
            out = values[index]
            out[~mask] = 0
            return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

        padded_extra: dict[str, torch.Tensor] = {}
        for name, values in (extra or {}).items():
            values = np.asarray(values)
            if values.shape[0] != self.num_items:
                raise FedrankError(
                    f"extra array {name!r} has {values.shape[0]} entries for {self.num_items} items"
                )
            padded_extra[name] = padded(values)
        return PaddedBatch(
            features=padded(self.features),
            labels=padded(self.labels),
            mask=torch.from_numpy(mask),
            positions=positions,
            extra=padded_extra,
        )

    def batch_positions(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        bucket: bool = True,
        bucket_batches: int = 50,
    ) -> list[np.ndarray]:
        """Split set positions into batches of ``batch_size`` sets.

        With ``bucket`` the sets inside each window of ``bucket_batches`` batches are sorted by
        size before cutting, so sets of similar size share a batch and padding stays small;
        with ``shuffle`` the window contents and the batch order are random (seeded).
        """
        if batch_size < 1:
            raise FedrankError(f"batch_size must be >= 1, got {batch_size}")
        rng = np.random.default_rng(seed)
        order = rng.permutation(self.num_sets) if shuffle else np.arange(self.num_sets)
        if bucket:
            window = batch_size * max(1, bucket_batches)
            sizes = self.sizes
            chunks = [order[i : i + window] for i in range(0, order.size, window)]
            order = np.concatenate([c[np.argsort(sizes[c], kind="stable")] for c in chunks])
        batches = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        bucket: bool = True,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> Iterator[PaddedBatch]:
        """Yield padded batches (see :meth:`batch_positions` for order and bucketing)."""
        batches = self.batch_positions(batch_size, shuffle=shuffle, seed=seed, bucket=bucket)
        for positions in batches:
            yield self.pad(positions, extra=extra)

    def padding_ratio(self, batch_size: int, *, bucket: bool = True) -> float:
        """Padded cells divided by real items for the given batching: 1.0 means no padding."""
        total = 0
        for positions in self.batch_positions(batch_size, bucket=bucket):
            sizes = self.sizes[positions]
            total += int(sizes.max()) * sizes.size
        return total / max(self.num_items, 1)


def _torch() -> ModuleType:
    """torch, imported when a batch is first padded as tensors: reading, ranking and scoring
    data with an ONNX student (``fedrank score``) never load it (hundreds of MB on a device)."""
    return importlib.import_module("torch")
