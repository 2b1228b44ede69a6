"""``fedrank export`` and ``fedrank score``: the global student on devices.

``fedrank export --run DIR [--format safetensors|onnx|torchscript] --out FILE [--sign-key KEY]``
reads the student a finished run saved (``DIR/student/student.pt`` + ``student.json``; the
state dict is loaded with ``torch.load(..., weights_only=True)``) and writes one
self-describing file (see :mod:`client.student_files`): safetensors (the default; data only:
the whole state dict and a JSON spec), ONNX for other runtimes (weights inside, external data
refused) or TorchScript for LibTorch / PyTorch Mobile (write-only: fedrank never loads it).
``--sign-key`` signs the metadata with the server's ECDSA key (``fedrank certs`` makes one).

``fedrank score`` (:mod:`client.score_cli`) ranks the items of every set with such a file on
the device; :func:`ndcg10` here is its ``--eval``.

A device needs only ``common/`` and ``client/`` plus torch, numpy and safetensors (and
``onnxruntime`` for ONNX files); nothing here imports the server.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from torch import nn

from client.score_cli import rank_sets, score_main
from client.student_files import (
    EXPORT_FORMAT,
    FORMATS,
    LOADABLE_FORMATS,
    ExportedStudent,
    ScoringModule,
    encode_student,
    load_exported,
    load_state_checked,
    student_metadata,
)
from common.atomic_io import write_output
from common.errors import CheckpointError, ConfigError
from common.example_sets import ExampleSets
from common.metrics import ndcg
from common.models import build_model
from common.signing import load_private_key

__all__ = [
    "EXPORT_FORMAT",
    "FORMATS",
    "LOADABLE_FORMATS",
    "ExportedStudent",
    "ScoringModule",
    "export_student",
    "load_run_student",
    "load_exported",
    "rank_sets",
    "export_main",
    "score_main",
]


# ---- reading a run's student -------------------------------------------------------------------
def load_run_student(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The global student a run saved in ``run_dir/student/`` and its ``student.json`` info.

    Raises CheckpointError naming the file when it is missing, truncated or inconsistent.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"--run {run}: no such run folder")
    folder = run / "student"
    info_path, weights_path = folder / "student.json", folder / "student.pt"
    for path in (info_path, weights_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing: the run in {run} has not saved its final student "
                "(it saves it after the last round)"
            )
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{info_path} is not valid JSON: {err}") from err
    if not isinstance(info, dict) or not isinstance(info.get("spec"), dict):
        raise CheckpointError(f"{info_path} has no 'spec' object describing the student")
    try:
        model = build_model(info["spec"])
    except ConfigError as err:
        raise CheckpointError(f"{info_path}: bad student spec: {err}") from err
    if getattr(model, "kind", None) != "student":
        raise CheckpointError(f"{info_path}: the spec describes a {model.kind}, not a student")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, not a torch file, forbidden types ...
        raise CheckpointError(
            f"{weights_path} cannot be read (truncated or corrupt?): {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights_path} does not hold a state dict of tensors")
    load_state_checked(weights_path, model, {k: v.numpy() for k, v in state.items()})
    return model.eval(), info


# ---- export ------------------------------------------------------------------------------------
def export_student(
    student: nn.Module,
    out: str | Path,
    fmt: str = "safetensors",
    source: dict[str, Any] | None = None,
    sign_key: ec.EllipticCurvePrivateKey | None = None,
    feature_names: list[str] | None = None,
) -> dict[str, Any]:
    """Write ``student`` to ``out`` in format ``fmt`` (atomically for a regular file);
    returns the metadata written into the file."""
    meta = student_metadata(student, source, feature_names)
    data, meta = encode_student(student, fmt, meta, sign_key)
    write_output(out, data)
    return meta


# ---- command line ------------------------------------------------------------------------------
def export_main(argv: Sequence[str]) -> int:
    """``fedrank export --run DIR [--format F] --out FILE [--sign-key KEY]``."""
    parser = argparse.ArgumentParser(
        prog="fedrank export", description="Export a run's global student for devices."
    )
    parser.add_argument("--run", required=True, help="output folder of a finished run")
    parser.add_argument(
        "--format",
        default="safetensors",
        choices=FORMATS,
        help="safetensors (default; what `fedrank score` loads), onnx (other runtimes and "
        "`fedrank score`), torchscript (LibTorch / PyTorch Mobile only: never loaded by fedrank)",
    )
    parser.add_argument("--out", required=True, help="file to write (atomically)")
    parser.add_argument(
        "--sign-key", help="sign with this ECDSA private key (PEM, e.g. certs/student-signing.key)"
    )
    args = parser.parse_args(list(argv))
    sign_key = load_private_key(args.sign_key) if args.sign_key else None
    student, info = load_run_student(args.run)
    metrics = info.get("metrics") if isinstance(info.get("metrics"), dict) else {}
    names = info.get("feature_names")
    source = {
        "run": str(Path(args.run)),
        "round": info.get("round"),
        "data": info.get("data"),
        "ndcg@10": metrics.get("ndcg@10"),
    }
    meta = export_student(
        student,
        args.out,
        args.format,
        source,
        sign_key=sign_key,
        feature_names=names if isinstance(names, list) else None,
    )
    size = Path(args.out).stat().st_size if Path(args.out).is_file() else 0
    note = (
        f"exported {args.format} student to {args.out}: {meta['parameters']:,} parameters, "
        f"{meta['num_inputs']} of {meta['num_features']} features, {size:,} bytes"
    )
    if sign_key is not None:
        note += f", signed by {meta['signer']}"
    if args.format == "torchscript":
        note += " (for LibTorch / PyTorch Mobile: `fedrank score` does not load TorchScript)"
    print(note)
    return 0


def ndcg10(sets: ExampleSets, scores: np.ndarray) -> float:
    """Mean NDCG@10 of flat ``scores`` over ``sets`` (the project's metric conventions)."""
    values = []
    for positions in sets.batch_positions(256, bucket=False):
        batch = sets.pad(positions, extra={"s": scores})
        per_set = ndcg(batch.extra["s"], batch.labels, batch.mask, 10)
        values.append(per_set.double())
    total = torch.cat(values) if values else torch.zeros(0)
    total = total[torch.isfinite(total)]
    return float(total.mean()) if total.numel() else math.nan
