"""On-disk pieces of teacher score tables (:mod:`fedrank.common.score_table`).

The content hash (streamed, chunk by chunk), 1-d ``.npy`` files written in a stream and read
back in chunks without mapping them, ``meta.json`` of a table folder, and the atomic
replacement of a table folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedrank.common.atomic_io import read_format_json
from fedrank.common.errors import CheckpointError, ScoreTableError

__all__ = [
    "CHUNK_ITEMS",
    "FILES",
    "FOLDER_FORMAT",
    "FORMAT",
    "META_FILE",
    "NpyStream",
    "SCORE_DTYPES",
    "cast_scores",
    "content_hash",
    "little_bytes",
    "read_chunks",
    "read_meta",
    "replace_folder",
    "start_hash",
]

FORMAT = "fedrank-score-table-v1"
FOLDER_FORMAT = "fedrank-score-table-folder-v1"
META_FILE = "meta.json"
FILES = ("scores.npy", "offsets.npy", "set_ids.npy", "index_ids.npy", "index_pos.npy")
SCORE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
CHUNK_ITEMS = 1 << 18  # items per chunk when streaming scores (1 MiB of float32)
_FLOAT16_MAX = float(np.finfo(np.float16).max)


# ---- hashing -------------------------------------------------------------------------------
_ID_CHUNK = 1 << 13  # set ids hashed per update


def start_hash(set_ids: np.ndarray, offsets: np.ndarray, dtype: np.dtype) -> Any:
    """A SHA-256 fed with the format, the dtype, every set id (8-byte little-endian length,
    then its utf-8 bytes) and the offsets; the caller adds the score bytes.

    ``set_ids``: str (``U``) or utf-8 bytes (``S``, e.g. a table folder's memory map); ids go
    in chunks, so a memory-mapped column is never copied whole.
    """
    digest = hashlib.sha256()
    digest.update(FORMAT.encode())
    digest.update(str(np.dtype(dtype)).encode())
    for lo in range(0, set_ids.size, _ID_CHUNK):
        chunk = np.asarray(set_ids[lo : lo + _ID_CHUNK])
        encoded = (
            chunk.tolist()
            if chunk.dtype.kind == "S"
            else [s.encode("utf-8") for s in chunk.tolist()]
        )
        lengths = [len(e).to_bytes(8, "little") for e in encoded]
        digest.update(b"".join(b for pair in zip(lengths, encoded, strict=True) for b in pair))
    digest.update(little_bytes(np.asarray(offsets, dtype="<i8")))
    return digest


def little_bytes(chunk: np.ndarray) -> memoryview:
    """The little-endian bytes of ``chunk`` for hashing (no copy when it already is)."""
    return memoryview(np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<"))).cast("B")


def content_hash(set_ids: np.ndarray, offsets: np.ndarray, scores: np.ndarray) -> str:
    """SHA-256 (first 16 hex chars) over the ids, offsets, score dtype and score bytes."""
    digest = start_hash(np.asarray(set_ids), offsets, scores.dtype)
    digest.update(little_bytes(np.asarray(scores)))
    return digest.hexdigest()[:16]


# ---- .npy files written in a stream --------------------------------------------------------
def _npy_header(dtype: np.dtype, length: int) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
    np.lib.format.write_array_header_1_0(buffer, {**header, "shape": (length,)})
    return buffer.getvalue()


class NpyStream:
    """A 1-d ``.npy`` file written chunk by chunk; the header is rewritten with the final length.

    numpy pads ``.npy`` headers with spare room for the length to grow, so the rewrite keeps
    the header's size; the writer checks that it does.
    """

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.length = 0
        self.fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.header_size = len(_npy_header(self.dtype, 0))
        self.fh.write(_npy_header(self.dtype, 0))

    def write(self, values: np.ndarray) -> None:
        self.fh.write(little_bytes(np.asarray(values, dtype=self.dtype)))
        self.length += int(values.size)

    def close(self) -> None:
        header = _npy_header(self.dtype, self.length)
        if len(header) != self.header_size:  # pragma: no cover - numpy keeps spare room
            raise ScoreTableError("cannot finish the score file: its .npy header grew")
        self.fh.seek(0)
        self.fh.write(header)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def read_chunks(memmap: np.ndarray, chunk: int = CHUNK_ITEMS) -> Iterator[np.ndarray]:
    """The values of a memory-mapped 1-d array in chunks, through plain reads.

    Reading the file instead of touching the mapping keeps the pages out of this process's
    resident memory (the OS page cache still serves them).
    """
    path = getattr(memmap, "filename", None)
    if path is None:  # an in-memory array
        for lo in range(0, memmap.size, chunk):
            yield np.asarray(memmap[lo : lo + chunk])
        return
    dtype = memmap.dtype
    with open(path, "rb") as fh:
        fh.seek(int(memmap.offset))
        remaining = int(memmap.size)
        while remaining:
            n = min(chunk, remaining)
            data = fh.read(n * dtype.itemsize)
            if len(data) != n * dtype.itemsize:
                raise CheckpointError(f"score table file {path} is truncated")
            yield np.frombuffer(data, dtype=dtype)
            remaining -= n


def cast_scores(chunk: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if chunk.dtype == dtype:
        return chunk
    if dtype == np.float16 and chunk.size and float(np.max(np.abs(chunk))) > _FLOAT16_MAX:
        raise ScoreTableError("teacher scores exceed the float16 range; keep float32")
    return chunk.astype(dtype)


def read_meta(folder: Path) -> dict[str, Any]:
    file = folder / META_FILE
    if not file.is_file():
        raise CheckpointError(f"score table folder {folder} has no {META_FILE}")
    meta = read_format_json(file, FOLDER_FORMAT, "score table file")
    for key, kind in (("num_sets", int), ("num_items", int), ("version", str)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"score table file {file}: {key!r} is missing or malformed")
    for key in ("checksum", "dtype"):
        if not isinstance(meta.get(key), str):
            raise CheckpointError(f"score table file {file}: {key!r} is missing or malformed")
    try:
        np.dtype(meta["dtype"])
    except TypeError as err:
        raise CheckpointError(f"score table file {file}: unknown dtype {meta['dtype']!r}") from err
    return meta


def replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing table folder there is moved aside first and
    removed afterwards (never renamed through a symlink)."""
    if target.is_symlink():
        raise ScoreTableError(f"{target} is a symbolic link; will not replace it")
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.rename(target, old / "table")
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
