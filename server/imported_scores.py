"""Imported teacher scores: distil the ranker you already have.

:func:`import_scores` reads an existing ranker's scores for every item of the data and
returns them in the data's item order; :func:`import_score_table` makes the versioned score
table of them. Three file formats:

- **TREC run** (any other suffix, optionally ``.gz``): ``qid Q0 docid rank score tag``,
  whitespace separated, one item per line; the rank column is ignored (as ``trec_eval`` does)
  and blank lines are skipped. This is what ``fedrank score`` writes.
- **CSV** (``.csv``, ``.tsv`` tab separated, optionally ``.gz``) with a header naming a set
  column (``set_id``, ``set``, ``qid``, ``query_id``), an item column (``item_id``, ``item``,
  ``docid``, ``doc_id``, ``docno``) *or* a position column (``position``, ``item_position``),
  and ``score``; names are case-insensitive, other columns are ignored.
- **Parquet** (``.parquet``, ``.pq``), the same columns; needs ``pyarrow``
  (``pip install 'fedrank[parquet]'``).

Items are matched by id: LETOR files give item ids in their ``#docid = ...`` comments. When the
data has no item ids, an item id is the 0-based position of the item within its set (what
``fedrank score`` writes then); a position column always matches by position. Every item of the
data must get exactly one finite score: a missing, duplicated or extra item, an unparsable or
non-finite score is a :class:`~fedrank.common.errors.DataFormatError` naming the file and line (for
a Parquet file, the row) and the set and item.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from fedrank.common.errors import ConfigError, DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.score_table import ScoreTable

try:  # an optional dependency: only Parquet score files need it
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover - exercised where pyarrow is not installed
    pq = None

__all__ = [
    "COLUMN_NAMES",
    "FORMATS",
    "detect_format",
    "import_score_table",
    "import_scores",
    "read_score_rows",
]

FORMATS = ("trec", "csv", "parquet")
# accepted column names (lower case) of CSV and Parquet score files
COLUMN_NAMES: dict[str, tuple[str, ...]] = {
    "set": ("set_id", "set", "qid", "query_id"),
    "item": ("item_id", "item", "docid", "doc_id", "docno"),
    "position": ("position", "item_position"),
    "score": ("score",),
}
_PARQUET_BATCH = 1 << 16

# one row of a score file: (line or row number, set id, item id or position, by position?, score)
Row = tuple[int, str, str, bool, float]


def detect_format(path: str | os.PathLike[str]) -> str:
    """``trec``, ``csv`` or ``parquet`` from the file name (``.gz`` looked through)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in (".parquet", ".pq"):
        return "parquet"
    if last in (".csv", ".tsv"):
        return "csv"
    return "trec"


def _open_text(path: Path) -> TextIO:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115 - the caller closes it


