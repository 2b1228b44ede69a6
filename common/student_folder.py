"""The global student a run saves for devices: ``<out-dir>/student/``, written and read here.

- ``student.pt``: the state dict (plain tensors; it loads with ``weights_only=True``);
- ``student.json``: ``spec`` (what :func:`fedrank.common.models.build_model` rebuilds it
  from) next to the run's final metrics, round and data name.

The ServerApp writes it (:func:`save_student`); ``fedrank export`` and the tools read it
(:func:`load_student`), which checks every tensor against the spec's model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fedrank.common.atomic_io import atomic_path, atomic_write_json
from fedrank.common.errors import CheckpointError, ConfigError
from fedrank.common.models import build_model
from fedrank.common.records import load_arrays, model_arrays, weights_problem

__all__ = ["STUDENT_DIR", "load_state_checked", "load_student", "save_student"]

STUDENT_DIR = "student"
WEIGHTS_FILE = "student.pt"
INFO_FILE = "student.json"


def save_student(
    model: torch.nn.Module, run_dir: str | os.PathLike[str], info: dict[str, Any]
) -> Path:
    """Write ``model`` and ``info`` into ``run_dir/student/`` (atomically); the folder."""
    folder = Path(run_dir) / STUDENT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    atomic_write_json(folder / INFO_FILE, {"spec": model.spec, **info})
    return folder


def load_student(run_dir: str | os.PathLike[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The student :func:`save_student` wrote in ``run_dir`` (in eval mode) and its info.

    Raises CheckpointError naming the file when it is missing, truncated or inconsistent.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"--run {run}: no such run folder")
    folder = run / STUDENT_DIR
    info_path, weights_path = folder / INFO_FILE, folder / WEIGHTS_FILE
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


def load_state_checked(
    src: str | os.PathLike[str], model: torch.nn.Module, arrays: dict[str, Any]
) -> None:
    """Load ``arrays`` into ``model`` (built from the file's spec) after checking every
    tensor's name, shape, dtype and finiteness, then run it once on a zero input; raises
    CheckpointError naming ``src`` and the tensor. Nothing is loaded when a check fails. Every
    student file (this folder, safetensors, ONNX initialisers) is loaded through here."""
    problem = weights_problem(arrays, model_arrays(model), exact_dtype=True)
    if problem:
        raise CheckpointError(f"{src}: {problem}")
    load_arrays(model, arrays)
    try:  # e.g. feature indices outside the input: refused now, not while scoring
        with torch.inference_mode():
            probe = model(torch.zeros(1, 1, int(model.num_features)))
    except Exception as err:
        detail = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(
            f"{src} holds weights the student cannot run with: {type(err).__name__}: {detail}"
        ) from None
    if probe.shape != (1, 1) or not bool(torch.isfinite(probe).all()):
        raise CheckpointError(f"{src}: the student gives no finite score for a zero input")
