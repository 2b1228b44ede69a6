"""``fedrank export``: the global student, as a file for devices.

``fedrank export --run DIR [--format safetensors|onnx|torchscript] --out FILE [--sign-key KEY]``
reads the student a finished run saved (``DIR/student/student.pt`` + ``student.json``; the
state dict is loaded with ``torch.load(..., weights_only=True)``) and writes one
self-describing file (see :mod:`fedrank.client.student_files`): safetensors (the default; data only:
the whole state dict and a JSON spec), ONNX for other runtimes (weights inside, external data
refused) or TorchScript for LibTorch / PyTorch Mobile (write-only: fedrank never loads it).
``--sign-key`` signs the metadata with the server's ECDSA key (``fedrank certs`` makes one).

``fedrank score`` (:mod:`fedrank.client.score_cli`) ranks the items of every set with such a
file on the device.

A device needs only ``common/`` and ``client/`` plus torch, numpy and safetensors (and
``onnxruntime`` for ONNX files); nothing here imports the server.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from torch import nn

from fedrank.client.student_files import (
    FORMATS,
    encode_student,
    student_metadata,
)
from fedrank.common.atomic_io import write_output
from fedrank.common.signing import load_private_key
from fedrank.common.student_folder import load_student

# the student files themselves (formats, encoding, loading): fedrank.client.student_files;
# `fedrank score` on a device: fedrank.client.score_cli
__all__ = ["export_student", "export_main"]


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
    student, info = load_student(args.run)
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