def _score(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(f"{where}: score {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataFormatError(f"{where}: score {text!r} is not finite (NaN or inf are refused)")
    return value


def _trec_rows(path: Path) -> Iterator[Row]:
    with _open_text(path) as fh:
        try:
            for number, line in enumerate(fh, 1):
                fields = line.split()
                if not fields:
                    continue
                where = f"{path}:{number}"
                if len(fields) != 6:
                    raise DataFormatError(
                        f"{where}: expected 6 fields 'qid Q0 docid rank score tag' (TREC run), "
                        f"got {len(fields)}"
                    )
                yield number, fields[0], fields[2], False, _score(fields[4], where)
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: not utf-8 text ({err})") from None


def _pick_columns(names: list[str], source: str) -> dict[str, str]:
    """The column of each role among ``names`` (matched case-insensitively)."""
    lower = {n.strip().lower(): n for n in names}
    chosen: dict[str, str] = {}
    for role, accepted in COLUMN_NAMES.items():
        found = [lower[a] for a in accepted if a in lower]
        if len(found) > 1:
            raise DataFormatError(f"{source}: columns {found} all name the {role}; keep one")
        if found:
            chosen[role] = found[0]
    for role in ("set", "score"):
        if role not in chosen:
            raise DataFormatError(
                f"{source}: no {role} column; expected one of {list(COLUMN_NAMES[role])} "
                f"(columns: {names})"
            )
    if ("item" in chosen) == ("position" in chosen):
        raise DataFormatError(
            f"{source}: expected exactly one item column ({list(COLUMN_NAMES['item'])}) or "
            f"position column ({list(COLUMN_NAMES['position'])}), columns: {names}"
        )
    return chosen


def _csv_rows(path: Path) -> Iterator[Row]:
    delimiter = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    with _open_text(path) as fh:
        try:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DataFormatError(f"{path}: empty file, expected a header line")
            cols = _pick_columns(header, f"{path}:1")
            at = {role: header.index(name) for role, name in cols.items()}
            by_position = "position" in cols
            item_col = at["position" if by_position else "item"]
            width = len(header)
            for row in reader:
                number = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                where = f"{path}:{number}"
                if len(row) != width:
                    raise DataFormatError(f"{where}: {len(row)} fields, the header has {width}")
                yield (
                    number,
                    row[at["set"]].strip(),
                    row[item_col].strip(),
                    by_position,
                    _score(row[at["score"]].strip(), where),
                )
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: not utf-8 text ({err})") from None
        except csv.Error as err:
            raise DataFormatError(f"{path}: malformed CSV ({err})") from None


def _id_text(value: Any) -> str:
    """A set or item id from a Parquet cell: ints (also integral floats) as their digits."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _parquet_rows(path: Path) -> Iterator[Row]:
    if pq is None:
        raise ConfigError(
            f"{path}: reading Parquet score files needs pyarrow: pip install 'fedrank[parquet]' "
            "(or write the scores as CSV or a TREC run)"
        )
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataFormatError(f"{path}: not a readable Parquet file ({err})") from None
    cols = _pick_columns(list(parquet.schema_arrow.names), str(path))
    by_position = "position" in cols
    wanted = [cols["set"], cols["position" if by_position else "item"], cols["score"]]
    number = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=wanted):
        sets, items, scores = (batch.column(i).to_pylist() for i in range(3))
        for set_id, item, score in zip(sets, items, scores, strict=True):
            number += 1
            where = f"{path}: row {number}"
            if set_id is None or item is None or score is None:
                raise DataFormatError(f"{where}: empty cell (set, item and score are needed)")
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise DataFormatError(f"{where}: score {score!r} is not a number")
            if not math.isfinite(float(score)):
                raise DataFormatError(f"{where}: score {score!r} is not finite (NaN or inf)")
            yield number, _id_text(set_id), _id_text(item), by_position, float(score)


def read_score_rows(path: str | os.PathLike[str], fmt: str | None = None) -> Iterator[Row]:
    """The rows of a score file: ``(line, set id, item id or position, by_position, score)``."""
    source = Path(path)
    if not source.is_file():
        raise DataFormatError(f"{source}: no such score file")
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise ConfigError(f"score file format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    reader = {"trec": _trec_rows, "csv": _csv_rows, "parquet": _parquet_rows}[fmt]
    return reader(source)


class _ItemIndex:
    """Finds the flat item index of (set id, item id or position) in ``sets``."""

    def __init__(self, sets: ExampleSets, source: Path) -> None:
        self.sets = sets
        self.source = source
        self.set_pos = {s: k for k, s in enumerate(sets.set_ids.tolist())}
        self.by_id: dict[int, dict[str, int]] = {}

    def _ids_of(self, k: int) -> dict[str, int]:
        table = self.by_id.get(k)
        if table is None:
            lo, hi = int(self.sets.offsets[k]), int(self.sets.offsets[k + 1])
            ids = self.sets.item_ids[lo:hi].tolist()  # type: ignore[index]
            table = {item: lo + i for i, item in enumerate(ids)}
            if len(table) != len(ids):
                values, counts = np.unique(np.asarray(ids), return_counts=True)
                dup = str(values[counts > 1][0])
                set_id = str(self.sets.set_ids[k])
                raise DataFormatError(
                    f"set {set_id!r} of the data holds item id {dup!r} twice, so {self.source} "
                    "cannot be matched by id; give positions instead (a 'position' column in "
                    "CSV or Parquet)"
                )
            self.by_id[k] = table
        return table

    def find(self, where: str, set_id: str, item: str, by_position: bool) -> int:
        k = self.set_pos.get(set_id)
        if k is None:
            raise DataFormatError(f"{where}: set {set_id!r} is not in the data (extra item)")
        if by_position or self.sets.item_ids is None:
            lo, hi = int(self.sets.offsets[k]), int(self.sets.offsets[k + 1])
            try:
                position = int(item)
            except ValueError:
                raise DataFormatError(
                    f"{where}: item {item!r} of set {set_id!r} is not a position; the data "
                    "has no item ids, so items are matched by their 0-based position in the set"
                ) from None
            if not 0 <= position < hi - lo:
                raise DataFormatError(
                    f"{where}: position {position} is outside set {set_id!r} "
                    f"({hi - lo} items, positions 0..{hi - lo - 1}): extra item"
                )
            return lo + position
        index = self._ids_of(k).get(item)
        if index is None:
            raise DataFormatError(
                f"{where}: item {item!r} is not in set {set_id!r} of the data (extra item)"
            )
        return index

    def describe(self, index: int) -> str:
        k = int(np.searchsorted(self.sets.offsets, index, side="right") - 1)
        position = index - int(self.sets.offsets[k])
        if self.sets.item_ids is not None:
            return f"item {str(self.sets.item_ids[index])!r} of set {str(self.sets.set_ids[k])!r}"
        return f"position {position} of set {str(self.sets.set_ids[k])!r}"


def import_scores(
    path: str | os.PathLike[str], sets: ExampleSets, fmt: str | None = None
) -> np.ndarray:
    """Flat float32 scores ``[sets.num_items]`` from a score file, in the item order of
    ``sets``; every item must be matched exactly once (DataFormatError otherwise)."""
    source = Path(path)
    fmt = fmt or detect_format(source)
    line = "row" if fmt == "parquet" else "line"
    index = _ItemIndex(sets, source)
    scores = np.zeros(sets.num_items, dtype=np.float32)
    line_of = np.zeros(sets.num_items, dtype=np.int64)  # 0: not seen yet
    for number, set_id, item, by_position, score in read_score_rows(source, fmt):
        where = f"{source}: row {number}" if fmt == "parquet" else f"{source}:{number}"
        at = index.find(where, set_id, item, by_position)
        if line_of[at]:
            raise DataFormatError(
                f"{where}: {index.describe(at)} is scored twice "
                f"(first on {line} {int(line_of[at])}): duplicated item"
            )
        if abs(score) > float(np.finfo(np.float32).max):
            raise DataFormatError(f"{where}: score {score!r} overflows float32")
        line_of[at] = number
        scores[at] = score
    missing = np.flatnonzero(line_of == 0)
    if missing.size:
        raise DataFormatError(
            f"{source}: {index.describe(int(missing[0]))} has no score (missing item; "
            f"{missing.size} of {sets.num_items} items of the data have none)"
        )
    return scores


def import_score_table(
    path: str | os.PathLike[str],
    sets: ExampleSets,
    out: str | os.PathLike[str] | None = None,
    fmt: str | None = None,
) -> ScoreTable:
    """The versioned score table (content hash) of a score file for ``sets``; with ``out``
    written as a table folder there (atomically) and returned memory-mapped."""
    table = ScoreTable.from_scores(sets, import_scores(path, sets, fmt))
    if out is None:
        return table
    table.save(out)
    return ScoreTable.open(out, verify=False)
