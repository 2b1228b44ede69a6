"""Student export (TorchScript, ONNX) and on-device scoring: `fedrank export` / `fedrank score`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from client.export import (
    EXPORT_FORMAT,
    export_student,
    load_exported,
    load_run_student,
    ndcg10,
    rank_sets,
)
from common.cli import main as fedrank
from common.errors import CheckpointError, DataFormatError
from common.letor import read_letor
from common.models import StudentModel, score_sets

REPO = Path(__file__).resolve().parents[1]
MQ2008 = REPO / ".." / "shared" / "data" / "MQ2008" / "Fold1"
TEST_FILE = MQ2008 / "test.txt.gz"


@pytest.fixture(scope="module")
def test_sets():
    return read_letor(TEST_FILE)


@pytest.fixture(scope="module")
def student(test_sets):
    torch.manual_seed(3)
    model = StudentModel(
        test_sets.num_features, hidden=(16,), feature_indices=list(range(0, 46, 3))
    )
    # a few steps so the scores rank something: fit the labels of the test sets themselves
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    batch = test_sets.pad(np.arange(test_sets.num_sets))
    for _ in range(30):
        s = model(batch.features, batch.mask)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            s[batch.mask], (batch.labels[batch.mask] > 0).float()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, student):
    """A run folder as the ServerApp leaves it (written by the ServerApp's own writer)."""
    from server.server_app import _save_student

    run = tmp_path_factory.mktemp("run")
    _save_student(student, run, {"round": 3, "metrics": {"ndcg@10": 0.5}, "data": "MQ2008"})
    return run


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_cli_then_score_equals_in_memory(tmp_path, run_dir, student, test_sets, fmt, capsys):
    out = tmp_path / f"student.{fmt}"
    assert fedrank(["export", "--run", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    assert out.is_file() and not list(tmp_path.glob(".*.tmp"))

    exported = load_exported(out)
    assert exported.format == fmt
    assert exported.meta["format"] == EXPORT_FORMAT
    assert exported.meta["spec"] == student.spec
    assert exported.num_features == 46
    assert exported.meta["source"]["round"] == 3

    in_memory = score_sets(student, test_sets)
    flat = exported.score_sets(test_sets, batch_size=7)  # padding differs from in-memory
    np.testing.assert_allclose(flat, in_memory, rtol=1e-5, atol=1e-5)
    ndcg_mem, ndcg_exp = ndcg10(test_sets, in_memory), ndcg10(test_sets, flat)
    assert ndcg_exp == pytest.approx(ndcg_mem, abs=1e-9)
    assert 0.0 < ndcg_mem < 1.0

    # fedrank score: a ranking per set, best first, item ids from the file's docids
    ranking = tmp_path / "ranking.jsonl"
    rc = fedrank(
        ["score", "--model", str(out), "--data", str(TEST_FILE), "--out", str(ranking), "--eval"]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert f"ndcg@10 {ndcg_mem:.4f}" in err
    rows = [json.loads(line) for line in ranking.read_text().splitlines()]
    assert [r["set"] for r in rows] == test_sets.set_ids.tolist()
    for k, r in enumerate(rows[:20]):
        lo, hi = test_sets.offsets[k], test_sets.offsets[k + 1]
        assert sorted(r["items"]) == sorted(test_sets.item_ids[lo:hi].tolist())
        assert r["scores"] == sorted(r["scores"], reverse=True)
        best = int(np.argmax(in_memory[lo:hi]))
        assert r["items"][0] == test_sets.item_ids[lo + best]


def test_score_prints_trec_run_to_stdout(tmp_path, student, test_sets, capsys):
    model = tmp_path / "s.pt"
    export_student(student, model, "torchscript")
    assert fedrank(["score", "--model", str(model), "--data", str(MQ2008), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == sum(min(3, n) for n in test_sets.sizes.tolist())
    first = lines[0].split()
    assert first[0] == test_sets.set_ids[0] and first[1] == "Q0" and first[3] == "1"


def test_rank_sets_breaks_ties_by_item_order(test_sets):
    sets = test_sets.take([0])
    scores = np.zeros(sets.num_items, dtype=np.float32)
    (r,) = list(rank_sets(sets, scores))
    assert r["items"] == sets.item_ids.tolist()


def test_feature_count_mismatch_is_a_clear_error(tmp_path, student, capsys):
    model = tmp_path / "s.onnx"
    export_student(student, model, "onnx")
    narrow = tmp_path / "narrow.txt"
    narrow.write_text(
        "1 qid:7 1:0.5 2:0.1 3:0.2 #docid = a\n0 qid:7 1:0.1 2:0.3 3:0.9 #docid = b\n"
    )
    assert fedrank(["score", "--model", str(model), "--data", str(narrow)]) == 2
    err = capsys.readouterr().err
    assert str(narrow) in err and "3 features" in err and "expects 46" in err
    exported = load_exported(model)
    with pytest.raises(DataFormatError, match="exported for 46"):
        exported.score_padded(np.zeros((1, 2, 40), dtype=np.float32))


def test_missing_or_corrupt_run_student(tmp_path, run_dir, capsys):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    out = tmp_path / "x.pt"
    assert fedrank(["export", "--run", str(empty), "--format", "onnx", "--out", str(out)]) == 2
    assert "student.json is missing" in capsys.readouterr().err
    assert not out.exists()

    broken = tmp_path / "broken-run"
    (broken / "student").mkdir(parents=True)
    for name in ("student.json", "student.pt"):
        (broken / "student" / name).write_bytes((run_dir / "student" / name).read_bytes())
    weights = broken / "student" / "student.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"student\.pt cannot be read"):
        load_run_student(broken)
    assert (
        fedrank(["export", "--run", str(broken), "--format", "torchscript", "--out", str(out)]) == 2
    )
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_truncated_or_flipped_export_is_a_checkpoint_error(tmp_path, student, fmt):
    good = tmp_path / f"good.{fmt}"
    export_student(student, good, fmt)
    raw = good.read_bytes()
    variants = {"empty": b"", "garbage": b"not a model at all\n" * 10}
    for frac in (0.1, 0.5, 0.9, 0.99):
        variants[f"truncated-{frac}"] = raw[: int(len(raw) * frac)]
    variants["truncated-1"] = raw[:-1]
    rng = np.random.default_rng(0)
    for i, pos in enumerate(rng.choice(len(raw), size=12, replace=False)):
        flipped = bytearray(raw)
        flipped[int(pos)] ^= 0x5A
        variants[f"flip-{i}@{int(pos)}"] = bytes(flipped)
    for name, data in variants.items():
        bad = tmp_path / f"bad-{name}.{fmt}"
        bad.write_bytes(data)
        try:
            model = load_exported(bad)
        except CheckpointError as err:
            assert str(bad) in str(err), name
            continue
        # a flip the format cannot see (e.g. in zip padding or an unused header field) must at
        # least leave the model intact
        np.testing.assert_array_equal(
            model.score_padded(np.ones((1, 3, 46), dtype=np.float32)),
            load_exported(good).score_padded(np.ones((1, 3, 46), dtype=np.float32)),
            err_msg=name,
        )


def test_export_is_atomic_and_keeps_the_old_file(tmp_path, student, monkeypatch):
    out = tmp_path / "s.onnx"
    export_student(student, out, "onnx")
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.onnx, "export", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(student, out, "onnx")
    assert out.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_torch_load_is_weights_only(tmp_path, run_dir):
    """A student.pt holding a pickled object (not just tensors) is refused."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil-run"
    (bad / "student").mkdir(parents=True)
    (bad / "student" / "student.json").write_text(
        (run_dir / "student" / "student.json").read_text()
    )
    torch.save({"x": Evil()}, bad / "student" / "student.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_run_student(bad)
