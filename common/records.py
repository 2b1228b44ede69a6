"""Conversion of model weights and teacher score tables to and from Flower records.

Everything travels as plain numpy arrays inside an :class:`flwr.app.ArrayRecord` (serialised
with ``np.save``, loaded with ``allow_pickle=False``): set ids as a utf-8 byte buffer plus
lengths, set sizes in the narrowest unsigned type, version and checksum as utf-8 JSON bytes.
Nothing is pickled.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.constant import SType

from fedrank.common.errors import CheckpointError, ScoreTableError
from fedrank.common.score_table import FORMAT, ScoreTable

__all__ = [
    "ArrayRecord",
    "ConfigRecord",
    "DecodedArray",
    "array_from_numpy",
    "array_numpy",
    "load_arrays",
    "model_arrays",
    "model_to_arrays",
    "record_nbytes",
    "restore_transform",
    "score_table_from_record",
    "score_table_to_record",
    "weights_problem",
]

_TABLE_KEYS = ("meta", "set_ids_utf8", "set_id_lengths", "sizes", "scores")


# ---- model weights -------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The bytes ``np.save`` writes before the data of a C-ordered array of ``descr`` and
    ``shape`` (format version 1.0, what it writes for every header under 64 KiB)."""
    out = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()


def array_numpy(array: Array) -> np.ndarray:
    """``array.numpy()`` (a writable copy, never unpickled), without parsing the ``.npy``
    header again: when the header is byte for byte what ``np.save`` writes for the array's
    declared dtype and shape and the data has exactly that size, the data is read directly;
    anything else (another header, a Fortran-ordered or object array, a truncated buffer)
    goes through ``Array.numpy()`` and its checks. Why: numpy parses every header with
    ``ast.literal_eval`` (~80 us), which at 100 replies of 8 arrays, each read several times,
    was most of a round's aggregation."""
    try:
        dtype = np.dtype(array.dtype)
        shape = tuple(int(n) for n in array.shape)
        header = _npy_header(np.lib.format.dtype_to_descr(dtype), shape)
    except (TypeError, ValueError):
        return array.numpy()
    data = array.data
    count = math.prod(shape)
    if (
        array.stype == SType.NUMPY
        and dtype.kind in "biuf"
        and isinstance(data, bytes)
        and data.startswith(header)
        and len(data) == len(header) + count * dtype.itemsize
    ):
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=len(header))
        return flat.reshape(shape).copy()
    return array.numpy()


def array_from_numpy(value: np.ndarray) -> Array:
    """``Array(value)``, byte for byte (the ``.npy`` bytes ``np.save`` writes), built from the
    cached header of its dtype and shape instead of a new ``np.save`` per array."""
    if value.dtype.kind not in "biuf" or not value.flags.c_contiguous:
        return Array(value)
    shape = tuple(int(n) for n in value.shape)
    header = _npy_header(np.lib.format.dtype_to_descr(value.dtype), shape)
    return Array(
        dtype=str(value.dtype), shape=shape, stype=SType.NUMPY, data=header + value.tobytes()
    )


class DecodedArray(Array):
    """An ``Array`` (the same ``.npy`` bytes) that keeps the values it was written from:
    reading it back in this process (Flower's strategy aggregating the server's prepared
    replies) is a copy of them, not another parse of the bytes. Setting its bytes, dtype or
    shape drops the kept values."""

    def __init__(self, values: np.ndarray) -> None:
        if not values.flags.c_contiguous:
            values = np.ascontiguousarray(values)
        written = array_from_numpy(values)
        super().__init__(written.dtype, written.shape, written.stype, written.data)
        self.__dict__["_values"] = values

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("dtype", "shape", "stype", "data"):
            self.__dict__.pop("_values", None)
        super().__setattr__(name, value)

    def numpy(self) -> np.ndarray:
        values = self.__dict__.get("_values")
        return super().numpy() if values is None else np.array(values, copy=True)


