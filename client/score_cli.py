"""``fedrank score``: rank the items of each set with an exported student, on the device.

``fedrank score --model FILE --data PATH [--out FILE|-] [--verify-key PUB] [--eval]`` scores
every set of a LETOR file (or a fold folder's ``--split``): a safetensors file is rebuilt from
its spec and loaded strictly (torch), an ONNX file runs in ONNX Runtime; a TorchScript file is
refused. It ranks the items of each set and prints the ranking in TREC run format (``set Q0
item rank score fedrank``) or writes it to ``--out`` (``.jsonl``: one JSON object per set;
``-``: stdout; a FIFO or device is written in place, a regular file atomically).
``--verify-key`` refuses a file that is not signed by that key. ``--eval`` also prints
NDCG@10 when the data has labels.

torch is loaded only for what needs it (a safetensors student, ``--eval``, which uses the
project's one evaluator): scoring an ONNX student never loads torch, so a device that scores
ONNX files runs in a fraction of the memory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from fedrank.client.student_format import file_kind, load_onnx, read_model_file
from fedrank.common.atomic_io import write_output
from fedrank.common.errors import ConfigError, DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.letor import find_split_file, read_letor
from fedrank.common.signing import load_public_key
from fedrank.common.trec import item_names, run_lines

__all__ = ["load_for_scoring", "rank_sets", "score_main"]

# torch-based modules, imported only when a safetensors student or --eval needs them
TORCH_STUDENT_FILES = "fedrank.client.student_files"
TORCH_EVALUATION = "fedrank.common.evaluation"


def load_for_scoring(
    path: str | Path, verify_key: ec.EllipticCurvePublicKey | None = None, threads: int = 0
) -> Any:
    """The student in ``path`` ready to score (``.format``, ``.num_features``, ``.signed_by``,
    ``.score_sets(sets, batch_size)``): an ONNX file in ONNX Runtime without torch, a
    safetensors file rebuilt in torch; ``threads`` > 0 sets the runtime's thread count."""
    src, raw = read_model_file(path)
    if file_kind(src, raw) == "onnx":
        return load_onnx(src, raw, verify_key, threads=threads)
    if threads:
        importlib.import_module("torch").set_num_threads(threads)
    return importlib.import_module(TORCH_STUDENT_FILES).load_exported(src, verify_key)


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


def _top(rankings: Iterator[dict[str, Any]], top: int) -> Iterator[dict[str, Any]]:
    for r in rankings:
        if top:
            r = {**r, "items": r["items"][:top], "scores": r["scores"][:top]}
        yield r


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
    parser.add_argument(
        "--threads", type=int, default=0, help="torch or ONNX Runtime threads (0: default)"
    )
    parser.add_argument("--eval", action="store_true", help="also print NDCG@10 (needs labels)")
    args = parser.parse_args(list(argv))
    if args.top < 0:
        raise ConfigError(f"--top must be >= 0, got {args.top}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    verify_key = load_public_key(args.verify_key) if args.verify_key else None
    model = load_for_scoring(args.model, verify_key, args.threads)
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
        mean_ndcg = importlib.import_module(TORCH_EVALUATION).mean_ndcg
        note += f"; ndcg@10 {mean_ndcg(sets, scores)['ndcg@10']:.4f}"
    if args.out and args.out != "-":
        note += f"; ranking written to {args.out} ({how})"
    print(note, file=sys.stderr)
    return 0
