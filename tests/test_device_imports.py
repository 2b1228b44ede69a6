"""What a device process loads: the ClientApp and ``fedrank score`` import no server-side
package, and scoring an ONNX student never loads torch.

Each check runs in a fresh interpreter and reads ``sys.modules`` after the import or the
command, so a module-level import anywhere in the chain shows up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import MQ2008_FOLD1, SERVER_SIDE

# the package and module names these checks use, in one place
CLIENT_APP_MODULE = "fedrank.client.client_app"
CLI_MODULE = "fedrank.cli"
EXPORT_MODULE = "fedrank.client.export"
MODELS_MODULE = "fedrank.common.models"
SIGNING_MODULE = "fedrank.common.signing"
CERTS_MODULE = "fedrank.server.certs"

REPO = Path(__file__).resolve().parents[1]
MQ2008_TEST = MQ2008_FOLD1 / "test.txt.gz"


def _loaded_after(code: str, cwd: Path) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; the top-level packages it loaded (and fedrank's
    layers, as ``fedrank.<layer>``) and its RSS."""
    probe = (
        code
        + "\nimport json, sys\n"
        + "status = open('/proc/self/status').read()\n"
        + "rss = int(status.split('VmRSS:')[1].split()[0]) // 1024\n"
        + "print('\\nLOADED ' + json.dumps({'modules': sorted({m.split('.')[0] for m in "
        + "sys.modules} | {'.'.join(m.split('.')[:2]) for m in sys.modules "
        + "if m.startswith('fedrank.')}), 'rss_mib': rss}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LOADED "))
    return json.loads(line[len("LOADED ") :])


def test_client_app_imports_nothing_server_side(tmp_path: Path) -> None:
    loaded = _loaded_after(f"import {CLIENT_APP_MODULE}", tmp_path)
    modules = set(loaded["modules"])
    assert not modules & set(SERVER_SIDE), sorted(modules & set(SERVER_SIDE))
    assert "torch" in modules and "flwr" in modules  # the check sees real imports


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A signed student exported as ONNX and as safetensors, and its public key."""
    work = tmp_path_factory.mktemp("device-exports")
    code = f"""
from pathlib import Path
from {EXPORT_MODULE} import export_student
from {MODELS_MODULE} import StudentModel
from {SIGNING_MODULE} import load_private_key
from {CERTS_MODULE} import make_signing_key
import torch
torch.manual_seed(0)
key, pub = make_signing_key(Path({str(work)!r}))
student = StudentModel(46, hidden=(8,))
for fmt, name in (("onnx", "student.onnx"), ("safetensors", "student.safetensors")):
    export_student(student, Path({str(work)!r}) / name, fmt, sign_key=load_private_key(key))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=work
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "onnx": work / "student.onnx",
        "safetensors": work / "student.safetensors",
        "pub": work / "student-signing.pub",
    }


def _score(model: Path, pub: Path, out: Path, extra: str = "") -> str:
    return (
        f"from {CLI_MODULE} import main\n"
        f"rc = main(['score', '--model', {str(model)!r}, '--data', {str(MQ2008_TEST)!r}, "
        f"'--verify-key', {str(pub)!r}, '--out', {str(out)!r}{extra}])\n"
        "assert rc == 0, rc\n"
    )


def test_scoring_an_onnx_student_never_loads_torch(exports: dict[str, Path], tmp_path: Path):
    onnx_out, st_out = tmp_path / "onnx.jsonl", tmp_path / "st.jsonl"
    onnx_run = _loaded_after(_score(exports["onnx"], exports["pub"], onnx_out), tmp_path)
    st_run = _loaded_after(_score(exports["safetensors"], exports["pub"], st_out), tmp_path)
    assert "torch" not in onnx_run["modules"], "scoring an ONNX student loaded torch"
    assert "onnxruntime" in onnx_run["modules"]
    assert not set(onnx_run["modules"]) & set(SERVER_SIDE)
    assert "torch" in st_run["modules"]  # the safetensors path needs it: the probe sees it
    # both runtimes rank every set the same way
    onnx_rows = [json.loads(x) for x in onnx_out.read_text().splitlines()]
    st_rows = [json.loads(x) for x in st_out.read_text().splitlines()]
    assert len(onnx_rows) == len(st_rows) > 100
    assert [r["set"] for r in onnx_rows] == [r["set"] for r in st_rows]
    for a, b in zip(onnx_rows, st_rows, strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    # less than half the resident memory of the torch path
    assert onnx_run["rss_mib"] < 0.5 * st_run["rss_mib"], (onnx_run["rss_mib"], st_run["rss_mib"])


def test_onnx_scoring_refuses_a_wrong_signature_without_torch(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    code = (
        f"from pathlib import Path\nfrom {CERTS_MODULE} import make_signing_key\n"
        f"make_signing_key(Path({str(other)!r}))\n"
        f"from {CLI_MODULE} import main\n"
        f"rc = main(['score', '--model', {str(exports['onnx'])!r}, '--data', "
        f"{str(MQ2008_TEST)!r}, '--verify-key', {str(other / 'student-signing.pub')!r}])\n"
        "assert rc == 2, rc\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "signature does not verify" in proc.stderr
    assert "Traceback" not in proc.stderr
