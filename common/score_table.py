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

A table lives in memory (built from arrays) or in a **table folder** (:meth:`ScoreTable.save`
to a path without ``.npz``, :class:`ScoreTableWriter`, :meth:`ScoreTable.open`)::

    meta.json       format, version, checksum, counts, dtype
    scores.npy      [items] float32 or float16
    offsets.npy     [sets + 1] int64
    set_ids.npy     [sets] utf-8 bytes (fixed width), in table order
    index_ids.npy   [sets] the same ids, sorted
    index_pos.npy   [sets] int64, table position of each sorted id

An opened folder is memory-mapped: looking a set up is a binary search in the sorted ids, and
:meth:`~ScoreTable.subset` / :meth:`~ScoreTable.align` read only the pages of the sets asked
for, so serving one node costs the same whatever the table's size. Building
(:class:`ScoreTableWriter`) streams scores to disk in chunks and hashes them by streaming the
file back; only the index (ids and offsets, one entry per set) is ever held in memory. Every
file is plain ``.npy`` (``np.load(..., allow_pickle=False)``); a single ``.npz`` file (the
older layout) is still written and read when the path ends in ``.npz``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedrank.common.atomic_io import atomic_path
from fedrank.common.errors import CheckpointError, ScoreTableError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.score_table_io import (
    CHUNK_ITEMS,
    FILES,
    FOLDER_FORMAT,
    FORMAT,
    META_FILE,
    SCORE_DTYPES,
    NpyStream,
    cast_scores,
    content_hash,
    little_bytes,
    read_chunks,
    read_meta,
    replace_folder,
    start_hash,
)

__all__ = ["FORMAT", "FOLDER_FORMAT", "META_FILE", "ScoreTable", "ScoreTableWriter", "content_hash"]


