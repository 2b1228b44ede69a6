"""Export the global student for devices and score example sets with the exported file.

``fedrank export --run DIR --format torchscript|onnx --out FILE`` reads the student a finished
run saved (``DIR/student/student.pt`` + ``student.json``; the state dict is loaded with
``torch.load(..., weights_only=True)``) and writes one self-describing file:

- **torchscript**: a TorchScript archive (``torch.jit.save``) with an extra file
  ``fedrank.json``;
- **onnx**: an ONNX model (opset 17, needs the ``onnx`` package) whose metadata property
  ``fedrank`` holds the same JSON.

The JSON names the format version, the student's spec (``num_features``, hidden widths,
``feature_indices``), its parameter count, where it came from (run, round, metrics) and a
SHA-256 of its weights. Loading checks all of it, so a truncated or corrupt file, a file that is
not a fedrank export, or data whose feature count differs from the model's gives a clear
:class:`~common.errors.CheckpointError` / :class:`~common.errors.DataFormatError` naming the
file. Both formats take ``features [sets, items, num_features]`` float32 and return scores
``[sets, items]``; the student scores every item on its own, so padding never changes the scores
of real items.

``fedrank score --model FILE --data PATH [--out FILE]`` scores every set of a LETOR file (or a
fold folder's ``--split``) on the device with the exported file (TorchScript through torch,
ONNX through ``onnxruntime``), ranks the items of each set and prints the ranking in TREC run
format (``set Q0 item rank score fedrank``) or writes it atomically to ``--out`` (``.jsonl``:
one JSON object per set). ``--eval`` also prints NDCG@10 when the data has labels.

A device needs only ``common/`` and ``client/`` plus torch and numpy (and ``onnxruntime`` for
ONNX files); nothing here imports the server.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.atomic_io import atomic_path, atomic_write_bytes, atomic_write_text
from common.errors import CheckpointError, ConfigError, DataFormatError
from common.example_sets import ExampleSets

__all__ = [
    "EXPORT_FORMAT",
    "FORMATS",
    "ExportedStudent",
    "ScoringModule",
    "export_student",
    "load_run_student",
    "load_exported",
    "rank_sets",
    "export_main",
    "score_main",
]

EXPORT_FORMAT = "fedrank-student-export-v1"
FORMATS = ("torchscript", "onnx")
META_FILE = "fedrank.json"  # TorchScript extra file
META_KEY = "fedrank"  # ONNX metadata property
ONNX_OPSET = 17
_ZIP_MAGIC = b"PK\x03\x04"


# ---- the module that is exported ---------------------------------------------------------------
class ScoringModule(nn.Module):
    """The student's scoring path in a form TorchScript and ONNX can export.

    ``forward(features [B, N, F]) -> scores [B, N]``; it selects the student's columns
    (``feature_indices``), applies the student's feature transform (when it has one) and runs
    the student's MLP on each item.
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        if not hasattr(student, "net") or not hasattr(student, "feature_indices"):
            raise ConfigError(f"only a StudentModel can be exported, got {type(student).__name__}")
        self.net = copy.deepcopy(student.net).eval()
        self.register_buffer("feature_indices", student.feature_indices.detach().clone())
        self.num_features = int(student.num_features)
        transform = getattr(student, "transform", None)
        self.transform = None if transform is None else copy.deepcopy(transform).eval()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        shape_ok = features.dim() == 3 and features.size(-1) == self.num_features
        if not torch.jit.is_tracing() and not shape_ok:
            raise RuntimeError(
                "fedrank student: features must be [sets, items, num_features] with the "
                "model's num_features"
            )
        x = features.index_select(-1, self.feature_indices)
        if self.transform is not None:
            x = self.transform(x)
        return self.net(x).squeeze(-1)


def _weights_digest(state: dict[str, np.ndarray]) -> str:
    """SHA-256 over the sorted (name, dtype, shape, bytes) of the weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = np.ascontiguousarray(state[name])
        digest.update(name.encode())
        digest.update(str(value.dtype).encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _module_state(module: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


# ---- reading a run's student -------------------------------------------------------------------
def load_run_student(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The global student a run saved in ``run_dir/student/`` and its ``student.json`` info.

    Raises CheckpointError naming the file when it is missing, truncated or inconsistent.
    """
    from common.models import build_model
    from common.records import load_arrays

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
    try:
        load_arrays(model, state)
    except CheckpointError as err:
        raise CheckpointError(f"{weights_path}: {err}") from err
    model.eval()
    return model, info


