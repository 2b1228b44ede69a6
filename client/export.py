"""``fedrank export`` and ``fedrank score``: the global student on devices.

``fedrank export --run DIR [--format safetensors|onnx|torchscript] --out FILE [--sign-key KEY]``
reads the student a finished run saved (``DIR/student/student.pt`` + ``student.json``; the
state dict is loaded with ``torch.load(..., weights_only=True)``) and writes one
self-describing file (see :mod:`fedrank.client.student_files`): safetensors (the default; data only:
the whole state dict and a JSON spec), ONNX for other runtimes (weights inside, external data
refused) or TorchScript for LibTorch / PyTorch Mobile (write-only: fedrank never loads it).
``--sign-key`` signs the metadata with the server's ECDSA key (``fedrank certs`` makes one).

``fedrank score --model FILE --data PATH [--out FILE|-] [--verify-key PUB]`` scores every set
of a LETOR file (or a fold folder's ``--split``) on the device: a safetensors file is rebuilt
from its spec and loaded strictly, an ONNX file runs in ``onnxruntime``; a TorchScript file is
refused. It ranks the items of each set and prints the ranking in TREC run format (``set Q0
item rank score fedrank``) or writes it to ``--out`` (``.jsonl``: one JSON object per set;
``-``: stdout; a FIFO or device is written in place, a regular file atomically).
``--verify-key`` refuses a file that is not signed by that key. ``--eval`` also prints
NDCG@10 when the data has labels.

A device needs only ``common/`` and ``client/`` plus torch, numpy and safetensors (and
``onnxruntime`` for ONNX files); nothing here imports the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from torch import nn

from fedrank.client.student_files import (
    FORMATS,
    encode_student,
    load_exported,
    student_metadata,
)
from fedrank.common.atomic_io import write_output
from fedrank.common.errors import ConfigError, DataFormatError
from fedrank.common.evaluation import mean_ndcg
from fedrank.common.example_sets import ExampleSets
from fedrank.common.letor import find_split_file, read_letor
from fedrank.common.signing import load_private_key, load_public_key
from fedrank.common.student_folder import load_student
from fedrank.common.trec import item_names, run_lines

# the student files themselves (formats, encoding, loading): fedrank.client.student_files
__all__ = ["export_student", "rank_sets", "export_main", "score_main"]


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


# ---- ranking -----------------------------------------------------------------------------------
def rank_sets(sets: ExampleSets, scores: np.ndarray) -> Iterator[dict[str, Any]]:
    """Per set: ``{"set": id, "items": [...], "scores": [...]}`` best first; ties keep item
    order (a stable sort), as the project's metrics break ties."""
    for k in range(sets.num_sets):
        lo, hi = int(sets.offsets[k]), int(sets.offsets[k + 1])
        s = scores[lo:hi]
        order = np.argsort(-s, kind="stable")
        names = item_names(sets, k)
        items = [names[i] for i in order]
        yield {
            "set": str(sets.set_ids[k]),
            "items": items,
            "scores": [float(v) for v in s[order]],
        }


def _read_data(path: str, split: str, num_features: int) -> tuple[ExampleSets, str]:
    src = Path(path)
    if src.is_dir():
        found = find_split_file(src, split)
        if found is None:
            raise DataFormatError(
                f"--data {src}: folder has no {split}.txt or {split}.txt.gz (see --split)"
            )
        src = found
    elif not src.is_file():
        raise DataFormatError(f"--data {src}: no such file or folder")
    sets = read_letor(src)
    if sets.num_features != num_features:
        raise DataFormatError(
            f"{src} has items with {sets.num_features} features (its largest feature index), "
            f"the model expects {num_features}"
        )
    return sets, str(src)


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


def score_main(argv: Sequence[str]) -> int:
    """``fedrank score --model FILE --data PATH [--out FILE|-] [--verify-key PUB]``."""
    parser = argparse.ArgumentParser(
        prog="fedrank score",
        description="Score and rank the items of each example set with an exported student.",
    )
    parser.add_argument(
        "--model", required=True, help="safetensors or ONNX file written by `fedrank export`"
    )
    parser.add_argument("--data", required=True, help="LETOR file (.txt/.gz) or fold folder")
    parser.add_argument("--split", default="test", help="split of a fold folder (default test)")
    parser.add_argument(
        "--out", help="write the ranking here (.jsonl: JSON lines; else TREC; -: stdout)"
    )
    parser.add_argument(
        "--verify-key", help="refuse a model not signed by this public key (PEM or OpenSSH)"
    )
    parser.add_argument("--top", type=int, default=0, help="only the best K items per set")
    parser.add_argument("--batch-size", type=int, default=64, help="sets per batch")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--eval", action="store_true", help="also print NDCG@10 (needs labels)")
    args = parser.parse_args(list(argv))
    if args.top < 0:
        raise ConfigError(f"--top must be >= 0, got {args.top}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    verify_key = load_public_key(args.verify_key) if args.verify_key else None
    model = load_exported(args.model, verify_key)
    sets, src = _read_data(args.data, args.split, model.num_features)
    t0 = time.perf_counter()
    scores = model.score_sets(sets, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    rankings = rank_sets(sets, scores)
    if args.out:
        if Path(args.out).suffix == ".jsonl":
            text = "".join(json.dumps(r) + "\n" for r in _top(rankings, args.top))
        else:
            text = "".join(run_lines(rankings, args.top))
        how = write_output(args.out, text)
    else:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.writelines(run_lines(rankings, args.top))
    per_set_ms = 1000.0 * seconds / max(sets.num_sets, 1)
    note = (
        f"scored {sets.num_sets} sets ({sets.num_items} items) of {src} with {model.format} "
        f"model in {seconds:.3f}s ({per_set_ms:.3f} ms per set)"
    )
    if model.signed_by:
        note += f"; signature by {model.signed_by} verified"
    if args.eval:
        note += f"; ndcg@10 {mean_ndcg(sets, scores)['ndcg@10']:.4f}"
    if args.out and args.out != "-":
        note += f"; ranking written to {args.out} ({how})"
    print(note, file=sys.stderr)
    return 0


def _top(rankings: Iterator[dict[str, Any]], top: int) -> Iterator[dict[str, Any]]:
    for r in rankings:
        if top:
            r = {**r, "items": r["items"][:top], "scores": r["scores"][:top]}
        yield r
