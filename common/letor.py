"""Fast reader for LETOR / SVMlight ranking files, plain or gzipped, with an ``.npz`` cache.

One line per item::

    <label> qid:<set id> <index>:<value> <index>:<value> ... # docid = <item id> ...

Feature indices start at 1 and increase along a line; a missing index means the value 0, so
sparse and dense files read the same way. Items of one set (``qid``) must be contiguous. The
comment after ``#`` is kept only for ``docid = X``, which becomes the item id.

Speed: the file is split into lines once, and all ``index:value`` tokens of the file are then
decoded together with numpy (one pass per character column), never token by token in Python.
Any line the vectorised path cannot vouch for sends the file through a plain line-by-line
parser, which also produces the error message (file, line number, what was expected).

Limits: features are held as a dense float32 matrix (items x features x 4 bytes) and gzip
files are decompressed in memory, so the reader refuses a file whose dense matrix or
decompressed text would exceed :data:`MAX_DATA_BYTES` (4 GiB; the environment variable
``FEDRANK_MAX_DATA_BYTES`` sets another limit in bytes, e.g. ``8e9``) with an error naming the
file and, for a feature index that makes the matrix that wide, its line. Values and labels
must fit in float32 (``|x| <= 3.4e38``); qids must be UTF-8. Running out of memory anyway is
reported in one line naming the file.

Cache: a parsed file is stored as ``<file>.fedrank-cache.npz`` beside the file when that
folder is writable, else in ``$FEDRANK_CACHE_DIR`` (default ``~/.cache/fedrank``) under
``letor/``. The cache is keyed by the source's size, mtime and SHA-256 of its bytes plus the
reader version and ``num_features``; a stale or corrupt cache is re-parsed and overwritten.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import stat
import warnings
import zlib
from pathlib import Path

import numpy as np

from fedrank.common.atomic_io import atomic_path
from fedrank.common.errors import DataFormatError
from fedrank.common.example_sets import ExampleSets

__all__ = [
    "MAX_DATA_BYTES",
    "STATS",
    "max_data_bytes",
    "cache_path_for",
    "read_letor",
    "read_letor_folder",
    "read_letor_slow",
    "user_cache_dir",
    "write_letor",
]

#: Bumped whenever parsing changes, so old caches are re-parsed.
READER_VERSION = 2
CACHE_SUFFIX = ".fedrank-cache.npz"
SPLIT_NAMES = ("train", "vali", "test")

#: Default limit on the bytes of a dense feature matrix or of a decompressed file.
MAX_DATA_BYTES = 4 * 2**30
_LIMIT_ENV = "FEDRANK_MAX_DATA_BYTES"
_FLOAT32_MAX = float(np.finfo(np.float32).max)

#: Counters for tests and diagnostics: files parsed, cache hits, cache files written.
STATS: dict[str, int] = {"parses": 0, "cache_hits": 0, "cache_writes": 0}

_DOCID = re.compile(rb"docid\s*=\s*(\S+)")
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True
_POW10 = 10.0 ** np.arange(23)  # exact in float64
_MAX_FAST_CHARS = 24  # longer value tokens go through float()
_CHUNK = 1 << 22  # tokens decoded per vectorised step (bounds temporary memory)


# ---- public API ----------------------------------------------------------------------------
def read_letor(
    path: str | os.PathLike[str], num_features: int | None = None, cache: bool = True
) -> ExampleSets:
    """Read one LETOR/SVMlight file (plain or ``.gz``) into :class:`ExampleSets`.

    Args:
        path: the file.
        num_features: the declared feature count; an index above it is an error. ``None``
            uses the largest index in the file.
        cache: use and refresh the ``.npz`` cache (see the module docstring).

    Raises:
        DataFormatError: the file is missing, empty or malformed; the message names the file,
            the line and what was expected.
    """
    src = Path(path)
    if not src.is_file():
        raise DataFormatError(f"{src}: no such data file")
    if num_features is not None and (int(num_features) != num_features or num_features < 0):
        raise DataFormatError(f"num_features must be a non-negative integer, got {num_features!r}")
    limit = max_data_bytes()
    try:
        raw = src.read_bytes()
        key = None
        if cache:
            key = _cache_key(src, raw, num_features)
            hit = _cache_load(src, key)
            if hit is not None:
                STATS["cache_hits"] += 1
                return hit
        sets = _parse(raw, src, num_features, limit)
    except MemoryError:
        raise DataFormatError(
            f"{src}: not enough memory to read it ({src.stat().st_size:,} bytes on disk)"
        ) from None
    STATS["parses"] += 1
    if cache and key is not None:
        _cache_store(src, key, sets)
    return sets


def read_letor_folder(
    path: str | os.PathLike[str], num_features: int | None = None, cache: bool = True
) -> dict[str, ExampleSets]:
    """Read a LETOR fold folder: ``train``, ``vali`` and ``test`` (``.txt`` or ``.txt.gz``).

    Returns the parts present (``train`` is required), all with the same feature count (the
    largest index over the parts unless ``num_features`` is given; narrower parts are padded
    with zero columns, which is what a missing index means anyway).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: no such data folder")
    found = {name: f for name in SPLIT_NAMES if (f := find_split_file(folder, name)) is not None}
    if "train" not in found:
        raise DataFormatError(
            f"{folder}: expected a LETOR fold folder with train.txt or train.txt.gz "
            f"(and optionally vali/test), found {sorted(p.name for p in folder.iterdir())[:10]}"
        )
    parts = {
        name: read_letor(f, num_features=num_features, cache=cache) for name, f in found.items()
    }
    width = max(p.num_features for p in parts.values())
    return {name: _widen(p, width) for name, p in parts.items()}