# ---- export ------------------------------------------------------------------------------------
def _metadata(student: nn.Module, scoring: ScoringModule, source: dict[str, Any]) -> dict[str, Any]:
    from common.models import count_parameters

    return {
        "format": EXPORT_FORMAT,
        "spec": student.spec,
        "num_features": int(student.num_features),
        "num_inputs": int(scoring.feature_indices.numel()),
        "parameters": count_parameters(student),
        "weights_sha256": _weights_digest(_module_state(scoring)),
        "input": "features float32 [sets, items, num_features]",
        "output": "scores float32 [sets, items]",
        "source": source,
        "torch": torch.__version__,
    }


def export_student(
    student: nn.Module,
    out: str | Path,
    fmt: str,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``student`` to ``out`` in format ``fmt`` (atomically); returns the metadata."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    scoring = ScoringModule(student).eval()
    meta = _metadata(student, scoring, dict(source or {}))
    text = json.dumps(meta, sort_keys=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript / legacy ONNX deprecation notices
        if fmt == "torchscript":
            scripted = torch.jit.script(scoring)
            with atomic_path(out) as tmp:
                torch.jit.save(scripted, str(tmp), _extra_files={META_FILE: text})
        else:
            data, meta = _onnx_bytes(scoring, meta)
            atomic_write_bytes(out, data)
    return meta


def _onnx_bytes(scoring: ScoringModule, meta: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    try:
        import onnx
    except ImportError as err:
        raise ConfigError(
            "--format onnx needs the 'onnx' package (pip install onnx onnxruntime)"
        ) from err
    example = torch.zeros(1, 2, scoring.num_features)
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {
        "input_names": ["features"],
        "output_names": ["scores"],
        "dynamic_axes": {"features": {0: "sets", 1: "items"}, "scores": {0: "sets", 1: "items"}},
        "opset_version": ONNX_OPSET,
    }
    try:  # the TorchScript-based exporter: fast and needs only `onnx`
        torch.onnx.export(scoring, (example,), buf, dynamo=False, **kwargs)
    except (TypeError, NotImplementedError, RuntimeError, AttributeError):
        buf = io.BytesIO()  # torch without the legacy exporter: the torch.export one
        torch.onnx.export(scoring, (example,), buf, dynamo=True, **kwargs)
    model = onnx.load_from_string(buf.getvalue())
    # checksum of the whole graph (weights, constants, nodes) exactly as it is written
    meta = {**meta, "graph_sha256": hashlib.sha256(model.graph.SerializeToString()).hexdigest()}
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta, sort_keys=True)
    model.producer_name = "fedrank"
    onnx.checker.check_model(model)
    return model.SerializeToString(), meta


# ---- loading an export -------------------------------------------------------------------------
@dataclass
class ExportedStudent:
    """An exported student loaded for scoring."""

    path: Path
    format: str
    meta: dict[str, Any]
    _runner: Any = field(repr=False, default=None)

    @property
    def num_features(self) -> int:
        return int(self.meta["num_features"])

    @property
    def parameters(self) -> int:
        return int(self.meta["parameters"])

    def check_features(self, num_features: int, source: str) -> None:
        """DataFormatError when data with ``num_features`` columns cannot be scored."""
        if int(num_features) != self.num_features:
            raise DataFormatError(
                f"{source} has {num_features} features per item, the model {self.path} was "
                f"exported for {self.num_features}"
            )

    def score_padded(self, features: np.ndarray) -> np.ndarray:
        """Scores ``[B, N]`` for ``features [B, N, F]`` (float32)."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 3:
            raise DataFormatError(f"features must be [sets, items, F], got shape {x.shape}")
        self.check_features(x.shape[-1], "the input")
        if self.format == "onnx":
            return np.asarray(self._runner.run(None, {"features": x})[0], dtype=np.float32)
        with torch.inference_mode():
            return self._runner(torch.from_numpy(x)).numpy().astype(np.float32, copy=False)

    def score_sets(self, sets: ExampleSets, batch_size: int = 256) -> np.ndarray:
        """Flat scores ``[items]`` in item order for every set of ``sets``."""
        self.check_features(sets.num_features, "the data")
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        out = np.empty(sets.num_items, dtype=np.float32)
        for positions in sets.batch_positions(batch_size, bucket=True):
            batch = sets.pad(positions)
            scores = self.score_padded(batch.features.numpy())
            out[sets.item_index(positions)] = scores[batch.mask.numpy()]
        if not np.all(np.isfinite(out)):
            bad = int(np.flatnonzero(~np.isfinite(out))[0])
            set_pos = int(np.searchsorted(sets.offsets, bad, side="right") - 1)
            raise DataFormatError(
                f"the model gave a non-finite score in set {sets.set_ids[set_pos]!r}: "
                "the set's features hold NaN or inf?"
            )
        return out


def _corrupt(path: Path, what: str, err: BaseException | None = None) -> CheckpointError:
    detail = (
        f": {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}" if err else ""
    )
    return CheckpointError(f"{path} {what}{detail}")


def _parse_meta(path: Path, text: str | bytes) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(path, "holds unreadable fedrank metadata", err) from err
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{path}: export format {found!r} is not supported (expected {EXPORT_FORMAT!r})"
        )
    for key in ("num_features", "spec", "weights_sha256", "parameters"):
        if key not in meta:
            raise CheckpointError(f"{path}: fedrank metadata lacks {key!r}")
    return meta


def load_exported(path: str | Path) -> ExportedStudent:
    """Load a file written by :func:`export_student` (format detected from its content)."""
    src = Path(path)
    if not src.is_file():
        raise CheckpointError(f"--model {src}: no such file")
    raw = src.read_bytes()
    if not raw:
        raise CheckpointError(f"{src} is empty")
    if raw[:4] == _ZIP_MAGIC:
        return _load_torchscript(src, raw)
    return _load_onnx(src, raw)


def _load_torchscript(src: Path, raw: bytes) -> ExportedStudent:
    try:  # the zip's own CRCs catch truncation and bit flips before TorchScript sees it
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except Exception as err:  # BadZipFile, zlib.error, EOFError, ...
        raise _corrupt(
            src, "is not a readable TorchScript archive (truncated or corrupt?)", err
        ) from err
    if bad is not None:
        raise CheckpointError(f"{src} is corrupt: member {bad!r} fails its CRC check")
    if not any(n.endswith(f"extra/{META_FILE}") for n in names):
        raise CheckpointError(f"{src} is a zip/TorchScript file but not a fedrank export")
    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(io.BytesIO(raw), map_location="cpu", _extra_files=extra)
    except Exception as err:
        raise _corrupt(src, "cannot be loaded as TorchScript (truncated or corrupt?)", err) from err
    meta = _parse_meta(src, extra[META_FILE])
    state = _module_state(module)
    if _weights_digest(state) != meta["weights_sha256"]:
        raise CheckpointError(f"{src} is corrupt: its weights do not match their checksum")
    module.eval()
    return ExportedStudent(src, "torchscript", meta, module)


def _protobuf_field(raw: bytes, number: int) -> bytes | None:
    """The bytes of top-level length-delimited field ``number`` of a protobuf message (the
    last occurrence); None if absent. Raises ValueError on malformed or truncated input."""

    def varint(pos: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            if pos >= len(raw) or shift > 63:
                raise ValueError("truncated varint")
            byte = raw[pos]
            value |= (byte & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if not byte & 0x80:
                return value, pos

    pos, found = 0, None
    while pos < len(raw):
        key, pos = varint(pos)
        wire = key & 7
        if wire == 0:
            _, pos = varint(pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = varint(pos)
            if pos + length > len(raw):
                raise ValueError("truncated field")
            if key >> 3 == number:
                found = raw[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(raw):
            raise ValueError("truncated message")
    return found


def _load_onnx(src: Path, raw: bytes) -> ExportedStudent:
    try:
        import onnx
    except ImportError as err:
        raise ConfigError(f"{src}: reading ONNX files needs the 'onnx' package") from err
    try:
        graph_bytes = _protobuf_field(raw, 7)  # ModelProto.graph
        model = onnx.load_from_string(raw)
    except Exception as err:  # protobuf DecodeError, our ValueError
        raise _corrupt(
            src, "is neither a TorchScript archive nor a readable ONNX model", err
        ) from err
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props or graph_bytes is None:
        raise CheckpointError(
            f"{src} is not a fedrank export (no '{META_KEY}' metadata; truncated or corrupt?)"
        )
    meta = _parse_meta(src, props[META_KEY])
    if hashlib.sha256(graph_bytes).hexdigest() != meta.get("graph_sha256"):
        raise CheckpointError(f"{src} is corrupt: its graph does not match its checksum")
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise _corrupt(src, "is not a valid ONNX model", err) from err
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ConfigError(f"scoring with ONNX file {src} needs the 'onnxruntime' package") from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise _corrupt(src, "cannot be loaded by onnxruntime", err) from err
    return ExportedStudent(src, "onnx", meta, session)


# ---- ranking -----------------------------------------------------------------------------------
def rank_sets(sets: ExampleSets, scores: np.ndarray) -> Iterator[dict[str, Any]]:
    """Per set: ``{"set": id, "items": [...], "scores": [...]}`` best first; ties keep item
    order (a stable sort), as the project's metrics break ties."""
    for k in range(sets.num_sets):
        lo, hi = int(sets.offsets[k]), int(sets.offsets[k + 1])
        s = scores[lo:hi]
        order = np.argsort(-s, kind="stable")
        if sets.item_ids is not None:
            items = [str(i) for i in sets.item_ids[lo:hi][order]]
        else:
            items = [str(int(i)) for i in order]
        yield {
            "set": str(sets.set_ids[k]),
            "items": items,
            "scores": [float(v) for v in s[order]],
        }


def _trec_lines(rankings: Iterator[dict[str, Any]], top: int) -> Iterator[str]:
    for r in rankings:
        for rank, (item, score) in enumerate(zip(r["items"], r["scores"], strict=True), 1):
            if top and rank > top:
                break
            yield f"{r['set']} Q0 {item} {rank} {score:.6g} fedrank\n"


def _read_data(path: str, split: str, num_features: int) -> tuple[ExampleSets, str]:
    from common.letor import find_split_file, read_letor

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
    """``fedrank export --run DIR --format torchscript|onnx --out FILE``."""
    parser = argparse.ArgumentParser(
        prog="fedrank export", description="Export a run's global student for devices."
    )
    parser.add_argument("--run", required=True, help="output folder of a finished run")
    parser.add_argument("--format", required=True, choices=FORMATS, help="file format")
    parser.add_argument("--out", required=True, help="file to write (atomically)")
    args = parser.parse_args(list(argv))
    student, info = load_run_student(args.run)
    metrics = info.get("metrics") if isinstance(info.get("metrics"), dict) else {}
    source = {
        "run": str(Path(args.run)),
        "round": info.get("round"),
        "data": info.get("data"),
        "ndcg@10": metrics.get("ndcg@10"),
    }
    meta = export_student(student, args.out, args.format, source)
    size = Path(args.out).stat().st_size
    print(
        f"exported {args.format} student to {args.out}: {meta['parameters']:,} parameters, "
        f"{meta['num_inputs']} of {meta['num_features']} features, {size:,} bytes"
    )
    return 0


def score_main(argv: Sequence[str]) -> int:
    """``fedrank score --model FILE --data PATH [--out FILE]``."""
    parser = argparse.ArgumentParser(
        prog="fedrank score",
        description="Score and rank the items of each example set with an exported student.",
    )
    parser.add_argument("--model", required=True, help="file written by `fedrank export`")
    parser.add_argument("--data", required=True, help="LETOR file (.txt/.gz) or fold folder")
    parser.add_argument("--split", default="test", help="split of a fold folder (default test)")
    parser.add_argument("--out", help="write the ranking here (.jsonl: JSON lines; else TREC)")
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
    model = load_exported(args.model)
    sets, src = _read_data(args.data, args.split, model.num_features)
    t0 = time.perf_counter()
    scores = model.score_sets(sets, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    rankings = rank_sets(sets, scores)
    if args.out:
        out = Path(args.out)
        if out.suffix == ".jsonl":
            text = "".join(json.dumps(r) + "\n" for r in _top(rankings, args.top))
        else:
            text = "".join(_trec_lines(rankings, args.top))
        atomic_write_text(out, text)
    else:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.writelines(_trec_lines(rankings, args.top))
    per_set_ms = 1000.0 * seconds / max(sets.num_sets, 1)
    note = (
        f"scored {sets.num_sets} sets ({sets.num_items} items) of {src} with {model.format} "
        f"model in {seconds:.3f}s ({per_set_ms:.3f} ms per set)"
    )
    if args.eval:
        note += f"; ndcg@10 {ndcg10(sets, scores):.4f}"
    if args.out:
        note += f"; ranking written to {args.out}"
    print(note, file=sys.stderr)
    return 0


def _top(rankings: Iterator[dict[str, Any]], top: int) -> Iterator[dict[str, Any]]:
    for r in rankings:
        if top:
            r = {**r, "items": r["items"][:top], "scores": r["scores"][:top]}
        yield r


def ndcg10(sets: ExampleSets, scores: np.ndarray) -> float:
    """Mean NDCG@10 of flat ``scores`` over ``sets`` (the project's metric conventions)."""
    from common.metrics import ndcg

    values = []
    for positions in sets.batch_positions(256, bucket=False):
        batch = sets.pad(positions, extra={"s": scores})
        per_set = ndcg(batch.extra["s"], batch.labels, batch.mask, 10)
        values.append(per_set.double())
    total = torch.cat(values) if values else torch.zeros(0)
    total = total[torch.isfinite(total)]
    return float(total.mean()) if total.numel() else math.nan
