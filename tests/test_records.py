"""Flower record conversion: model weights (validated) and score tables (no pickle)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedrank.common.errors import CheckpointError, ScoreTableError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.records import (
    DecodedArray,
    array_from_numpy,
    array_numpy,
    load_arrays,
    model_to_arrays,
    record_nbytes,
    score_table_from_record,
    score_table_to_record,
)
from fedrank.common.score_table import ScoreTable


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.out = torch.nn.Linear(3, 1)
        self.register_buffer("cols", torch.arange(4, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.lin(x[..., self.cols]))).squeeze(-1)


def fresh(seed: int) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def test_model_round_trip():
    src, dst = fresh(0), fresh(1)
    record = model_to_arrays(src)
    assert isinstance(record, ArrayRecord)
    assert list(record.keys()) == list(src.state_dict().keys())
    load_arrays(dst, record)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # the record survives Flower's own (de)serialisation inside a RecordDict
    rd = RecordDict({"weights": record})
    assert isinstance(rd["weights"], ArrayRecord)


def test_load_arrays_accepts_numpy_mapping():
    src, dst = fresh(0), fresh(1)
    load_arrays(dst, {k: v.numpy() for k, v in src.state_dict().items()})
    torch.testing.assert_close(dst.lin.weight, src.lin.weight)


def _arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _unchanged(model: Tiny, before: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(v.numpy(), before[k]) for k, v in model.state_dict().items())


def test_load_arrays_rejects_nan_naming_key():
    src, dst = fresh(0), fresh(1)
    before = _arrays(dst)
    arrays = _arrays(src)
    arrays["out.weight"][0, 1] = np.nan
    with pytest.raises(CheckpointError, match="'out.weight'.*non-finite"):
        load_arrays(dst, ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}))
    assert _unchanged(dst, before)
    arrays["out.weight"][0, 1] = np.inf
    with pytest.raises(CheckpointError, match="'out.weight'"):
        load_arrays(dst, arrays)


def test_load_arrays_rejects_wrong_shape_naming_key():
    dst = fresh(1)
    arrays = _arrays(fresh(0))
    arrays["lin.weight"] = np.zeros((3, 5), np.float32)
    with pytest.raises(
        CheckpointError, match=r"'lin.weight' has shape \(3, 5\), expected \(3, 4\)"
    ):
        load_arrays(dst, arrays)


def test_load_arrays_rejects_missing_and_unexpected_keys():
    dst = fresh(1)
    arrays = _arrays(fresh(0))
    del arrays["lin.bias"]
    with pytest.raises(CheckpointError, match="miss key 'lin.bias'"):
        load_arrays(dst, arrays)
    arrays = _arrays(fresh(0))
    arrays["extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'"):
        load_arrays(dst, arrays)


def make_table() -> tuple[ScoreTable, ExampleSets]:
    sizes = [3, 1, 5]
    n = sum(sizes)
    sets = ExampleSets(
        features=np.zeros((n, 2), np.float32),
        labels=np.zeros(n, np.float32),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        set_ids=["qid:10", "héllo wörld", "line\nbreak"],  # non-ascii and newline survive
    )
    scores = np.linspace(-3, 3, n).astype(np.float32)
    return ScoreTable.from_scores(sets, scores), sets


@pytest.mark.parametrize("half", [False, True])
def test_score_table_record_round_trip(half):
    table, sets = make_table()
    table = table.to_float16() if half else table
    record = score_table_to_record(table)
    assert isinstance(record, ArrayRecord)
    # every array deserialises without pickle (Array.numpy uses allow_pickle=False)
    for value in record.values():
        assert value.numpy().dtype != object
    back = score_table_from_record(record)
    assert back.equals(table) and back.dtype == table.dtype
    assert back.set_ids.tolist() == ["qid:10", "héllo wörld", "line\nbreak"]
    np.testing.assert_array_equal(back.align(sets), table.align(sets))


def test_score_table_record_subset_keeps_version():
    table, _ = make_table()
    back = score_table_from_record(score_table_to_record(table.subset(["héllo wörld"])))
    assert back.version == table.version and back.num_sets == 1


def test_score_table_record_tampered_or_incomplete():
    table, _ = make_table()
    record = score_table_to_record(table)
    scores = record["scores"].numpy().copy()
    scores[0] += 1.0
    record["scores"] = Array(scores)
    with pytest.raises(ScoreTableError, match="checksum"):
        score_table_from_record(record)
    record = score_table_to_record(table)
    del record["sizes"]
    with pytest.raises(ScoreTableError, match="'sizes'"):
        score_table_from_record(record)


def test_record_nbytes():
    table, _ = make_table()
    full = score_table_to_record(table)
    half = score_table_to_record(table.to_float16())
    assert record_nbytes(full) > table.scores.nbytes
    assert record_nbytes(full) - record_nbytes(half) == table.num_items * 2
    assert record_nbytes(full) == full.count_bytes()
    assert record_nbytes(ConfigRecord({"lr": 0.1})) > 0
    with pytest.raises(TypeError):
        record_nbytes(object())


@pytest.mark.parametrize(
    "value",
    [
        np.random.default_rng(0).normal(size=(16, 12)).astype(np.float32),
        np.arange(12, dtype=np.int64),
        np.array([True, False, True]),
        np.array(3.5),  # 0-d
        np.zeros((0, 3), dtype=np.float16),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),  # a Fortran-ordered header
        np.array([1, 2], dtype=">i4"),  # big-endian
        np.zeros((2, 3, 4), dtype=np.uint8),
        np.arange(30.0).reshape(5, 6)[:, ::2],  # not contiguous
    ],
    ids=["f32", "i64", "bool", "0d", "empty", "fortran", "big-endian", "u8-3d", "strided"],
)
def test_array_codec_matches_flowers(value: np.ndarray) -> None:
    """The direct reader and writer give what Flower's ``Array`` gives: the same bytes (and
    object id) written, the same array read."""
    array = Array(value)
    written = array_from_numpy(value)
    assert (written.dtype, written.shape, written.stype) == (array.dtype, array.shape, array.stype)
    assert written.data == array.data and written.object_id == array.object_id
    kept = DecodedArray(value)
    assert np.array_equal(kept.numpy(), array.numpy())
    assert (kept.numpy().dtype, kept.numpy().shape) == (array.numpy().dtype, array.numpy().shape)
    assert np.array_equal(np.load(io.BytesIO(kept.data)), value)  # its bytes hold the values
    fast, flower = array_numpy(array), array.numpy()
    assert fast.dtype == flower.dtype and fast.shape == flower.shape
    assert np.array_equal(fast, flower) and fast.flags.writeable
    fast[...] = 0  # a copy: the message's bytes are not changed
    assert np.array_equal(array.numpy(), value)


def test_array_numpy_trusts_the_header_not_the_declared_shape_or_a_short_buffer() -> None:
    data = Array(np.zeros(3, dtype=np.float32)).data
    # a reply declaring another shape than its bytes hold reads as its bytes say (the
    # weights check then refuses the shape), exactly as Flower's own reader does
    lying = Array(dtype="float32", shape=(2, 2), stype="numpy.ndarray", data=data)
    assert array_numpy(lying).shape == lying.numpy().shape == (3,)
    short = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=data[:-4])
    with pytest.raises(ValueError):
        short.numpy()
    with pytest.raises(ValueError):
        array_numpy(short)


def test_a_decoded_array_forgets_its_values_when_its_bytes_change() -> None:
    kept = DecodedArray(np.ones(3, dtype=np.float32))
    kept.numpy()[0] = 5.0  # a copy each time
    assert kept.numpy().tolist() == [1.0, 1.0, 1.0]
    other = Array(np.arange(3, dtype=np.float32))
    kept.data = other.data
    assert kept.numpy().tolist() == [0.0, 1.0, 2.0]