# ---- the table -----------------------------------------------------------------------------
class ScoreTable:
    """Ragged teacher logits per example set, stamped with the teacher's version.

    Args:
        set_ids: ``[sets]`` unique string ids.
        offsets: ``[sets + 1]`` int64, ``offsets[0] == 0``, non-decreasing; set ``k`` owns
            ``scores[offsets[k]:offsets[k + 1]]``.
        scores: ``[items]`` float32 or float16 teacher logits, all finite.
        version: the teacher's stamp; ``None`` uses the content hash of this table.

    :meth:`open` gives a table backed by a memory-mapped table folder instead (same API).
    """

    __slots__ = (
        "_set_ids",
        "_offsets",
        "_scores",
        "_dtype",
        "_version",
        "_checksum",
        "_sorted",
        "_path",
        "_decoded",
        "_members",
    )

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
        dtype = values.dtype if values.dtype in SCORE_DTYPES else np.dtype(np.float32)
        values = np.array(values, dtype=dtype).reshape(-1)
        _check_offsets(off, ids.size, values.size)
        if np.unique(ids).size != ids.size:
            uniq, counts = np.unique(ids, return_counts=True)
            raise ScoreTableError(f"score table set ids repeat: {uniq[counts > 1][:5].tolist()}")
        if not np.all(np.isfinite(values)):
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            set_pos = int(np.searchsorted(off, bad, side="right") - 1)
            raise ScoreTableError(f"non-finite teacher score in set {str(ids[set_pos])!r}")
        for arr in (ids, off, values):
            arr.flags.writeable = False
        self._set_ids = ids
        self._offsets = off
        self._scores = values
        self._dtype = values.dtype
        self._path: Path | None = None
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None
        self._decoded: np.ndarray | None = ids
        self._members: frozenset[str] | None = None
        self._checksum = content_hash(ids, off, values)
        self._version = self._checksum if version is None else str(version)
        if not self._version:
            raise ScoreTableError("score table version must be a non-empty string")

    @classmethod
    def _attach(
        cls,
        *,
        set_ids: np.ndarray,
        offsets: np.ndarray,
        scores: np.ndarray,
        dtype: np.dtype,
        version: str,
        checksum: str,
        index: tuple[np.ndarray, np.ndarray] | None,
        path: Path | None,
    ) -> ScoreTable:
        """A table over arrays that are already checked (a table folder, a float16 view)."""
        self = cls.__new__(cls)
        self._set_ids = set_ids
        self._offsets = offsets
        self._scores = scores
        self._dtype = np.dtype(dtype)
        self._version = version
        self._checksum = checksum
        self._sorted = index
        self._path = path
        self._decoded = None if set_ids.dtype.kind == "S" else set_ids
        self._members = None
        return self

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
        """``[sets]`` str ids in table order (decoded once for a table folder)."""
        if self._decoded is None:
            decoded = np.char.decode(np.asarray(self._set_ids), "utf-8").astype(str)
            decoded.flags.writeable = False
            self._decoded = decoded
        return self._decoded

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets

    @property
    def scores(self) -> np.ndarray:
        """All scores (the memory map itself for an opened folder, read-only)."""
        if self._scores.dtype != self._dtype:
            values = np.concatenate(
                [cast_scores(c, self._dtype) for c in read_chunks(self._scores)]
                or [np.zeros(0, self._dtype)]
            )
            values.flags.writeable = False
            return values
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
        return self._dtype

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
    def path(self) -> Path | None:
        """The table folder this table is memory-mapped from (None when in memory)."""
        return self._path

    @property
    def nbytes(self) -> int:
        """Bytes of the payload: scores, offsets and utf-8 set ids."""
        if self._set_ids.dtype.kind == "S":
            id_bytes = int(np.char.str_len(np.asarray(self._set_ids)).sum())
        else:
            id_bytes = sum(len(s.encode("utf-8")) for s in self._set_ids.tolist())
        return int(self.num_items * self._dtype.itemsize + self._offsets.nbytes + id_bytes)

    def __len__(self) -> int:
        return self.num_sets

    def __contains__(self, set_id: object) -> bool:
        if self._path is None:  # in memory: a set of the ids, built once (fast one by one)
            if self._members is None:
                self._members = frozenset(self._set_ids.tolist())
            return str(set_id) in self._members
        found, _ = self._find(np.asarray([str(set_id)]))
        return bool(found[0])

    def __repr__(self) -> str:
        where = f", path={str(self._path)!r}" if self._path is not None else ""
        return (
            f"ScoreTable(sets={self.num_sets}, items={self.num_items}, dtype={self.dtype}, "
            f"version={self.version!r}{where})"
        )

    def equals(self, other: ScoreTable) -> bool:
        """Same version, ids, offsets and score bytes."""
        return self.version == other.version and self.checksum == other.checksum

    # ---- lookup ------------------------------------------------------------------------
    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted ids, their table positions): built once in memory, stored in a folder."""
        if self._sorted is None:
            order = np.argsort(self._set_ids, kind="stable").astype(np.int64)
            self._sorted = (self._set_ids[order], order)
        return self._sorted

    def _find(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, table positions) of ``wanted`` str ids, by binary search."""
        keys, positions = self._index()
        if keys.size == 0:
            return np.zeros(wanted.size, bool), np.zeros(wanted.size, np.int64)
        if keys.dtype.kind == "S":
            probe = np.char.encode(wanted.astype(str), "utf-8")
            width = keys.dtype.itemsize
        else:
            probe = wanted.astype(str)
            width = keys.dtype.itemsize // 4
        # the probe in the keys' own dtype: numpy would otherwise cast all the keys (O(sets))
        # to a wider probe's; an id longer than every key cannot be in the table
        fits = np.char.str_len(probe) <= width
        probe = probe.astype(keys.dtype)
        at = np.clip(np.searchsorted(keys, probe), 0, keys.size - 1)
        found = (np.asarray(keys[at]) == probe) & fits
        return found, np.asarray(positions[at], dtype=np.int64)

    def _positions(self, set_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        wanted = np.asarray(set_ids).astype(str).reshape(-1)
        found, positions = self._find(wanted)
        if not np.all(found):
            first = str(wanted[int(np.flatnonzero(~found)[0])])
            raise ScoreTableError(
                f"set {first!r} is not in the teacher score table (version {self.version}); "
                f"{int((~found).sum())} of {wanted.size} requested sets are missing"
            )
        return positions

    def get(self, set_id: str) -> np.ndarray:
        """Teacher scores (float32) of one set, in item order."""
        pos = int(self._positions([set_id])[0])
        lo, hi = int(self._offsets[pos]), int(self._offsets[pos + 1])
        return cast_scores(np.asarray(self._scores[lo:hi]), self._dtype).astype(np.float32)

    def _gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = np.asarray(self._offsets[positions])
        sizes = np.asarray(self._offsets[positions + 1]) - starts
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(offsets[-1])
        first = np.repeat(offsets[:-1], sizes)
        items = np.repeat(starts, sizes) + (np.arange(total, dtype=np.int64) - first)
        return offsets, items

    def _values(self, items: np.ndarray) -> np.ndarray:
        """Scores at ``items`` in the table's dtype (reads only their pages from a folder)."""
        return cast_scores(np.asarray(self._scores[items]), self._dtype)

    def subset(self, set_ids: Sequence[str] | np.ndarray) -> ScoreTable:
        """The scores of ``set_ids`` only (in that order), same version: a client's payload.

        Always an in-memory table; from an opened folder it reads only those sets' pages.
        """
        positions = self._positions(set_ids)
        offsets, items = self._gather(positions)
        ids = self.set_ids[positions] if self._decoded is not None else self._ids_at(positions)
        return ScoreTable(ids, offsets, self._values(items), self._version)

    def _ids_at(self, positions: np.ndarray) -> np.ndarray:
        raw = np.asarray(self._set_ids[positions])
        return np.char.decode(raw, "utf-8").astype(str) if raw.dtype.kind == "S" else raw

    def check_covers(self, sets: ExampleSets) -> np.ndarray:
        """Check that the table holds every set of ``sets`` with as many scores as items,
        without reading any score; returns the sets' table positions.

        Raises :class:`ScoreTableError` naming the set otherwise (as :meth:`align`).
        """
        positions = self._positions(sets.set_ids)
        table_sizes = np.asarray(self._offsets[positions + 1]) - np.asarray(
            self._offsets[positions]
        )
        local_sizes = sets.sizes
        wrong = np.flatnonzero(table_sizes != local_sizes)
        if wrong.size:
            k = int(wrong[0])
            raise ScoreTableError(
                f"set {str(sets.set_ids[k])!r} has {int(local_sizes[k])} items locally but "
                f"{int(table_sizes[k])} teacher scores (table version {self.version}); "
                f"{wrong.size} set(s) differ in length"
            )
        return positions

    def align(self, sets: ExampleSets) -> np.ndarray:
        """Flat float32 teacher scores ``[sets.num_items]`` in the item order of ``sets``.

        Raises :class:`ScoreTableError` naming the set when one of ``sets`` is missing from the
        table or holds a different number of items than the table has scores for.
        """
        _, items = self._gather(self.check_covers(sets))
        return self._values(items).astype(np.float32)

    def to_float16(self) -> ScoreTable:
        """A float16 copy (half the bytes), same version. Scores beyond float16 range raise.

        From an opened folder the copy is a float16 *view* of the same files: subsets convert
        what they read, and the checksum is computed by streaming the scores.
        """
        if self._dtype == np.float16:
            return self
        if self._path is not None:
            digest = start_hash(self._set_ids, self._offsets, np.dtype(np.float16))
            for chunk in read_chunks(self._scores):
                digest.update(little_bytes(cast_scores(chunk, np.dtype(np.float16))))
            return ScoreTable._attach(
                set_ids=self._set_ids,
                offsets=self._offsets,
                scores=self._scores,
                dtype=np.dtype(np.float16),
                version=self._version,
                checksum=digest.hexdigest()[:16],
                index=self._sorted,
                path=self._path,
            )
        values = cast_scores(self._scores, np.dtype(np.float16))
        return ScoreTable(self._set_ids, self._offsets, values, self._version)

    def to_float32(self) -> ScoreTable:
        if self._dtype == np.float32:
            return self
        if self._path is not None and self._scores.dtype == np.float32:
            return ScoreTable.open(self._path, verify=False)
        return ScoreTable(
            self.set_ids, self._offsets, self.scores.astype(np.float32), self._version
        )

    # ---- files -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the table atomically: a table folder, or one ``.npz`` file when ``path`` ends
        in ``.npz`` (plain arrays, no pickle)."""
        target = Path(path)
        if target.suffix == ".npz":
            return self._save_npz(target)
        with ScoreTableWriter(target, dtype=self._dtype, version=self._version) as writer:
            ids = self.set_ids
            sizes = self.sizes
            # whole sets per chunk, about CHUNK_ITEMS items each
            bounds = np.searchsorted(
                self._offsets, np.arange(0, self.num_items, CHUNK_ITEMS), side="right"
            )
            cuts = sorted({0, *(int(b) - 1 for b in bounds[1:]), self.num_sets})
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                lo, hi = int(self._offsets[a]), int(self._offsets[b])
                writer.add(
                    ids[a:b], sizes[a:b], cast_scores(np.asarray(self._scores[lo:hi]), self._dtype)
                )
        return target

    def _save_npz(self, target: Path) -> Path:
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            np.savez(
                fh,
                format=np.array(FORMAT),
                set_ids=self.set_ids,
                offsets=np.asarray(self._offsets),
                scores=np.asarray(self.scores),
                version=np.array(self._version),
                checksum=np.array(self._checksum),
            )
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ScoreTable:
        """Read a table written by :meth:`save`: a table folder (memory-mapped, checksum
        verified) or an ``.npz`` file. Corrupt or tampered files raise CheckpointError."""
        source = Path(path)
        if source.is_dir():
            return cls.open(source)
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
        if scores.dtype not in SCORE_DTYPES:
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

    @classmethod
    def open(cls, path: str | os.PathLike[str], verify: bool = True) -> ScoreTable:
        """Memory-map a table folder. ``verify`` recomputes the checksum by streaming the
        files (the scores never all sit in memory); a damaged folder raises CheckpointError."""
        folder = Path(path)
        meta = read_meta(folder)
        arrays: dict[str, np.ndarray] = {}
        for name in FILES:
            file = folder / name
            try:
                arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise CheckpointError(
                    f"score table file {file} is missing, corrupt or truncated "
                    f"({type(err).__name__}: {err})"
                ) from err
        scores, offsets = arrays["scores.npy"], arrays["offsets.npy"]
        set_ids, index_ids, index_pos = (
            arrays["set_ids.npy"],
            arrays["index_ids.npy"],
            arrays["index_pos.npy"],
        )
        dtype = np.dtype(str(meta.get("dtype")))
        expect = {
            "scores.npy": (scores, dtype.kind, int(meta["num_items"])),
            "offsets.npy": (offsets, "i", int(meta["num_sets"]) + 1),
            "set_ids.npy": (set_ids, "S", int(meta["num_sets"])),
            "index_ids.npy": (index_ids, "S", int(meta["num_sets"])),
            "index_pos.npy": (index_pos, "i", int(meta["num_sets"])),
        }
        for name, (arr, kind, length) in expect.items():
            if arr.ndim != 1 or arr.dtype.kind != kind or arr.size != length:
                raise CheckpointError(
                    f"score table file {folder / name} holds {arr.dtype} {arr.shape}, "
                    f"expected {length} values of kind {kind!r} (see {META_FILE})"
                )
        if scores.dtype != dtype or dtype not in SCORE_DTYPES:
            raise CheckpointError(
                f"score table file {folder / 'scores.npy'} holds {scores.dtype} scores, "
                f"{META_FILE} says {dtype} (float32 or float16)"
            )
        try:
            _check_offsets(np.asarray(offsets), set_ids.size, scores.size)
        except ScoreTableError as err:
            raise CheckpointError(f"score table folder {folder} is invalid: {err}") from err
        table = cls._attach(
            set_ids=set_ids,
            offsets=offsets,
            scores=scores,
            dtype=dtype,
            version=str(meta["version"]),
            checksum=str(meta["checksum"]),
            index=(index_ids, index_pos),
            path=folder,
        )
        if verify:
            _verify_folder(table, folder)
        return table


def _check_offsets(off: np.ndarray, num_sets: int, num_items: int) -> None:
    if off.size != num_sets + 1 or off[0] != 0 or off[-1] != num_items:
        raise ScoreTableError(
            f"score table offsets must be [{num_sets + 1}] running from 0 to {num_items}, "
            f"got {off.size} offsets ending at {off[-1] if off.size else 'nothing'}"
        )
    if np.any(np.diff(off) < 0):
        raise ScoreTableError("score table offsets must be non-decreasing")


def _verify_folder(table: ScoreTable, folder: Path) -> None:
    """Recompute the checksum (streaming) and check the index against the ids."""
    digest = start_hash(table._set_ids, np.asarray(table._offsets), table._dtype)
    finite = True
    for chunk in read_chunks(table._scores):
        finite &= bool(np.all(np.isfinite(chunk)))
        digest.update(little_bytes(chunk))
    if digest.hexdigest()[:16] != table.checksum:
        raise CheckpointError(
            f"score table folder {folder} does not match its checksum (stored {table.checksum}, "
            f"content {digest.hexdigest()[:16]}): corrupt or modified"
        )
    keys, positions = table._index()
    ids = np.asarray(table._set_ids)
    pos = np.asarray(positions)
    if (
        pos.size
        and (pos.min() < 0 or pos.max() >= ids.size or np.any(ids[pos] != np.asarray(keys)))
    ) or (keys.size > 1 and np.any(np.asarray(keys[1:]) <= np.asarray(keys[:-1]))):
        raise CheckpointError(f"score table folder {folder}: its set index is corrupt")
    if not finite:
        raise CheckpointError(f"score table folder {folder} holds non-finite scores")


# ---- streaming writer ----------------------------------------------------------------------
class ScoreTableWriter:
    """Build a table folder from chunks of whole sets, never holding all scores in memory.

    Use as a context manager; :meth:`add` appends sets (ids, sizes, their scores in item
    order); leaving the block finishes the folder (index, checksum, ``meta.json``) in a
    temporary folder beside ``path`` and renames it into place, so a reader never sees half a
    table. On an exception nothing is left behind. :attr:`table` is the finished table,
    memory-mapped.

    Args:
        path: the table folder to create (an existing table folder is replaced).
        dtype: ``float32`` or ``float16`` scores on disk.
        version: the teacher's stamp; ``None`` uses the content hash.

    Example::

        with ScoreTableWriter("runs/table") as writer:
            for ids, sizes, scores in chunks:
                writer.add(ids, sizes, scores)
        table = writer.table
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        dtype: np.dtype | str = np.float32,
        version: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in SCORE_DTYPES:
            raise ScoreTableError(f"score table dtype must be float32 or float16, got {dtype}")
        if version is not None and not str(version):
            raise ScoreTableError("score table version must be a non-empty string")
        self.version = version
        self.table: ScoreTable | None = None
        self._ids: list[np.ndarray] = []  # utf-8 bytes arrays, one per chunk (the index)
        self._sizes: list[np.ndarray] = []
        self._tmp: Path | None = None
        self._scores: NpyStream | None = None

    def __enter__(self) -> ScoreTableWriter:
        if self.path.exists() and not (self.path / META_FILE).is_file():
            raise ScoreTableError(
                f"{self.path} exists and is not a score table folder; choose another path"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        )
        self._scores = NpyStream(self._tmp / "scores.npy", self.dtype)
        return self

    def add(
        self,
        set_ids: Sequence[str] | np.ndarray,
        sizes: Sequence[int] | np.ndarray,
        scores: np.ndarray,
    ) -> None:
        """Append sets ``set_ids`` with ``sizes`` items and their flat ``scores``."""
        if self._scores is None:
            raise ScoreTableError("ScoreTableWriter.add outside its `with` block")
        ids = np.asarray(set_ids).astype(str).reshape(-1)
        n = np.asarray(sizes, dtype=np.int64).reshape(-1)
        values = np.asarray(scores).reshape(-1)
        if n.size != ids.size or np.any(n < 0):
            raise ScoreTableError(f"{ids.size} set ids need as many sizes >= 0, got {n.size}")
        if int(n.sum()) != values.size:
            raise ScoreTableError(
                f"sets of {int(n.sum())} items in all came with {values.size} scores"
            )
        if not np.all(np.isfinite(values)):
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            k = int(np.searchsorted(np.cumsum(n), bad, side="right"))
            raise ScoreTableError(f"non-finite teacher score in set {str(ids[k])!r}")
        encoded = np.char.encode(ids, "utf-8")
        if encoded.size and np.any(np.char.str_len(encoded) == 0):
            raise ScoreTableError("set ids must not be empty")
        self._ids.append(encoded)
        self._sizes.append(n)
        self._scores.write(cast_scores(values, self.dtype))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        tmp = self._tmp
        assert tmp is not None and self._scores is not None
        try:
            self._scores.close()
            if exc_type is None:
                self._finish(tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(tmp)

    def _finish(self, tmp: Path) -> None:
        width = max([1, *(chunk.dtype.itemsize for chunk in self._ids)])
        ids = np.concatenate([np.zeros(0, f"S{width}"), *self._ids], dtype=f"S{width}")
        self._ids = []
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        order = np.argsort(ids, kind="stable").astype(np.int64)
        keys = ids[order]
        if keys.size > 1 and np.any(keys[1:] == keys[:-1]):
            dup = keys[1:][keys[1:] == keys[:-1]]
            raise ScoreTableError(
                f"score table set ids repeat: {[d.decode('utf-8') for d in dup[:5].tolist()]}"
            )
        for name, arr in (
            ("offsets.npy", offsets),
            ("set_ids.npy", ids),
            ("index_ids.npy", keys),
            ("index_pos.npy", order),
        ):
            with open(tmp / name, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
        scores = np.load(tmp / "scores.npy", mmap_mode="r", allow_pickle=False)
        digest = start_hash(ids, offsets, self.dtype)
        for chunk in read_chunks(scores):
            digest.update(little_bytes(chunk))
        del scores
        checksum = digest.hexdigest()[:16]
        meta = {
            "format": FOLDER_FORMAT,
            "version": self.version or checksum,
            "checksum": checksum,
            "num_sets": int(ids.size),
            "num_items": int(offsets[-1]),
            "dtype": str(self.dtype),
            "files": list(FILES),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, self.path)
        self.table = ScoreTable.open(self.path, verify=False)
