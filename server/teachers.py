"""The run's teacher, by ``teacher-kind``: one entry point for the ServerApp.

- ``set-transformer`` (default): the built-in set-aware Transformer (:mod:`fedrank.server.teacher`);
- ``lightgbm``: LightGBM LambdaMART (:mod:`fedrank.server.lightgbm_teacher`);
- ``imported``: the scores of a ranker the user already has (``teacher-scores``): a table
  folder written by ``fedrank teacher --scores`` (or any ``fedrank teacher`` output folder, or
  an ``.npz`` table), or a TREC run / CSV / Parquet score file imported on the spot
  (:mod:`fedrank.server.imported_scores`).

Each gives a :class:`~fedrank.server.teacher.TeacherBundle` whose table covers every set of every
split; :func:`teacher_parameters` sizes the teacher for reports whatever its kind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedrank.common.config import FedrankConfig
from fedrank.common.errors import CheckpointError, ConfigError, DataFormatError, ScoreTableError
from fedrank.common.letor import user_cache_dir
from fedrank.common.models import count_parameters
from fedrank.common.score_table import META_FILE, ScoreTable
from fedrank.server.imported_scores import detect_format, import_score_table
from fedrank.server.lightgbm_teacher import LightGBMConfig, LightGBMTeacher, train_or_load_lightgbm
from fedrank.server.teacher import (
    TeacherBundle,
    TeacherConfig,
    concat_splits,
    train_or_load_teacher,
)
from fedrank.server.teacher_scoring import table_path

__all__ = ["load_imported_table", "run_teacher", "teacher_cache_dir", "teacher_parameters"]

log = logging.getLogger("fedrank.teacher")


def teacher_cache_dir(cfg: FedrankConfig) -> Path:
    """Where the run's teacher is cached: ``teacher-cache-dir`` when set, else the folder every
    run of this user shares, ``$FEDRANK_CACHE_DIR/teachers`` (default
    ``~/.cache/fedrank/teachers``). Entries are keyed by the data and the teacher settings, so
    a run with a new ``out-dir`` reuses the teacher an earlier run trained."""
    if cfg.teacher_cache_dir:
        return Path(cfg.teacher_cache_dir).expanduser()
    return user_cache_dir() / "teachers"


def run_teacher(
    cfg: FedrankConfig, dataset: Any, cache_dir: str | os.PathLike[str], progress: bool = False
) -> TeacherBundle:
    """Train, load from the cache or import the teacher ``cfg.teacher_kind`` names."""
    if cfg.teacher_kind == "lightgbm":
        config = LightGBMConfig.from_config(cfg)
        return train_or_load_lightgbm(dataset, config, cache_dir, progress=progress)
    if cfg.teacher_kind == "imported":
        return load_imported_table(cfg.teacher_scores, dataset)
    return train_or_load_teacher(
        dataset, TeacherConfig.from_config(cfg), cache_dir, progress=progress
    )


def _table_source(path: Path) -> Path | None:
    """The table folder or ``.npz`` file ``path`` names, or None for a score file."""
    if path.is_dir():
        if (path / META_FILE).is_file():
            return path
        if (table_path(path) / META_FILE).is_file():
            return table_path(path)  # a `fedrank teacher` output folder
        raise ConfigError(
            f"'teacher-scores' {str(path)!r} is a folder without a score table ({META_FILE} or "
            "scores/): give a folder written by `fedrank teacher` or a score file"
        )
    if path.suffix == ".npz":
        return path
    return None


def load_imported_table(spec: str, dataset: Any) -> TeacherBundle:
    """The imported teacher of ``teacher-scores`` = ``spec`` for ``dataset``.

    A table must hold every set of the data with the data's set sizes; a score file must score
    every item. Either failure is a ConfigError naming ``teacher-scores`` and the set, file or
    line.
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"'teacher-scores' {spec!r} does not exist")
    splits = getattr(dataset, "splits", dataset)
    all_sets = concat_splits(splits)
    source = _table_source(path)
    try:
        if source is not None:
            table = ScoreTable.load(source)
            table.check_covers(all_sets)
            info = {"kind": "imported", "source": str(source), "format": "table"}
        else:
            table = import_score_table(path, all_sets)
            info = {"kind": "imported", "source": str(path), "format": detect_format(path)}
    except (CheckpointError, ScoreTableError, DataFormatError) as err:
        raise ConfigError(f"'teacher-scores' {spec!r}: {err}") from None
    info["score_table_version"] = table.version
    log.info("teacher: imported scores from %s (table %s)", info["source"], table.version)
    return TeacherBundle(None, table, source is not None, Path(info["source"]), info)


def teacher_parameters(bundle: TeacherBundle) -> int:
    """Parameters of the teacher (tree nodes for LightGBM; 0 for imported scores)."""
    model = bundle.model
    if model is None:
        return 0
    if isinstance(model, LightGBMTeacher):
        return model.parameters
    return int(count_parameters(model))
