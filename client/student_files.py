"""Exported student files: data that a device can load without running anyone's code.

Formats (``fedrank export --format``):

- **safetensors** (default): the student's whole state dict (weights, ``feature_indices`` and
  every other buffer, e.g. a feature transform under ``transform.``) as raw tensors, and the
  metadata as JSON in the safetensors header. Loading parses the header, rebuilds the model
  from the spec with :func:`fedrank.common.models.build_model`, checks every tensor's name, shape,
  dtype and finiteness against that model, then loads it with ``strict=True``: nothing in the
  file is executed. Needs only torch, numpy and ``safetensors``.
- **onnx**: an ONNX model (opset 17) for other runtimes, with the same metadata as the property
  ``fedrank``. Every weight is stored inside the file; a file that refers to external data
  (``data_location = EXTERNAL``, which ONNX Runtime would read from paths next to the model or
  the working folder) is refused, on export and on load.
- **torchscript**: a TorchScript archive for LibTorch / PyTorch Mobile. Write-only: a
  TorchScript file can run code when it is loaded (``__setstate__``) and when it is called,
  so fedrank never loads one; ``fedrank score`` refuses it.

The metadata (JSON) names the format version, the student's spec, its feature count and
names, parameter count, origin, and a SHA-256 of its weights (safetensors) or of its graph
(ONNX); loading recomputes the digest. With a signing key the metadata text is signed
(ECDSA, :mod:`fedrank.common.signing`) and the signature stored beside it (``fedrank-signature``);
``verify_key`` makes loading refuse a file that is unsigned or signed by another key. A
corrupt, truncated, foreign or mismatched file raises :class:`CheckpointError` naming the file
(and the tensor, for a tensor that does not fit).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from torch import nn

from fedrank.common.errors import CheckpointError, ConfigError, DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.models import build_model, count_parameters
from fedrank.common.signing import fingerprint, sign_text, verify_text
from fedrank.common.student_folder import load_state_checked

__all__ = [
    "EXPORT_FORMAT",
    "FORMATS",
    "LOADABLE_FORMATS",
    "ExportedStudent",
    "ScoringModule",
    "encode_student",
    "load_exported",
    "student_metadata",
    "weights_digest",
]

EXPORT_FORMAT = "fedrank-student-export-v2"
_ONNX_FORMATS = ("fedrank-student-export-v1", EXPORT_FORMAT)  # v1 ONNX files are data too
FORMATS = ("safetensors", "onnx", "torchscript")
LOADABLE_FORMATS = ("safetensors", "onnx")
META_KEY = "fedrank"
SIGNATURE_KEY = "fedrank-signature"
TORCHSCRIPT_META_FILE = "fedrank.json"
ONNX_OPSET = 17
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the library's own limit


# ---- the module that ONNX and TorchScript export ---------------------------------------------
class ScoringModule(nn.Module):
    """The whole student as ``forward(features [B, N, F]) -> scores [B, N]`` (no mask: the
    student scores every item on its own, so padding never changes real items' scores)."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        if getattr(student, "kind", None) != "student":
            raise ConfigError(f"only a student can be exported, got {type(student).__name__}")
        self.student = copy.deepcopy(student).eval()
        self.num_features = int(student.num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.student(features)


# ---- metadata ----------------------------------------------------------------------------------
def _state_arrays(student: nn.Module) -> dict[str, np.ndarray]:
    return {
        k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in student.state_dict().items()
    }


def weights_digest(state: dict[str, np.ndarray]) -> str:
    """SHA-256 over the sorted (name, dtype, shape, bytes) of the tensors."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = np.ascontiguousarray(state[name])
        digest.update(name.encode())
        digest.update(str(value.dtype).encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def student_metadata(
    student: nn.Module,
    source: dict[str, Any] | None = None,
    feature_names: list[str] | None = None,
) -> dict[str, Any]:
    """The JSON-able description every export carries."""
    if feature_names is not None and len(feature_names) != int(student.num_features):
        raise ConfigError(
            f"{len(feature_names)} feature names for a student of {student.num_features} features"
        )
    return {
        "format": EXPORT_FORMAT,
        "spec": student.spec,
        "num_features": int(student.num_features),
        "num_inputs": int(student.feature_indices.numel()),
        "feature_names": None if feature_names is None else [str(n) for n in feature_names],
        "parameters": count_parameters(student),
        "weights_sha256": weights_digest(_state_arrays(student)),
        "input": "features float32 [sets, items, num_features]",
        "output": "scores float32 [sets, items]",
        "source": dict(source or {}),
        "torch": torch.__version__,
    }


def _signed(meta: dict[str, Any], key: ec.EllipticCurvePrivateKey | None) -> dict[str, str]:
    """The string properties a file carries: the metadata JSON and, with a key, its signature."""
    if key is not None:
        meta = {**meta, "signer": fingerprint(key)}
    text = json.dumps(meta, sort_keys=True)
    props = {META_KEY: text}
    if key is not None:
        props[SIGNATURE_KEY] = sign_text(key, text)
    return props


# ---- writing -----------------------------------------------------------------------------------
def encode_student(
    student: nn.Module,
    fmt: str,
    meta: dict[str, Any],
    sign_key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """The bytes of ``student`` in format ``fmt`` and the metadata written into them."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "safetensors":
        props = _signed(meta, sign_key)
        data = safetensors.numpy.save(_state_arrays(student), metadata=props)
        return data, json.loads(props[META_KEY])
    if fmt == "onnx":
        return _onnx_bytes(ScoringModule(student), meta, sign_key)
    if sign_key is not None:
        raise ConfigError(
            "--sign-key: TorchScript exports are not signed (fedrank never loads them); "
            "sign a safetensors or ONNX export"
        )
    scripted = _trace(ScoringModule(student))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        torch.jit.save(scripted, buf, _extra_files={TORCHSCRIPT_META_FILE: json.dumps(meta)})
    return buf.getvalue(), meta


def _example(scoring: ScoringModule) -> torch.Tensor:
    return torch.zeros(1, 2, scoring.num_features)


def _trace(scoring: ScoringModule) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape checks, deprecations
        return torch.jit.trace(scoring, (_example(scoring),), check_trace=False)


def _onnx_bytes(
    scoring: ScoringModule, meta: dict[str, Any], sign_key: ec.EllipticCurvePrivateKey | None
) -> tuple[bytes, dict[str, Any]]:
    try:
        import onnx
    except ImportError as err:
        raise ConfigError(
            "--format onnx needs the 'onnx' package (pip install onnx onnxruntime)"
        ) from err
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {
        "input_names": ["features"],
        "output_names": ["scores"],
        "dynamic_axes": {"features": {0: "sets", 1: "items"}, "scores": {0: "sets", 1: "items"}},
        "opset_version": ONNX_OPSET,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation, TracerWarnings
        try:  # the TorchScript-based exporter: fast and needs only `onnx`
            torch.onnx.export(scoring, (_example(scoring),), buf, dynamo=False, **kwargs)
        except (TypeError, NotImplementedError, RuntimeError, AttributeError):
            buf = io.BytesIO()  # torch without the legacy exporter: the torch.export one
            torch.onnx.export(scoring, (_example(scoring),), buf, dynamo=True, **kwargs)
    model = onnx.load_from_string(buf.getvalue())
    external = _external_tensors(model)
    if external:  # cannot happen for an in-memory export; never write one anyway
        raise ConfigError(f"the ONNX export refers to external data for {external[:3]}")
    # checksum of the whole graph (weights, constants, nodes) exactly as it is written
    meta = {**meta, "graph_sha256": hashlib.sha256(model.graph.SerializeToString()).hexdigest()}
    props = _signed(meta, sign_key)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "fedrank"
    onnx.checker.check_model(model)
    return model.SerializeToString(), json.loads(props[META_KEY])


# ---- loading -----------------------------------------------------------------------------------
@dataclass
class ExportedStudent:
    """An exported student loaded for scoring."""

    path: Path
    format: str
    meta: dict[str, Any]
    signed_by: str | None = None
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


def load_exported(
    path: str | Path, verify_key: ec.EllipticCurvePublicKey | None = None
) -> ExportedStudent:
    """Load a safetensors or ONNX file written by ``fedrank export`` (format detected from
    its content); with ``verify_key`` the file must carry a valid signature by that key."""
    src = Path(path)
    if not src.is_file():
        raise CheckpointError(f"--model {src}: no such file")
    raw = src.read_bytes()
    if not raw:
        raise CheckpointError(f"{src} is empty")
    if raw[:4] == _ZIP_MAGIC:
        raise CheckpointError(
            f"{src} is a TorchScript archive (or another zip file): fedrank does not load "
            "TorchScript, which can run code when loaded; export the student with "
            "`fedrank export --format safetensors` (or onnx)"
        )
    if _looks_like_safetensors(raw):
        return _load_safetensors(src, raw, verify_key)
    return _load_onnx(src, raw, verify_key)


def _looks_like_safetensors(raw: bytes) -> bool:
    if len(raw) < 10:
        return False
    n = int.from_bytes(raw[:8], "little")
    return 2 <= n <= min(len(raw) - 8, _MAX_SAFETENSORS_HEADER) and raw[8:9] == b"{"


def _check_signature(
    src: Path, props: dict[str, str], verify_key: ec.EllipticCurvePublicKey | None
) -> str | None:
    """The signer's fingerprint when the file is signed (and, with ``verify_key``, verifies);
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


def _parse_meta(src: Path, text: str, formats: tuple[str, ...]) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(src, "holds unreadable fedrank metadata", err) from err
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


def _load_safetensors(
    src: Path, raw: bytes, verify_key: ec.EllipticCurvePublicKey | None
) -> ExportedStudent:
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _corrupt(src, "has an unreadable safetensors header (corrupt?)", err) from None
    props = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(props, dict) or not isinstance(props.get(META_KEY), str):
        raise CheckpointError(f"{src} is a safetensors file but not a fedrank export")
    signer = _check_signature(src, props, verify_key)
    meta = _parse_meta(src, props[META_KEY], (EXPORT_FORMAT,))
    try:
        arrays = safetensors.numpy.load(raw)
    except Exception as err:  # SafetensorError: bad offsets, truncation, unknown dtype
        raise _corrupt(src, "cannot be read as safetensors (truncated or corrupt?)", err) from err
    if weights_digest(arrays) != meta.get("weights_sha256"):
        raise CheckpointError(f"{src} is corrupt: its weights do not match their checksum")
    try:
        model = build_model(meta["spec"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{src}: bad student spec in its metadata: {err}") from None
    if getattr(model, "kind", None) != "student":
        raise CheckpointError(f"{src}: the spec describes a {model.kind}, not a student")
    if int(model.num_features) != meta["num_features"]:
        raise CheckpointError(f"{src}: 'num_features' differs from the spec's")
    load_state_checked(src, model, arrays)
    return ExportedStudent(src, "safetensors", meta, signer, model.eval())


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


def _external_tensors(model: Any) -> list[str]:
    import onnx  # optional (ONNX files only); the caller imported it already, with its message

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


def _load_onnx(
    src: Path, raw: bytes, verify_key: ec.EllipticCurvePublicKey | None
) -> ExportedStudent:
    try:
        import onnx
    except ImportError as err:
        raise ConfigError(f"{src}: reading ONNX files needs the 'onnx' package") from err
    try:
        graph_bytes = _protobuf_field(raw, 7)  # ModelProto.graph
        model = onnx.load_from_string(raw)
    except Exception as err:  # protobuf DecodeError, our ValueError
        raise _corrupt(src, "is neither a safetensors file nor a readable ONNX model", err) from err
    props = {p.key: p.value for p in model.metadata_props}
    if META_KEY not in props or graph_bytes is None:
        raise CheckpointError(
            f"{src} is not a fedrank export (no '{META_KEY}' metadata; truncated or corrupt?)"
        )
    external = _external_tensors(model)
    if external:
        raise CheckpointError(
            f"{src} refers to external data (tensor {external[0]!r}): refused, the weights of "
            "a student file must be inside it (ONNX Runtime would read other files)"
        )
    signer = _check_signature(src, props, verify_key)
    meta = _parse_meta(src, props[META_KEY], _ONNX_FORMATS)
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
    return ExportedStudent(src, "onnx", meta, signer, session)
