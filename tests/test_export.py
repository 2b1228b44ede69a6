"""Student export (safetensors, ONNX, write-only TorchScript) and on-device scoring:
`fedrank export` / `fedrank score`, including hostile files and signed exports."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from support import MQ2008_FOLD1

from fedrank.cli import main as fedrank
from fedrank.client.export import export_student
from fedrank.client.score_cli import rank_sets
from fedrank.client.student_files import EXPORT_FORMAT, load_exported
from fedrank.common.errors import CheckpointError, ConfigError, DataFormatError
from fedrank.common.evaluation import mean_ndcg
from fedrank.common.letor import read_letor
from fedrank.common.models import StudentModel, score_sets
from fedrank.common.signing import load_private_key, load_public_key
from fedrank.common.student_folder import load_student

REPO = Path(__file__).resolve().parents[1]
TEST_FILE = MQ2008_FOLD1 / "test.txt.gz"


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
    from fedrank.common.student_folder import save_student

    run = tmp_path_factory.mktemp("run")
    save_student(student, run, {"round": 3, "metrics": {"ndcg@10": 0.5}, "data": "MQ2008"})
    return run


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
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
    ndcg_mem, ndcg_exp = (
        mean_ndcg(test_sets, in_memory)["ndcg@10"],
        mean_ndcg(test_sets, flat)["ndcg@10"],
    )
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
    model = tmp_path / "s.safetensors"
    export_student(student, model)
    assert fedrank(["score", "--model", str(model), "--data", str(MQ2008_FOLD1), "--top", "3"]) == 0
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
        load_student(broken)
    assert fedrank(["export", "--run", str(broken), "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
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
        load_student(bad)


# ---- the file is data: what a hostile or damaged file cannot do ------------------------------
def _student_file(tmp_path: Path, student, **tamper) -> Path:
    """A safetensors export of ``student`` whose tensors are changed by ``tamper`` (name ->
    array, or None to drop it), re-stamped with a matching checksum as an attacker would."""
    import safetensors.numpy

    from fedrank.client.student_files import student_metadata, weights_digest

    arrays = {k: v.detach().numpy().copy() for k, v in student.state_dict().items()}
    for key, value in tamper.items():
        key = key.replace("__", ".")
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    meta = student_metadata(student)
    meta["weights_sha256"] = weights_digest(arrays)
    path = tmp_path / f"tampered-{'-'.join(tamper) or 'none'}.safetensors"
    path.write_bytes(safetensors.numpy.save(arrays, metadata={"fedrank": json.dumps(meta)}))
    return path


def test_safetensors_file_carries_the_whole_state_dict(tmp_path, student):
    import safetensors.numpy

    out = tmp_path / "s.safetensors"
    meta = export_student(student, out)
    arrays = safetensors.numpy.load(out.read_bytes())
    state = student.state_dict()
    assert set(arrays) == set(state)  # weights and every buffer (feature_indices, transform.*)
    for key, value in state.items():
        np.testing.assert_array_equal(arrays[key], value.numpy())
    assert meta["spec"] == student.spec and meta["num_inputs"] == 16
    loaded = load_exported(out)
    assert loaded.format == "safetensors" and loaded.signed_by is None


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (
            {"net__0__weight": np.zeros((3, 16), np.float32)},
            r"'net\.0\.weight' has shape \(3, 16\)",
        ),
        (
            {"net__0__bias": np.zeros(16, np.float64)},
            r"'net\.0\.bias' is float64, expected float32",
        ),
        ({"net__2__bias": None}, r"miss key 'net\.2\.bias'"),
        ({"extra": np.zeros(2, np.float32)}, r"unexpected key 'extra'"),
        (
            {"net__2__weight": np.full((1, 16), np.inf, np.float32)},
            r"'net\.2\.weight' holds 16 non-finite",
        ),
        ({"feature_indices": np.arange(100, 116)}, r"weights the student cannot run with"),
    ],
    ids=["shape", "dtype", "missing", "unexpected", "inf", "indices"],
)
def test_safetensors_tensors_are_checked_against_the_spec(tmp_path, student, tamper, message):
    path = _student_file(tmp_path, student, **tamper)
    with pytest.raises(CheckpointError, match=message) as err:
        load_exported(path)
    assert str(path) in str(err.value)


def test_safetensors_spec_and_foreign_files_are_refused(tmp_path, student, capsys):
    import safetensors.numpy

    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(safetensors.numpy.save({"w": np.zeros(3, np.float32)}))
    assert fedrank(["score", "--model", str(foreign), "--data", str(TEST_FILE)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a fedrank export" in err and str(foreign) in err
    teacher_spec = tmp_path / "teacher.safetensors"
    arrays = {k: v.numpy() for k, v in student.state_dict().items()}
    meta = {"format": EXPORT_FORMAT, "num_features": 46, "parameters": 1, "spec": {"kind": "x"}}
    teacher_spec.write_bytes(safetensors.numpy.save(arrays, metadata={"fedrank": json.dumps(meta)}))
    with pytest.raises(CheckpointError, match="corrupt: its weights"):
        load_exported(teacher_spec)
    from fedrank.client.student_files import weights_digest

    meta["weights_sha256"] = weights_digest(arrays)
    teacher_spec.write_bytes(safetensors.numpy.save(arrays, metadata={"fedrank": json.dumps(meta)}))
    with pytest.raises(CheckpointError, match="bad student spec"):
        load_exported(teacher_spec)


def _crafted_torchscript(path: Path, victim_load: Path, victim_call: Path) -> None:
    """A TorchScript file with fedrank metadata whose ``__setstate__`` writes ``victim_load``
    while it is loaded and whose ``forward`` writes ``victim_call`` (through ``torch.from_file``
    with shared memory): what `fedrank score --model X.pt` ran before it refused TorchScript."""

    class Crafted(torch.nn.Module):
        def __init__(self, a: str, b: str) -> None:
            super().__init__()
            self.w = torch.zeros(46)
            self.a = a
            self.b = b

        @torch.jit.export
        def __getstate__(self) -> tuple[torch.Tensor, str, str, bool]:
            return (self.w, self.a, self.b, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, str, str, bool]) -> None:
            self.w, self.a, self.b, self.training = state[0], state[1], state[2], state[3]
            t = torch.from_file(self.a, True, 4, dtype=torch.uint8)
            t.fill_(65)
            self.w = self.w + t.float().sum() * 0

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            t = torch.from_file(self.b, True, 4, dtype=torch.uint8)
            t.fill_(66)
            return (features * self.w).sum(-1) + t.float().sum() * 0

    meta = {"format": EXPORT_FORMAT, "num_features": 46, "parameters": 46, "spec": {}}
    meta["weights_sha256"] = "0" * 64
    scripted = torch.jit.script(Crafted(str(victim_load), str(victim_call)))
    torch.jit.save(scripted, str(path), _extra_files={"fedrank.json": json.dumps(meta)})


def test_crafted_torchscript_is_refused_without_running(tmp_path, capsys):
    victims = [tmp_path / "victim-load", tmp_path / "victim-call"]
    evil = tmp_path / "student.pt"
    _crafted_torchscript(evil, *victims)
    for v in victims:
        v.write_bytes(b"\0" * 4)
    rc = fedrank(["score", "--model", str(evil), "--data", str(TEST_FILE)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert str(evil) in err and "does not load TorchScript" in err
    assert [v.read_bytes() for v in victims] == [b"\0" * 4] * 2  # nothing ran
    # the file really is hostile: loading it as TorchScript writes the first victim
    torch.jit.load(str(evil))
    assert victims[0].read_bytes() == b"AAAA"


def test_torchscript_export_is_write_only(tmp_path, student, test_sets, capsys):
    out = tmp_path / "student.pt"
    run = tmp_path / "run"
    from fedrank.common.student_folder import save_student

    save_student(student, run, {"round": 1})
    assert fedrank(["export", "--run", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "does not load TorchScript" in capsys.readouterr().out
    # for other runtimes it scores like the student (we wrote this file, so we may load it)
    module = torch.jit.load(str(out))
    batch = test_sets.pad(np.arange(5))
    with torch.no_grad():
        expected = student(batch.features, batch.mask)
        got = module(batch.features).masked_fill(~batch.mask, 0.0)
    torch.testing.assert_close(got, expected)
    with pytest.raises(CheckpointError, match="does not load TorchScript"):
        load_exported(out)


def _onnx_with_external_weight(path: Path, location: str, in_attribute: bool) -> None:
    """A fedrank-stamped ONNX model whose weight lives in an external file ``location``
    (as an initializer, or inside a Constant node's attribute)."""
    import hashlib

    from onnx import TensorProto, helper

    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[46])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(46 * 4))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["s", "i", 46])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["s", "i"])
    nodes = [
        helper.make_node("Mul", ["features", "W"], ["prod"]),
        helper.make_node("ReduceSum", ["prod", "axes"], ["scores"], keepdims=0),
    ]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [-1])]
    if in_attribute:
        nodes.insert(0, helper.make_node("Constant", [], ["W"], value=weight))
    else:
        inits.append(weight)
    graph = helper.make_graph(nodes, "g", [features], [scores], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {"format": EXPORT_FORMAT, "num_features": 46, "parameters": 46, "spec": {}}
    meta["graph_sha256"] = hashlib.sha256(model.graph.SerializeToString()).hexdigest()
    entry = model.metadata_props.add()
    entry.key, entry.value = "fedrank", json.dumps(meta)
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("in_attribute", [False, True], ids=["initializer", "attribute"])
def test_onnx_with_external_data_is_refused(tmp_path, monkeypatch, capsys, in_attribute):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(46, dtype=np.float32).tobytes())
    model = tmp_path / "student.onnx"
    _onnx_with_external_weight(model, "secret.bin", in_attribute)
    monkeypatch.chdir(tmp_path)  # where ONNX Runtime looks for a relative location
    rc = fedrank(["score", "--model", str(model), "--data", str(TEST_FILE)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert str(model) in err and "refers to external data (tensor 'W')" in err


def test_signed_export_verifies_and_tampering_is_refused(tmp_path, run_dir, student, capsys):
    from fedrank.server.certs import make_signing_key

    keys, other = tmp_path / "keys", tmp_path / "other"
    keys.mkdir(), other.mkdir()
    priv, pub = make_signing_key(keys)
    _, other_pub = make_signing_key(other)
    for fmt in ("safetensors", "onnx"):
        out = tmp_path / f"signed.{fmt}"
        args = ["export", "--run", str(run_dir), "--format", fmt, "--out", str(out)]
        assert fedrank([*args, "--sign-key", str(priv)]) == 0
        assert "signed by sha256:" in capsys.readouterr().out
        score = ["score", "--model", str(out), "--data", str(TEST_FILE), "--top", "1"]
        assert fedrank([*score, "--verify-key", str(pub)]) == 0
        assert "verified" in capsys.readouterr().err
        assert fedrank([*score, "--verify-key", str(other_pub)]) == 2
        assert "does not verify with the key" in capsys.readouterr().err
    unsigned = tmp_path / "unsigned.safetensors"
    export_student(student, unsigned)
    score = ["score", "--model", str(unsigned), "--data", str(TEST_FILE), "--verify-key", str(pub)]
    assert fedrank(score) == 2
    assert "is not signed" in capsys.readouterr().err
    # a signed file whose metadata is edited (same length, so the header still parses)
    signed = tmp_path / "signed.safetensors"
    raw = signed.read_bytes()
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(raw.replace(b'\\"round\\": 3', b'\\"round\\": 9', 1))
    assert tampered.read_bytes() != raw
    with pytest.raises(CheckpointError, match="does not verify"):
        load_exported(tampered, load_public_key(pub))
    with pytest.raises(ConfigError, match="--sign-key: TorchScript exports are not signed"):
        export_student(student, tmp_path / "x.pt", "torchscript", sign_key=load_private_key(priv))


# ---- --out: stdout, FIFOs, devices and symlinks ---------------------------------------------
def _score_to(model: Path, out: str) -> int:
    return fedrank(["score", "--model", str(model), "--data", str(TEST_FILE), "--out", out])


def test_score_out_dash_is_stdout(tmp_path, student, test_sets, capsys):
    model = tmp_path / "s.safetensors"
    export_student(student, model)
    assert _score_to(model, "-") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == test_sets.num_items and lines[0].split()[1] == "Q0"
    assert not (Path.cwd() / "-").exists()


def test_score_out_fifo_is_written_in_place(tmp_path, student, test_sets):
    model = tmp_path / "s.safetensors"
    export_student(student, model)
    fifo = tmp_path / "ranking.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    try:
        assert _score_to(model, str(fifo)) == 0
    finally:
        reader.join(timeout=60)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # still the FIFO, not a file renamed over it
    assert len(received[0].decode().splitlines()) == test_sets.num_items
    assert not list(tmp_path.glob(".*.tmp"))


def test_score_out_symlink_writes_its_target(tmp_path, student):
    model = tmp_path / "s.safetensors"
    export_student(student, model)
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "ranking.txt"
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "ranking-link.txt"
    link.symlink_to(target)
    assert _score_to(model, str(link)) == 0
    assert link.is_symlink() and link.resolve() == target  # the link stays a link
    assert target.read_text().split()[1] == "Q0"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert not list(tmp_path.glob(".*.tmp")) and not list(real_dir.glob(".*.tmp"))


def test_score_out_link_to_proc_stdout_is_written_in_place(tmp_path, student, capfd):
    """A link into /proc (as /dev/stdout is) is written through, never renamed over."""
    model = tmp_path / "s.safetensors"
    export_student(student, model)
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    assert _score_to(model, str(link)) == 0
    out = capfd.readouterr().out
    assert link.is_symlink() and out.splitlines()[0].split()[1] == "Q0"