def model_to_arrays(model: torch.nn.Module) -> ArrayRecord:
    """The model's state dict (parameters and buffers) as an ArrayRecord."""
    out = ArrayRecord()
    for key, value in model.state_dict().items():
        out[key] = array_from_numpy(value.detach().cpu().numpy())
    return out


def _as_numpy(arrays: ArrayRecord | Mapping[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if isinstance(value, Array):
            out[key] = array_numpy(value)
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().cpu().numpy()
        else:
            out[key] = np.asarray(value)
    return out


def weights_problem(
    given: Mapping[str, Any],
    expected: Mapping[str, np.ndarray],
    *,
    exact_dtype: bool = False,
    fixed_integers: bool = False,
) -> str | None:
    """Why the arrays ``given`` (numpy or Flower ``Array`` values) cannot stand in for
    ``expected`` (a model's arrays), or None: a missing or unexpected key, another shape, a
    dtype that is not a number (``exact_dtype``: not ``expected``'s dtype), NaN or infinity,
    or (``fixed_integers``) an integer buffer that differs from ``expected``'s. The one
    weights check of fedrank: model files, checkpoints and client replies go through it."""
    missing = [k for k in expected if k not in given]
    if missing:
        return f"weights miss key {missing[0]!r} ({len(missing)} of {len(expected)} missing)"
    extra = [k for k in given if k not in expected]
    if extra:
        return f"weights hold unexpected key {extra[0]!r} ({len(extra)} unexpected)"
    for key, old in expected.items():
        value = given[key]
        try:
            new = array_numpy(value) if isinstance(value, Array) else np.asarray(value)
        except Exception as err:  # undecodable array bytes
            return f"weights key {key!r} cannot be decoded: {type(err).__name__}: {err}"
        if tuple(new.shape) != tuple(old.shape):
            return f"weights key {key!r} has shape {tuple(new.shape)}, expected {tuple(old.shape)}"
        if exact_dtype and new.dtype != old.dtype:
            return f"weights key {key!r} is {new.dtype}, expected {old.dtype}"
        if new.dtype.kind not in "fiub":
            return f"weights key {key!r} has unsupported dtype {new.dtype}"
        if new.dtype.kind == "f" and not np.all(np.isfinite(new)):
            bad = int(np.size(new) - np.count_nonzero(np.isfinite(new)))
            return f"weights key {key!r} holds {bad} non-finite value(s) (NaN or inf)"
        if fixed_integers and old.dtype.kind in "iub" and not np.array_equal(new, old):
            return f"integer buffer {key!r} differs from the global model's"
    return None


def model_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state dict as numpy arrays (what :func:`weights_problem` expects)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def load_arrays(
    model: torch.nn.Module, arrays: ArrayRecord | Mapping[str, Any], *, exact_dtype: bool = False
) -> None:
    """Load ``arrays`` into ``model`` after :func:`weights_problem` found nothing wrong.

    Raises :class:`CheckpointError` naming the key otherwise; the model is left unchanged in
    that case.
    """
    given = _as_numpy(arrays)
    problem = weights_problem(given, model_arrays(model), exact_dtype=exact_dtype)
    if problem:
        raise CheckpointError(problem)
    state = model.state_dict()
    new_state = {
        key: torch.from_numpy(np.array(given[key])).to(dtype=current.dtype)
        for key, current in state.items()
    }
    model.load_state_dict(new_state, strict=True)


TRANSFORM_PREFIX = "transform."


def restore_transform(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` with every ``transform.*`` entry taken from ``reference`` (the server's
    fitted feature transform is authoritative: aggregation, noise or a client cannot change
    it). Keys keep ``reference``'s order; other entries are kept as they are."""
    keys = [k for k in reference if k.startswith(TRANSFORM_PREFIX)]
    if not keys:
        return arrays
    out = ArrayRecord()
    for key in arrays:
        out[key] = reference[key] if key in keys else arrays[key]
    for key in keys:
        if key not in out:
            out[key] = reference[key]
    return out


# ---- teacher score tables ------------------------------------------------------------------
def _smallest_uint(values: np.ndarray) -> np.ndarray:
    """``values`` (non-negative ints) in the narrowest unsigned dtype that holds them."""
    top = int(values.max()) if values.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.uint64)


def _utf8(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def score_table_to_record(table: ScoreTable) -> ArrayRecord:
    """A score table as a compact ArrayRecord.

    Arrays: ``meta`` (utf-8 JSON: format, version, checksum), ``set_ids_utf8`` (the ids'
    utf-8 bytes back to back) with ``set_id_lengths``, ``sizes`` (items per set) and ``scores``
    (float32 or float16, as held). Lengths and sizes use the narrowest unsigned integer type.
    """
    encoded = [s.encode("utf-8") for s in table.set_ids.tolist()]
    meta = {"format": FORMAT, "version": table.version, "checksum": table.checksum}
    arrays = {
        "meta": _utf8(json.dumps(meta, sort_keys=True)),
        "set_ids_utf8": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
        "set_id_lengths": _smallest_uint(np.array([len(e) for e in encoded], dtype=np.int64)),
        "sizes": _smallest_uint(np.asarray(table.sizes, dtype=np.int64)),
        "scores": np.array(table.scores),
    }
    return ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()})


def score_table_from_record(record: ArrayRecord) -> ScoreTable:
    """Rebuild a table from :func:`score_table_to_record`; verifies its checksum.

    A record with missing keys, malformed arrays or content that does not match its checksum
    raises :class:`ScoreTableError`.
    """
    missing = [k for k in _TABLE_KEYS if k not in record]
    if missing:
        raise ScoreTableError(f"score table record is missing key {missing[0]!r}")
    try:
        arrays = _as_numpy(record)
        meta = json.loads(arrays["meta"].astype(np.uint8).tobytes().decode("utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ScoreTableError(f"score table record has format {found!r}, expected {FORMAT!r}")
        blob = arrays["set_ids_utf8"].astype(np.uint8).tobytes()
        lengths = arrays["set_id_lengths"]
        sizes = arrays["sizes"]
        for name, arr in (("set_id_lengths", lengths), ("sizes", sizes)):
            if arr.ndim != 1 or arr.dtype.kind != "u":
                raise ScoreTableError(f"score table record: {name!r} must be a 1-d unsigned array")
        lengths = lengths.astype(np.int64)
        if int(lengths.sum()) != len(blob) or lengths.size != sizes.size:
            raise ScoreTableError("score table record: set id lengths do not match the id bytes")
        ends = np.cumsum(lengths)
        set_ids = [
            blob[e - n : e].decode("utf-8")
            for e, n in zip(ends.tolist(), lengths.tolist(), strict=True)
        ]
        scores = arrays["scores"]
        if scores.dtype not in (np.float32, np.float16):
            raise ScoreTableError(
                f"score table record holds {scores.dtype} scores, expected float32 or float16"
            )
        offsets = np.concatenate([[0], np.cumsum(sizes.astype(np.int64))])
        table = ScoreTable(np.array(set_ids, dtype=str), offsets, scores, str(meta["version"]))
        checksum = str(meta.get("checksum"))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as err:
        raise ScoreTableError(f"score table record is malformed: {err}") from err
    if table.checksum != checksum:
        raise ScoreTableError(
            f"score table record does not match its checksum (stored {checksum}, "
            f"content {table.checksum}, version {table.version})"
        )
    return table


def record_nbytes(record: ArrayRecord | ConfigRecord | Any) -> int:
    """Bytes a record carries (array bytes incl. npy headers, plus key names)."""
    if hasattr(record, "count_bytes"):
        return int(record.count_bytes())
    raise TypeError(f"cannot count bytes of {type(record).__name__}")
