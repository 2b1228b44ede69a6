"""What a device installs and loads: the old dependency set against the device install.

    python benchmarks/bench_device_install.py [--work DIR] [--reuse] [--before-ref main]
        [--torch-spec torch==2.13.0]

Builds two fresh virtual environments in one run, each with the same torch build first:

- **before**: ``pip install fedrank`` of the git revision ``--before-ref`` (default ``main``),
  from that revision's files and with that revision's dependencies; until the core became the
  device set that pulled ``flwr[simulation]`` (Ray), matplotlib and tqdm besides torch, numpy
  and safetensors;
- **after**: ``pip install "fedrank[device]"`` of this working tree: ``flwr`` without Ray,
  torch, numpy, safetensors, plus ONNX and ONNX Runtime for ONNX students.

``--reuse`` keeps the environments already in ``--work`` (torch and the dependencies stay,
fedrank is installed again), for a second look without downloading again.

For each it prints the installed size (with and without torch), the number of distributions
and the resident memory (peak, VmHWM) of a process that imports the ClientApp; for the device
install also that of ``fedrank score`` on the same student as safetensors (torch) and as ONNX
(no torch). Sizes come from the files in each environment (``du``
semantics: bytes of regular files). The ClientApp's peak memory per training round is measured
on a live fleet by ``tests/test_deployment.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT_APP_MODULE = "fedrank.client.client_app"


def _run(args: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return str(proc.stdout)


def _venv(path: Path, torch_spec: str, reuse: bool) -> Path:
    python = path / "bin" / "python"
    if reuse and python.is_file():
        return python
    _run([sys.executable, "-m", "venv", str(path)])
    _run([str(python), "-m", "pip", "install", "--quiet", torch_spec])
    return python


def _install(python: Path, target: str) -> None:
    """``pip install TARGET`` (with its dependencies), then fedrank itself again so a reused
    environment holds exactly this revision's files."""
    _run([str(python), "-m", "pip", "install", "--quiet", target])
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", target])


def _checkout(ref: str, dest: Path) -> Path:
    """The files of git revision ``ref`` of this repository in ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _size(venv: Path) -> tuple[int, int, int]:
    """(bytes in the environment, bytes of torch and its CUDA libraries, distributions)."""
    site = next((venv / "lib").glob("python3*/site-packages"))
    files = [p for p in venv.rglob("*") if p.is_file() and not p.is_symlink()]
    total = sum(p.stat().st_size for p in files)
    torch_dirs = [*site.glob("torch"), *site.glob("torch-*"), *site.glob("nvidia*")]
    torch_bytes = sum(
        p.stat().st_size
        for d in torch_dirs
        for p in (d.rglob("*") if d.is_dir() else [d])
        if p.is_file() and not p.is_symlink()
    )
    dists = len(list(site.glob("*.dist-info")))
    return total, torch_bytes, dists


def _peak(python: Path, code: str, cwd: Path) -> tuple[int, bool]:
    """(peak resident MiB, whether torch was imported) of a process running ``code``."""
    probe = (
        code + "\nimport sys\nstatus = open('/proc/self/status').read()\n"
        "print('PEAK', int(status.split('VmHWM:')[1].split()[0]) // 1024, 'torch' in sys.modules)"
    )
    out = _run([str(python), "-c", probe], cwd=cwd)
    _, mib, torch_loaded = out.strip().splitlines()[-1].split()
    return int(mib), torch_loaded == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="folder for the two environments (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="keep environments in --work")
    parser.add_argument("--before-ref", default="main", help="git revision of 'before'")
    parser.add_argument("--torch-spec", default="torch==2.13.0")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="fedrank-device-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"environments in {work} (torch: {args.torch_spec})", flush=True)

    before = _venv(work / "before", args.torch_spec, args.reuse)
    _install(before, str(_checkout(args.before_ref, work / "before-src")))
    after = _venv(work / "after", args.torch_spec, args.reuse)
    _install(after, f"{ROOT}[device]")

    rows = {}
    for name, python in (("before", before), ("after", after)):
        total, torch_bytes, dists = _size(python.parent.parent)
        rows[name] = (total, torch_bytes, dists)
    mib = 2**20
    print(f"\n{'install':<44} {'total MiB':>10} {'torch MiB':>10} {'rest MiB':>9} {'dists':>6}")
    labels = {
        "before": f"before: fedrank ({args.before_ref})",
        "after": "after: fedrank[device] (+ onnx, onnxruntime)",
    }
    for name, (total, torch_bytes, dists) in rows.items():
        print(
            f"{labels[name]:<44} {total / mib:>10.0f} {torch_bytes / mib:>10.0f} "
            f"{(total - torch_bytes) / mib:>9.0f} {dists:>6}"
        )
    rest = {k: v[0] - v[1] for k, v in rows.items()}
    print(
        f"ratio after/before: total {rows['after'][0] / rows['before'][0]:.2f}, without torch "
        f"{rest['after'] / rest['before']:.2f}"
    )
    for name, python in (("before", before), ("after", after)):
        ray = _run(
            [str(python), "-c", "import importlib.util as u; print(bool(u.find_spec('ray')))"]
        )
        print(f"{name}: ray installed: {ray.strip()}")

    # resident memory on the device install
    make = (
        "from pathlib import Path\nimport torch\nfrom fedrank.client.export import export_student\n"
        "from fedrank.common.models import StudentModel\ntorch.manual_seed(0)\n"
        "s = StudentModel(46, hidden=(16,))\n"
        "export_student(s, Path('student.safetensors'))\n"
        "export_student(s, Path('student.onnx'), 'onnx')\n"
    )
    _run([str(after), "-c", make], cwd=work)
    data = ROOT / ".." / "shared" / "data" / "MQ2008" / "Fold1" / "test.txt.gz"
    print(f"\n{'device process':<62} {'peak MiB':>9} {'torch loaded':>13}")
    client = {}
    for name, python in (("before", before), ("after", after)):
        client[name] = _peak(python, f"import {CLIENT_APP_MODULE}", work)
        label = f"import the ClientApp ({name})"
        print(f"{label:<62} {client[name][0]:>9} {client[name][1]!s:>13}")
    scores = {}
    for fmt in ("safetensors", "onnx"):
        code = (
            "from fedrank.cli import main\n"
            f"assert main(['score', '--model', 'student.{fmt}', '--data', {str(data)!r}, "
            "'--out', 'ranking.txt']) == 0"
        )
        scores[fmt] = _peak(after, code, work)
        label = f"fedrank score, {fmt} student, MQ2008 Fold1 test (after)"
        print(f"{label:<62} {scores[fmt][0]:>9} {scores[fmt][1]!s:>13}")
    print(
        f"ratio ONNX/safetensors scoring peak memory: "
        f"{scores['onnx'][0] / scores['safetensors'][0]:.2f}"
    )
    print(json.dumps({"sizes": rows, "client_import": client, "score": scores}))


if __name__ == "__main__":
    main()
