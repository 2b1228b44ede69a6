"""The teacher score table: set id -> teacher logits for that set's items, in item order.

The table is compact: one flat score array (float32, or float16 to halve what travels to a
device), ``int64`` offsets marking where each set starts, and the set ids. It carries two
stamps:

- ``version`` names the teacher that produced the scores. By default it is the content hash of
  the full table when it is built; :meth:`ScoreTable.subset` and :meth:`ScoreTable.to_float16`
  keep it, so a client holding a (float16) subset knows which teacher it came from.
- ``checksum`` is the content hash of exactly what the table holds (ids, offsets, score bytes
  and dtype). Files and Flower records carry it and loading verifies it, so a corrupt or
  tampered table is refused instead of being silently distilled from.

Both hashes are the first 16 hex characters of a SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.atomic_io import atomic_path
from common.errors import CheckpointError, ScoreTableError
from common.example_sets import ExampleSets

FORMAT = "fedrank-score-table-v1"
_SCORE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def content_hash(set_ids: np.ndarray, offsets: np.ndarray, scores: np.ndarray) -> str:
    """SHA-256 (first 16 hex chars) over the ids, offsets, score dtype and score bytes."""
    digest = hashlib.sha256()
    digest.update(FORMAT.encode())
    digest.update(str(scores.dtype).encode())
    for set_id in set_ids.tolist():
        encoded = set_id.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    digest.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    digest.update(np.ascontiguousarray(scores, dtype=scores.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()[:16]


class ScoreTable:
    """Ragged teacher logits per example set, stamped with the teacher's version.

    Args:
        set_ids: ``[sets]`` unique string ids.
        offsets: ``[sets + 1]`` int64, ``offsets[0] == 0``, non-decreasing; set ``k`` owns
            ``scores[offsets[k]:offsets[k + 1]]``.
        scores: ``[items]`` float32 or float16 teacher logits, all finite.
        version: the teacher's stamp; ``None`` uses the content hash of this table.
    """

    __slots__ = ("_set_ids", "_offsets", "_scores", "_version", "_checksum", "_index")

    def __init__(
        self,
        set_ids: Sequence[str] | np.ndarray,
        offsets: Sequence[int] | np.ndarray,
        scores: np.ndarray,
        version: str | None = None,
    ) -> None:
        ids = np.asarray(set_ids).astype(str).reshape(-1)
        # private copies: the arrays are frozen below and must not freeze the caller's
        off = np.array(offsets, dtype=np.int64).reshape(-1)
        values = np.asarray(scores)
        dtype = values.dtype if values.dtype in _SCORE_DTYPES else np.dtype(np.float32)
        values = np.array(values, dtype=dtype).reshape(-1)
        if off.size != ids.size + 1 or off[0] != 0 or off[-1] != values.size:
            raise ScoreTableError(
                f"score table offsets must be [{ids.size + 1}] running from 0 to {values.size}, "
                f"got {off.size} offsets ending at {off[-1] if off.size else 'nothing'}"
            )
        if np.any(np.diff(off) < 0):
            raise ScoreTableError("score table offsets must be non-decreasing")
        if np.unique(ids).size != ids.size:
            uniq, counts = np.unique(ids, return_counts=True)
            raise ScoreTableError(f"score table set ids repeat: {uniq[counts > 1][:5].tolist()}")
        if not np.all(np.isfinite(values)):
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            set_pos = int(np.searchsorted(off, bad, side="right") - 1)
            raise ScoreTableError(f"non-finite teacher score in set {str(ids[set_pos])!r}")
        self._set_ids = ids
        self._offsets = off
        self._scores = values
        self._checksum = content_hash(ids, off, values)
        self._version = self._checksum if version is None else str(version)
        if not self._version:
            raise ScoreTableError("score table version must be a non-empty string")
        self._index: dict[str, int] | None = None
        for arr in (self._set_ids, self._offsets, self._scores):
            arr.flags.writeable = False

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_scores(
        cls, sets: ExampleSets, item_scores: np.ndarray, version: str | None = None
    ) -> ScoreTable:
        """A table for ``sets`` from flat per-item scores in the sets' item order."""
        values = np.asarray(item_scores)
        if values.shape != (sets.num_items,):
            raise ScoreTableError(
                f"item_scores must be [{sets.num_items}] (one per item), got shape {values.shape}"
            )
        return cls(sets.set_ids, sets.offsets, values.astype(np.float32, copy=False), version)

    # ---- properties --------------------------------------------------------------------
    @property
    def set_ids(self) -> np.ndarray:
        return self._set_ids

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets

    @property
    def scores(self) -> np.ndarray:
        return self._scores

    @property
    def version(self) -> str:
        return self._version

    @property
    def checksum(self) -> str:
        """Content hash of exactly what this table holds (verified on load)."""
        return self._checksum

    @property
    def dtype(self) -> np.dtype:
        return self._scores.dtype

    @property
    def num_sets(self) -> int:
        return int(self._set_ids.size)

    @property
    def num_items(self) -> int:
        return int(self._scores.size)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self._offsets)

    @property
    def nbytes(self) -> int:
        """Bytes of the payload: scores, offsets and utf-8 set ids."""
        id_bytes = sum(len(s.encode("utf-8")) for s in self._set_ids.tolist())
        return int(self._scores.nbytes + self._offsets.nbytes + id_bytes)

    def __len__(self) -> int:
        return self.num_sets

    def __contains__(self, set_id: object) -> bool:
        return str(set_id) in self._lookup()

    def __repr__(self) -> str:
        return (
            f"ScoreTable(sets={self.num_sets}, items={self.num_items}, dtype={self.dtype}, "
            f"version={self.version!r})"
        )

    def equals(self, other: ScoreTable) -> bool:
        """Same version, ids, offsets and score bytes."""
        return self.version == other.version and self.checksum == other.checksum

    # ---- lookup ------------------------------------------------------------------------
    def _lookup(self) -> dict[str, int]:
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self._set_ids.tolist())}
        return self._index

    def _positions(self, set_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        lookup = self._lookup()
        wanted = np.asarray(set_ids).astype(str).reshape(-1).tolist()
        positions = np.empty(len(wanted), dtype=np.int64)
        for i, set_id in enumerate(wanted):
            pos = lookup.get(set_id)
            if pos is None:
                missing = [s for s in wanted if s not in lookup]
                raise ScoreTableError(
                    f"set {set_id!r} is not in the teacher score table (version {self.version}); "
                    f"{len(missing)} of {len(wanted)} requested sets are missing"
                )
            positions[i] = pos
        return positions

    def get(self, set_id: str) -> np.ndarray:
        """Teacher scores (float32) of one set, in item order."""
        pos = int(self._positions([set_id])[0])
        return self._scores[self._offsets[pos] : self._offsets[pos + 1]].astype(np.float32)

    def _gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = self._offsets[positions]
        sizes = self._offsets[positions + 1] - starts
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(offsets[-1])
        first = np.repeat(offsets[:-1], sizes)
        items = np.repeat(starts, sizes) + (np.arange(total, dtype=np.int64) - first)
        return offsets, items

    def subset(self, set_ids: Sequence[str] | np.ndarray) -> ScoreTable:
        """The scores of ``set_ids`` only (in that order), same version: a client's payload."""
        positions = self._positions(set_ids)
        offsets, items = self._gather(positions)
        return ScoreTable(self._set_ids[positions], offsets, self._scores[items], self._version)

    def align(self, sets: ExampleSets) -> np.ndarray:
        """Flat float32 teacher scores ``[sets.num_items]`` in the item order of ``sets``.

        Raises :class:`ScoreTableError` naming the set when one of ``sets`` is missing from the
        table or holds a different number of items than the table has scores for.
        """
        positions = self._positions(sets.set_ids)
        table_sizes = self._offsets[positions + 1] - self._offsets[positions]
        local_sizes = sets.sizes
        wrong = np.flatnonzero(table_sizes != local_sizes)
        if wrong.size:
            k = int(wrong[0])
            raise ScoreTableError(
                f"set {str(sets.set_ids[k])!r} has {int(local_sizes[k])} items locally but "
                f"{int(table_sizes[k])} teacher scores (table version {self.version}); "
                f"{wrong.size} set(s) differ in length"
            )
        _, items = self._gather(positions)
        return self._scores[items].astype(np.float32)

    def to_float16(self) -> ScoreTable:
        """A float16 copy (half the bytes), same version. Scores beyond float16 range raise."""
        if self._scores.dtype == np.float16:
            return self
        if self._scores.size and float(np.max(np.abs(self._scores))) > float(
            np.finfo(np.float16).max
        ):
            raise ScoreTableError("teacher scores exceed the float16 range; keep float32")
        return ScoreTable(
            self._set_ids, self._offsets, self._scores.astype(np.float16), self._version
        )

    def to_float32(self) -> ScoreTable:
        if self._scores.dtype == np.float32:
            return self
        return ScoreTable(
            self._set_ids, self._offsets, self._scores.astype(np.float32), self._version
        )

    # ---- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table atomically as ``.npz`` (plain arrays, no pickle)."""
        target = Path(path)
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                format=np.array(FORMAT),
                set_ids=self._set_ids,
                offsets=self._offsets,
                scores=self._scores,
                version=np.array(self._version),
                checksum=np.array(self._checksum),
            )
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ScoreTable:
        """Read a table written by :meth:`save`; corrupt or tampered files raise CheckpointError."""
        source = Path(path)
        if not source.is_file():
            raise CheckpointError(f"score table file {source} does not exist")
        try:
            with np.load(source, allow_pickle=False) as data:
                fmt = str(data["format"])
                set_ids = data["set_ids"]
                offsets = data["offsets"]
                scores = data["scores"]
                version = str(data["version"])
                checksum = str(data["checksum"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise CheckpointError(
                f"score table file {source} is corrupt or truncated ({type(err).__name__}: {err})"
            ) from err
        if fmt != FORMAT:
            raise CheckpointError(
                f"score table file {source} has format {fmt!r}, expected {FORMAT!r}"
            )
        if scores.dtype not in _SCORE_DTYPES:
            raise CheckpointError(
                f"score table file {source} holds {scores.dtype} scores, expected float32/float16"
            )
        try:
            table = cls(set_ids, offsets, scores, version)
        except ScoreTableError as err:
            raise CheckpointError(f"score table file {source} is invalid: {err}") from err
        if table.checksum != checksum:
            raise CheckpointError(
                f"score table file {source} does not match its checksum "
                f"(stored {checksum}, content {table.checksum}): corrupt or modified"
            )
        return table
