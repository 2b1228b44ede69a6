"""Student files without torch: format detection, metadata and signature checks, ONNX scoring.

A device that scores an ONNX student (``fedrank score --model student.onnx``) needs only
numpy, ``onnx`` and ``onnxruntime``: this module and what it imports never load torch (torch
alone is about 270 MB of resident memory). :mod:`fedrank.client.student_files` builds on it for the
torch formats (safetensors loading, every export).

- :func:`file_kind` tells a safetensors file, an ONNX file and a TorchScript archive (refused)
  apart by their first bytes.
- :func:`check_signature` and :func:`parse_meta` check the JSON metadata every export carries
  (format version, spec, feature count) and its ECDSA signature.
- :func:`load_onnx` parses an ONNX export, refuses external data, checks the graph against its
  SHA-256 and the signature, and opens it in ONNX Runtime: an :class:`OnnxStudent`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from fedrank.common.errors import CheckpointError, ConfigError, DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.signing import fingerprint, verify_text

__all__ = [
    "EXPORT_FORMAT",
    "META_KEY",
    "ONNX_FORMATS",
    "SIGNATURE_KEY",
    "OnnxStudent",
    "check_signature",
    "corrupt",
    "external_tensors",
    "file_kind",
    "load_onnx",
    "parse_meta",
    "read_model_file",
    "score_flat",
]

EXPORT_FORMAT = "fedrank-student-export-v2"
ONNX_FORMATS = ("fedrank-student-export-v1", EXPORT_FORMAT)  # v1 ONNX files are data too
META_KEY = "fedrank"
SIGNATURE_KEY = "fedrank-signature"
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors library's own limit


def corrupt(path: Path, what: str, err: BaseException | None = None) -> CheckpointError:
    """A CheckpointError ``"<path> <what>: <error's first line>"``."""
    detail = (
        f": {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}" if err else ""
    )
    return CheckpointError(f"{path} {what}{detail}")


def file_kind(src: Path, raw: bytes) -> str:
    """``"safetensors"`` or ``"onnx"`` (anything else is tried as ONNX and refused there);
    CheckpointError for an empty file or a TorchScript archive (or another zip)."""
    if not raw:
        raise CheckpointError(f"{src} is empty")
    if raw[:4] == _ZIP_MAGIC:
        raise CheckpointError(
            f"{src} is a TorchScript archive (or another zip file): fedrank does not load "
            "TorchScript, which can run code when loaded; export the student with "
            "`fedrank export --format safetensors` (or onnx)"
        )
    if len(raw) >= 10:
        n = int.from_bytes(raw[:8], "little")
        if 2 <= n <= min(len(raw) - 8, _MAX_SAFETENSORS_HEADER) and raw[8:9] == b"{":
            return "safetensors"
    return "onnx"


def read_model_file(path: str | Path) -> tuple[Path, bytes]:
    """The bytes of ``--model path``; CheckpointError when it is missing."""
    src = Path(path)
    if not src.is_file():
        raise CheckpointError(f"--model {src}: no such file")
    return src, src.read_bytes()


# ---- metadata and signature -------------------------------------------------------------------
def check_signature(
    src: Path, props: dict[str, str], verify_key: ec.EllipticCurvePublicKey | None
) -> str | None:
    """The signer's fingerprint when ``verify_key`` is given and the signature verifies;
    CheckpointError when ``verify_key`` is given and the signature is missing or wrong."""
    signature = props.get(SIGNATURE_KEY)
    if verify_key is None:
        return None
    if signature is None:
        raise CheckpointError(
            f"{src} is not signed, and --verify-key asks for a file signed by "
            f"{fingerprint(verify_key)}"
        )
    if not verify_text(verify_key, props[META_KEY], signature):
        raise CheckpointError(
            f"{src}: its signature does not verify with the key {fingerprint(verify_key)} "
            "(signed by another key, or changed since it was signed)"
        )
    return fingerprint(verify_key)


def parse_meta(src: Path, text: str, formats: tuple[str, ...]) -> dict[str, Any]:
    """The export's JSON metadata, checked for a known format and the keys loading needs."""
    try:
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise corrupt(src, "holds unreadable fedrank metadata", err) from err
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"{src}: export format {found!r} is not supported (expected {formats[-1]!r})"
        )
    for key in ("num_features", "spec", "parameters"):
        if key not in meta:
            raise CheckpointError(f"{src}: fedrank metadata lacks {key!r}")
    if isinstance(meta["num_features"], bool) or not isinstance(meta["num_features"], int):
        raise CheckpointError(f"{src}: fedrank metadata 'num_features' is not an integer")
    return meta


