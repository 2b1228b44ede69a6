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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch
from cryptography.hazmat.primitives.asymmetric import ec
from torch import nn

from fedrank.client.student_format import (
    EXPORT_FORMAT,
    META_KEY,
    SIGNATURE_KEY,
    OnnxStudent,
    check_signature,
    corrupt,
    external_tensors,
    file_kind,
    load_onnx,
    onnx_module,
    parse_meta,
    read_model_file,
    score_flat,
)
from fedrank.common.errors import CheckpointError, ConfigError, DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.models import build_model, count_parameters
from fedrank.common.signing import fingerprint, sign_text
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

FORMATS = ("safetensors", "onnx", "torchscript")
LOADABLE_FORMATS = ("safetensors", "onnx")
TORCHSCRIPT_META_FILE = "fedrank.json"
ONNX_OPSET = 17


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
    onnx = onnx_module()
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
    external = external_tensors(model, onnx)
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
            return self._runner.score_padded(x)
        with torch.inference_mode():
            return self._runner(torch.from_numpy(x)).numpy().astype(np.float32, copy=False)

    def score_sets(self, sets: ExampleSets, batch_size: int = 256) -> np.ndarray:
        """Flat scores ``[items]`` in item order for every set of ``sets``."""
        return score_flat(self.score_padded, sets, batch_size, self.num_features, self.path)


def load_exported(
    path: str | Path, verify_key: ec.EllipticCurvePublicKey | None = None
) -> ExportedStudent:
    """Load a safetensors or ONNX file written by ``fedrank export`` (format detected from
    its content); with ``verify_key`` the file must carry a valid signature by that key."""
    src, raw = read_model_file(path)
    if file_kind(src, raw) == "safetensors":
        return _load_safetensors(src, raw, verify_key)
    onnx_student: OnnxStudent = load_onnx(src, raw, verify_key, threads=torch.get_num_threads())
    return ExportedStudent(src, "onnx", onnx_student.meta, onnx_student.signed_by, onnx_student)


def _load_safetensors(
    src: Path, raw: bytes, verify_key: ec.EllipticCurvePublicKey | None
) -> ExportedStudent:
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise corrupt(src, "has an unreadable safetensors header (corrupt?)", err) from None
    props = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(props, dict) or not isinstance(props.get(META_KEY), str):
        raise CheckpointError(f"{src} is a safetensors file but not a fedrank export")
    signer = check_signature(src, props, verify_key)
    meta = parse_meta(src, props[META_KEY], (EXPORT_FORMAT,))
    try:
        arrays = safetensors.numpy.load(raw)
    except Exception as err:  # SafetensorError: bad offsets, truncation, unknown dtype
        raise corrupt(src, "cannot be read as safetensors (truncated or corrupt?)", err) from err
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