def find_split_file(folder: Path, name: str) -> Path | None:
    """``folder/name.txt`` or ``folder/name.txt.gz`` (plain preferred), else ``None``."""
    for candidate in (folder / f"{name}.txt", folder / f"{name}.txt.gz"):
        if candidate.is_file():
            return candidate
    return None


def max_data_bytes() -> int:
    """The reader's limit in bytes: ``$FEDRANK_MAX_DATA_BYTES`` if set, else 4 GiB."""
    text = os.environ.get(_LIMIT_ENV, "").strip()
    if not text:
        return MAX_DATA_BYTES
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 1):
        raise DataFormatError(f"{_LIMIT_ENV} must be a number of bytes >= 1, got {text!r}")
    return int(value)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def user_cache_dir() -> Path:
    """``$FEDRANK_CACHE_DIR`` if set, else ``~/.cache/fedrank``."""
    env = os.environ.get("FEDRANK_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedrank"


def cache_path_for(path: str | os.PathLike[str]) -> Path:
    """Where the cache of ``path`` is written: beside it if writable, else the user cache."""
    src = Path(path)
    beside, user = _cache_candidates(src)
    return beside if _dir_writable(src.parent) else user


# ---- parsing: fast path ----------------------------------------------------------------------
def _decode(raw: bytes, src: Path, limit: int) -> bytes:
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:  # at most `limit` bytes: a small file must not inflate into all of memory
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as fh:
            data = fh.read(limit + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise DataFormatError(f"{src}: not a readable gzip file ({err})") from None
    if len(data) > limit:
        raise DataFormatError(
            f"{src}: decompresses to more than {_gib(limit)}, the reader's limit "
            f"(set {_LIMIT_ENV} to allow more)"
        )
    return data


def _parse(raw: bytes, src: Path, num_features: int | None, limit: int) -> ExampleSets:
    data = _decode(raw, src, limit)
    lines = data.split(b"\n")
    labels: list[bytes] = []
    qids: list[bytes] = []
    rests: list[bytes] = []
    comments: list[bytes] = []
    ok = True
    for line in lines:
        body, _, comment = line.partition(b"#")
        parts = body.split(None, 2)
        if not parts:
            continue
        if len(parts) < 2 or parts[1][:4] != b"qid:" or len(parts[1]) == 4:
            ok = False
            break
        labels.append(parts[0])
        qids.append(parts[1][4:])
        rests.append(parts[2] if len(parts) > 2 else b"")
        comments.append(comment)
    if not labels and ok:
        raise DataFormatError(f"{src}: empty file (no data lines)")
    result = _fast_arrays(labels, qids, rests, num_features, limit) if ok else None
    if result is None:  # something unusual or wrong: the line parser decides and explains
        return _parse_lines(lines, src, num_features, limit)
    y, feats, offsets, set_ids = result
    item_ids = _item_ids(comments)
    return ExampleSets(
        features=feats, labels=y, offsets=offsets, set_ids=set_ids, item_ids=item_ids
    )


def _fits_float32(values: np.ndarray) -> bool:
    """True when every value is finite and stays finite in float32."""
    return bool(np.all(np.isfinite(values)) and np.all(np.abs(values) <= _FLOAT32_MAX))


def _fast_arrays(
    labels: list[bytes],
    qids: list[bytes],
    rests: list[bytes],
    num_features: int | None,
    limit: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Vectorised decoding; ``None`` when any check fails (the slow path then explains)."""
    n = len(labels)
    if b"_" in b" ".join(labels):  # numpy, like float(), would accept 1_0
        return None
    try:
        y = np.array(labels).astype(np.float64)
    except ValueError:
        return None
    if not _fits_float32(y):
        return None
    # sets: qids must form contiguous runs with distinct ids
    q = np.array(qids)
    change = np.ones(n, dtype=bool)
    change[1:] = q[1:] != q[:-1]
    starts = np.flatnonzero(change)
    run_ids = q[starts]
    if np.unique(run_ids).size != run_ids.size:
        return None
    try:
        set_ids = np.array([r.decode("utf-8") for r in run_ids.tolist()])
    except UnicodeDecodeError:
        return None
    offsets = np.append(starts, n).astype(np.int64)

    pairs = np.fromiter((r.count(b":") for r in rests), dtype=np.int64, count=n)
    buf = b" ".join(rests)
    decoded = _decode_pairs(buf, int(pairs.sum()))
    if decoded is None:
        return None
    index, value = decoded
    if not _fits_float32(value):
        return None
    row = np.repeat(np.arange(n, dtype=np.int64), pairs)
    if index.size:
        if index.min() < 1:
            return None
        # strictly increasing within a line
        inc = np.diff(index) > 0
        same_row = row[1:] == row[:-1]
        if np.any(same_row & ~inc):
            return None
    width = int(index.max()) if index.size else 0
    if num_features is not None:
        if width > num_features:
            return None
        width = int(num_features)
    if n * width * 4 > limit:
        return None
    feats = np.zeros((n, width), dtype=np.float32)
    feats[row, index - 1] = value
    return y.astype(np.float32), feats, offsets, set_ids


def _decode_pairs(buf: bytes, expected: int) -> tuple[np.ndarray, np.ndarray] | None:
    """All ``index:value`` tokens of ``buf`` -> (int64 indices, float64 values), or ``None``."""
    b = np.frombuffer(buf, dtype=np.uint8)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float64))
    colon = np.flatnonzero(b == 58)
    if colon.size != expected:
        return None
    ws = np.flatnonzero(_WS[b])
    if expected == 0:
        return empty if ws.size == b.size else None
    # the token around each colon: from the whitespace before it to the whitespace after it
    k = np.searchsorted(ws, colon)
    if np.any(k[1:] == k[:-1]):  # two colons in one token
        return None
    edges = np.concatenate(([-1], ws, [b.size]))
    start = edges[k] + 1
    stop = edges[k + 1]
    if int((stop - start).sum()) != b.size - ws.size:  # a token without a colon
        return None
    if np.any(colon == start) or np.any(colon >= stop - 1):  # empty index or value
        return None
    index = _decode_uints(b, start, colon)
    if index is None:
        return None
    value = np.empty(expected, dtype=np.float64)
    slow = _decode_floats(b, colon + 1, stop, value)
    for t in np.flatnonzero(slow):  # rare: exponents, long or invalid tokens
        v = _number(buf[colon[t] + 1 : stop[t]])
        if v is None:
            return None
        value[t] = v
    return index, value


def _decode_uints(b: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray | None:
    """Unsigned decimal integers ``b[start:stop]`` (at most 15 digits), or ``None``."""
    length = stop - start
    width = int(length.max())
    if width > 15:
        return None
    out = np.zeros(start.size, dtype=np.int64)
    for r in range(width):  # digit position counted from the right
        inside = r < length
        d = b[np.maximum(stop - 1 - r, 0)] - np.uint8(48)  # non-digits wrap above 9
        if np.any(inside & (d > 9)):
            return None
        out += (d * inside).astype(np.int64) * (10**r)
    return out


def _decode_floats(
    b: np.ndarray, start: np.ndarray, stop: np.ndarray, out: np.ndarray
) -> np.ndarray:
    """Plain decimals ``[+-]digits[.digits]`` in ``b[start:stop]`` into ``out``.

    Returns a mask of the tokens left undone (exponents, more than 15 digits, anything
    unusual), which the caller decodes with ``float()``. A value is ``mantissa / 10**frac``
    with an exact integer mantissa and an exact power of ten, hence the correctly rounded
    double: the same value ``float()`` gives.
    """
    first = b[start]
    sign = (first == 45) | (first == 43)
    neg = first == 45
    # the dot of each token (at most one), found once over the whole buffer
    dots = np.flatnonzero(b == 46)
    owner = np.searchsorted(stop, dots, side="right")
    per_token = np.bincount(owner, minlength=start.size)
    dot_at = np.full(start.size, -1, dtype=np.int64)
    dot_at[owner] = dots
    has_dot = dot_at >= 0
    frac = np.where(has_dot, stop - 1 - dot_at, 0)
    ndig = stop - start - sign - has_dot
    slow = (per_token > 1) | (ndig < 1) | (ndig > 15)
    width = int(min(ndig.max(), 15))
    for lo in range(0, start.size, _CHUNK):  # bounded temporaries on huge files
        hi = lo + _CHUNK
        e, f, hd, n = stop[lo:hi], frac[lo:hi], has_dot[lo:hi], ndig[lo:hi]
        mant = np.zeros(e.size, dtype=np.float64)
        bad = np.zeros(e.size, dtype=bool)
        at = e.copy()  # byte of the current digit, walking right to left over the dot
        dot_next = np.where(hd, f, -1)  # the dot sits left of digit number `frac`
        for r in range(width):
            at -= 1
            at -= dot_next == r
            d = np.take(b, at, mode="clip") - np.uint8(48)  # wraps above 9 if not a digit
            d *= r < n  # digits past the token's length count as 0
            bad |= d > 9
            mant += d * _POW10[r]
        value = mant / _POW10[np.clip(f, 0, 22)]
        out[lo:hi] = np.where(neg[lo:hi], -value, value)
        slow[lo:hi] |= bad
    return slow


def _item_ids(comments: list[bytes]) -> np.ndarray | None:
    found = [m.group(1) if (m := _DOCID.search(c)) else None for c in comments]
    if any(f is None for f in found):
        return None  # ids only when every line has one
    return np.array([f.decode("utf-8", "replace") for f in found])  # type: ignore[union-attr]


def _widen(sets: ExampleSets, width: int) -> ExampleSets:
    if sets.num_features == width:
        return sets
    feats = np.zeros((sets.num_items, width), dtype=np.float32)
    feats[:, : sets.num_features] = sets.features
    return ExampleSets(
        features=feats,
        labels=sets.labels,
        offsets=sets.offsets,
        set_ids=sets.set_ids,
        item_ids=sets.item_ids,
        relevance=sets.relevance,
    )


# ---- parsing: line by line (reference and error messages) -----------------------------------
def read_letor_slow(path: str | os.PathLike[str], num_features: int | None = None) -> ExampleSets:
    """Plain line-by-line parse (no cache): the reference the fast path is tested against."""
    src = Path(path)
    if not src.is_file():
        raise DataFormatError(f"{src}: no such data file")
    limit = max_data_bytes()
    lines = _decode(src.read_bytes(), src, limit).split(b"\n")
    return _parse_lines(lines, src, num_features, limit)


def _parse_lines(
    lines: list[bytes], src: Path, num_features: int | None, limit: int
) -> ExampleSets:
    labels: list[float] = []
    rows: list[dict[int, float]] = []
    set_ids: list[str] = []
    sizes: list[int] = []
    docids: list[str | None] = []
    seen: dict[str, int] = {}
    width = 0
    width_line = 0  # the line holding the largest feature index

    for lineno, line in enumerate(lines, start=1):
        body, _, comment = line.partition(b"#")
        tokens = body.split()
        if not tokens:
            continue

        def fail(what: str, _lineno: int = lineno) -> DataFormatError:
            return DataFormatError(f"{src}, line {_lineno}: {what}")

        label = _number(tokens[0])
        if label is None:
            raise fail(f"expected a numeric label as the first token, got {_show(tokens[0])}")
        if abs(label) > _FLOAT32_MAX:
            raise fail(f"label {_show(tokens[0])} is outside the float32 range (|x| <= 3.4e38)")
        if len(tokens) < 2 or not tokens[1].startswith(b"qid:") or len(tokens[1]) == 4:
            got = _show(tokens[1]) if len(tokens) > 1 else "end of line"
            raise fail(f"expected 'qid:<id>' after the label, got {got}")
        try:
            qid = tokens[1][4:].decode("utf-8")
        except UnicodeDecodeError:
            raise fail(f"the set id in {_show(tokens[1])} is not valid UTF-8") from None
        feats: dict[int, float] = {}
        prev = 0
        for tok in tokens[2:]:
            idx_b, colon, val_b = tok.partition(b":")
            if not colon or not idx_b or not val_b or b":" in val_b:
                raise fail(f"expected '<index>:<value>', got {_show(tok)}")
            if not idx_b.isdigit():
                raise fail(f"expected an integer feature index in {_show(tok)}")
            idx = int(idx_b)
            if idx < 1:
                raise fail(f"feature indices start at 1, got {_show(tok)}")
            if num_features is not None and idx > num_features:
                raise fail(f"feature index {idx} is past the declared feature count {num_features}")
            if idx <= prev:
                raise fail(f"feature indices must increase along a line; {idx} follows {prev}")
            value = _number(val_b)
            if value is None:
                raise fail(f"expected a finite numeric value in {_show(tok)}")
            if abs(value) > _FLOAT32_MAX:
                raise fail(f"value {_show(tok)} is outside the float32 range (|x| <= 3.4e38)")
            feats[idx] = value
            prev = idx
            if idx > width:
                width, width_line = idx, lineno
        if not set_ids or set_ids[-1] != qid:
            if qid in seen:
                raise fail(
                    f"items of set qid:{qid} are split across the file (first seen on line "
                    f"{seen[qid]}, other sets in between); a set's lines must be contiguous"
                )
            seen[qid] = lineno
            set_ids.append(qid)
            sizes.append(0)
        sizes[-1] += 1
        labels.append(label)
        rows.append(feats)
        m = _DOCID.search(comment)
        docids.append(m.group(1).decode("utf-8", "replace") if m else None)

    if not labels:
        raise DataFormatError(f"{src}: empty file (no data lines)")
    if num_features is not None:
        width = int(num_features)
    dense = len(rows) * width * 4
    if dense > limit:
        where = f"{src}, line {width_line}: feature index {width}" if width_line else f"{src}:"
        raise DataFormatError(
            f"{where} makes the dense feature matrix {len(rows):,} items x {width:,} features "
            f"x 4 bytes = {_gib(dense)}, above the reader's limit of {_gib(limit)} "
            f"(set {_LIMIT_ENV} to allow more)"
        )
    features = np.zeros((len(rows), width), dtype=np.float32)
    for r, feats in enumerate(rows):
        for idx, value in feats.items():
            features[r, idx - 1] = value
    return ExampleSets(
        features=features,
        labels=np.array(labels, dtype=np.float32),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        set_ids=np.array(set_ids),
        item_ids=None if any(d is None for d in docids) else np.array(docids),
    )


def _number(tok: bytes) -> float | None:
    if b"_" in tok:
        return None
    try:
        v = float(tok)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _show(tok: bytes, limit: int = 40) -> str:
    text = tok.decode("utf-8", "replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


# ---- cache ---------------------------------------------------------------------------------
def _cache_candidates(src: Path) -> tuple[Path, Path]:
    resolved = str(src.resolve())
    tag = hashlib.sha256(resolved.encode("utf-8")).hexdigest()[:16]
    beside = src.with_name(src.name + CACHE_SUFFIX)
    user = user_cache_dir() / "letor" / f"{tag}-{src.name}{CACHE_SUFFIX}"
    return beside, user


def _dir_writable(folder: Path) -> bool:
    """Writable by us *and* not marked read-only (root ignores mode bits; we respect them)."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return os.access(folder, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _cache_key(src: Path, raw: bytes, num_features: int | None) -> dict[str, object]:
    st = src.stat()
    return {
        "reader_version": READER_VERSION,
        "size": len(raw),
        "mtime_ns": st.st_mtime_ns,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "num_features": num_features,
    }


def _cache_load(src: Path, key: dict[str, object]) -> ExampleSets | None:
    for candidate in _cache_candidates(src):
        if not candidate.is_file():
            continue
        try:
            with np.load(candidate, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                same = all(meta.get(k) == key[k] for k in ("reader_version", "size", "sha256"))
                if not same or meta.get("num_features") != key["num_features"]:
                    continue
                return ExampleSets(
                    features=z["features"],
                    labels=z["labels"],
                    offsets=z["offsets"],
                    set_ids=z["set_ids"],
                    item_ids=z["item_ids"] if "item_ids" in z.files else None,
                )
        except Exception:  # corrupt or unreadable cache: re-parse (and overwrite) silently
            continue
    return None


def _cache_store(src: Path, key: dict[str, object], sets: ExampleSets) -> None:
    beside, user = _cache_candidates(src)
    targets = [beside, user] if _dir_writable(src.parent) else [user]
    arrays = {
        "meta": np.array(json.dumps(key, sort_keys=True)),
        "features": sets.features,
        "labels": sets.labels,
        "offsets": sets.offsets,
        "set_ids": sets.set_ids,
    }
    if sets.item_ids is not None:
        arrays["item_ids"] = sets.item_ids
    for target in targets:
        try:
            with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        except OSError:
            continue
        STATS["cache_writes"] += 1
        return
    warnings.warn(f"could not write a LETOR cache for {src}", RuntimeWarning, stacklevel=3)


# ---- writing -------------------------------------------------------------------------------
def write_letor(sets: ExampleSets, path: str | os.PathLike[str]) -> Path:
    """Write ``sets`` as a LETOR/SVMlight text file (atomically; ``.gz`` in the name gzips it).

    Every feature is written (dense, ``repr`` precision of float32, so reading it back gives
    the same float32 values); item ids become ``# docid = ...`` comments.
    """
    target = Path(path)
    lines = []
    feats = sets.features
    labels = sets.labels
    for s in range(sets.num_sets):
        qid = sets.set_ids[s]
        for i in range(int(sets.offsets[s]), int(sets.offsets[s + 1])):
            values = " ".join(f"{j + 1}:{float(v)!r}" for j, v in enumerate(feats[i].tolist()))
            label = f"{float(labels[i]):g}"
            comment = f" #docid = {sets.item_ids[i]}" if sets.item_ids is not None else ""
            lines.append(f"{label} qid:{qid} {values}{comment}\n")
    data = "".join(lines).encode("utf-8")
    if target.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target