# ---- scoring ----------------------------------------------------------------------------------
def score_flat(
    score_padded: Any, sets: ExampleSets, batch_size: int, num_features: int, path: Path
) -> np.ndarray:
    """Flat scores ``[items]`` in item order: ``score_padded(features [B, N, F]) -> [B, N]``
    over size-bucketed batches of ``batch_size`` sets; DataFormatError for a feature count
    other than ``num_features`` or a non-finite score (naming the set)."""
    if int(sets.num_features) != int(num_features):
        raise DataFormatError(
            f"the data has {sets.num_features} features per item, the model {path} was "
            f"exported for {num_features}"
        )
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    out = np.empty(sets.num_items, dtype=np.float32)
    for positions in sets.batch_positions(batch_size, bucket=True):
        features, mask = sets.pad_features(positions)
        out[sets.item_index(positions)] = np.asarray(score_padded(features))[mask]
    if not np.all(np.isfinite(out)):
        bad = int(np.flatnonzero(~np.isfinite(out))[0])
        set_pos = int(np.searchsorted(sets.offsets, bad, side="right") - 1)
        raise DataFormatError(
            f"the model gave a non-finite score in set {sets.set_ids[set_pos]!r}: "
            "the set's features hold NaN or inf?"
        )
    return out


@dataclass
class OnnxStudent:
    """An ONNX student export opened in ONNX Runtime (no torch)."""

    path: Path
    meta: dict[str, Any]
    signed_by: str | None = None
    session: Any = field(repr=False, default=None)
    format: str = "onnx"

    @property
    def num_features(self) -> int:
        return int(self.meta["num_features"])

    def score_padded(self, features: np.ndarray) -> np.ndarray:
        """Scores ``[B, N]`` for ``features [B, N, F]`` (float32)."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim != 3:
            raise DataFormatError(f"features must be [sets, items, F], got shape {x.shape}")
        if x.shape[-1] != self.num_features:
            raise DataFormatError(
                f"the input has {x.shape[-1]} features per item, the model {self.path} was "
                f"exported for {self.num_features}"
            )
        return np.asarray(self.session.run(None, {"features": x})[0], dtype=np.float32)

    def score_sets(self, sets: ExampleSets, batch_size: int = 256) -> np.ndarray:
        """Flat scores ``[items]`` in item order for every set of ``sets``."""
        return score_flat(self.score_padded, sets, batch_size, self.num_features, self.path)


# ---- ONNX ---------------------------------------------------------------------------------------
def _tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX model: initializers, sparse ones, node attributes, in
    every graph, subgraph, function and training graph."""

    def of_nodes(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
                for st in [*sparse, *attr.sparse_tensors]:
                    yield st.values
                    yield st.indices
                if attr.HasField("g"):
                    yield from of_graph(attr.g)
                for sub in attr.graphs:
                    yield from of_graph(sub)

    def of_graph(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for st in graph.sparse_initializer:
            yield st.values
            yield st.indices
        yield from of_nodes(graph.node)

    yield from of_graph(model.graph)
    for function in model.functions:
        yield from of_nodes(function.node)
    for info in model.training_info:
        yield from of_graph(info.initialization)
        yield from of_graph(info.algorithm)


def external_tensors(model: Any, onnx: Any) -> list[str]:
    """Names of the tensors of ``model`` whose data lies outside it (``onnx``: the module)."""
    return [
        t.name or "<unnamed>"
        for t in _tensors(model)
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data)
    ]


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


def onnx_module() -> Any:
    """The ``onnx`` package; ConfigError naming the extra when it is not installed."""
    try:
        import onnx  # optional: the `device` and `onnx` extras
    except ImportError as err:
        raise ConfigError(
            "ONNX student files need the 'onnx' and 'onnxruntime' packages "
            "(pip install 'fedrank[device]')"
        ) from err
    return onnx


def load_onnx(
    src: Path,
    raw: bytes,
    verify_key: ec.EllipticCurvePublicKey | None = None,
    threads: int = 0,
) -> OnnxStudent:
    """An ONNX export (``raw``, read from ``src``) checked and opened in ONNX Runtime with
    ``threads`` intra-op threads (0: the CPU count)."""
    onnx = onnx_module()
    try:
        graph_bytes = _protobuf_field(raw, 7)  # ModelProto.graph
        model = onnx.load_from_string(raw)
    except Exception as err:  # protobuf DecodeError, our ValueError
        raise corrupt(src, "is neither a safetensors file nor a readable ONNX model", err) from err
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props or graph_bytes is None:
        raise CheckpointError(
            f"{src} is not a fedrank export (no '{META_KEY}' metadata; truncated or corrupt?)"
        )
    external = external_tensors(model, onnx)
    if external:
        raise CheckpointError(
            f"{src} refers to external data (tensor {external[0]!r}): refused, the weights of "
            "a student file must be inside it (ONNX Runtime would read other files)"
        )
    signer = check_signature(src, props, verify_key)
    meta = parse_meta(src, props[META_KEY], ONNX_FORMATS)
    if hashlib.sha256(graph_bytes).hexdigest() != meta.get("graph_sha256"):
        raise CheckpointError(f"{src} is corrupt: its graph does not match its checksum")
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise corrupt(src, "is not a valid ONNX model", err) from err
    try:
        import onnxruntime as ort  # optional: the `device` and `onnx` extras
    except ImportError as err:
        raise ConfigError(
            f"scoring with ONNX file {src} needs the 'onnxruntime' package "
            "(pip install 'fedrank[device]')"
        ) from err
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads > 0 else max(1, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(raw, options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise corrupt(src, "cannot be loaded by onnxruntime", err) from err
    return OnnxStudent(src, meta, signer, session)
