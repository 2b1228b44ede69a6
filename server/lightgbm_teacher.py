"""A LightGBM LambdaMART teacher (``teacher-kind = "lightgbm"``).

Gradient-boosted trees with the LambdaRank objective are the ranker many teams already run in
production. This teacher trains one on the training split, early-stopped on the validation
split's NDCG@10, and scores every set of every split into a versioned score table, cached the
same way as the built-in teacher: the folder ``cache_dir/lightgbm-<key>`` (key: SHA-256 of the
data and the settings) holds

- ``model.txt``: the booster in LightGBM's text model format (data, never pickle); its
  SHA-256 is recorded in ``teacher.json`` and checked before the model is parsed;
- ``scores/``: the score table folder (:mod:`fedrank.common.score_table`);
- ``teacher.json`` (written last): settings, cache key, data fingerprint, table version, NDCG
  per split, best iteration.

``lightgbm`` is an optional server dependency (``pip install 'fedrank[lightgbm]'``); a device
never needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedrank.common.atomic_io import atomic_write_json, atomic_write_text, read_format_json
from fedrank.common.config import FedrankConfig
from fedrank.common.errors import CheckpointError, ConfigError, ScoreTableError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.score_table import ScoreTable
from fedrank.server.teacher import TeacherBundle, concat_splits, data_fingerprint
from fedrank.server.teacher_scoring import score_to_table, split_metrics, table_path

try:  # an optional dependency: only this teacher needs it
    import lightgbm
except ImportError:  # pragma: no cover - exercised where lightgbm is not installed
    lightgbm = None

__all__ = [
    "LightGBMConfig",
    "LightGBMTeacher",
    "lightgbm_cache_key",
    "load_lightgbm_teacher",
    "save_lightgbm_teacher",
    "train_lightgbm",
    "train_or_load_lightgbm",
]

log = logging.getLogger("fedrank.teacher")

FORMAT = "fedrank-lightgbm-teacher-v1"
MODEL_FILE = "model.txt"
INFO_FILE = "teacher.json"
KIND = "lightgbm"
_PREDICT_ROWS = 1 << 16


def require_lightgbm() -> Any:
    """The ``lightgbm`` module, or a ConfigError saying how to install it."""
    if lightgbm is None:
        raise ConfigError(
            "'teacher-kind' = lightgbm needs the lightgbm package: "
            "pip install 'fedrank[lightgbm]' (on the server; devices do not need it)"
        )
    return lightgbm


@dataclass(frozen=True)
class LightGBMConfig:
    """LambdaMART settings (the ``lightgbm-*`` configuration keys).

    Defaults: 500 trees of 31 leaves at learning rate 0.05, at least 20 items per leaf, early
    stopping after 50 trees without a better validation NDCG@10 (0: off). ``num_threads`` (0:
    LightGBM's default, every core) does not change the model (``deterministic`` training).
    """

    trees: int = 500
    leaves: int = 31
    learning_rate: float = 0.05
    min_data_in_leaf: int = 20
    early_stopping: int = 50
    seed: int = 0
    num_threads: int = 0

    def __post_init__(self) -> None:
        lows = {"trees": 1, "leaves": 2, "min_data_in_leaf": 1, "early_stopping": 0}
        lows |= {"seed": 0, "num_threads": 0}
        for name, low in lows.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(
                    f"'lightgbm-{name.replace('_', '-')}' must be an integer >= {low}, "
                    f"got {value!r}"
                )
        rate = self.learning_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise ConfigError(f"'lightgbm-learning-rate' must be > 0, got {rate!r}")
        if not math.isfinite(float(rate)):
            raise ConfigError(f"'lightgbm-learning-rate' must be finite, got {rate!r}")

    @classmethod
    def from_config(cls, cfg: FedrankConfig) -> LightGBMConfig:
        """The LightGBM teacher of a run: the ``lightgbm-*`` keys of ``cfg`` (validated there)."""
        return cls(
            trees=cfg.lightgbm_trees,
            leaves=cfg.lightgbm_leaves,
            learning_rate=cfg.lightgbm_learning_rate,
            min_data_in_leaf=cfg.lightgbm_min_data_in_leaf,
            early_stopping=cfg.lightgbm_early_stopping,
            seed=cfg.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def params(self) -> dict[str, Any]:
        """LightGBM's parameters: LambdaRank, NDCG@10 on the validation split."""
        return {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [10],
            "num_leaves": int(self.leaves),
            "learning_rate": float(self.learning_rate),
            "min_data_in_leaf": int(self.min_data_in_leaf),
            "seed": int(self.seed),
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": int(self.num_threads),
            "verbosity": -1,
        }


class LightGBMTeacher:
    """A trained LambdaMART booster that scores example sets (raw scores as logits)."""

    def __init__(self, booster: Any, info: Mapping[str, Any] | None = None) -> None:
        self.booster = booster
        self.info = dict(info or {})

    @property
    def num_trees(self) -> int:
        return int(self.booster.num_trees())

    @property
    def parameters(self) -> int:
        """Leaves over all trees: split thresholds plus leaf values, about 2 numbers each."""
        dump = self.booster.dump_model()
        leaves = sum(_count_leaves(t["tree_structure"]) for t in dump["tree_info"])
        return int(2 * leaves - len(dump["tree_info"]))

    def score(self, sets: ExampleSets) -> np.ndarray:
        """Flat float32 scores of every item of ``sets`` (predicted in row chunks)."""
        out = np.empty(sets.num_items, dtype=np.float32)
        for lo in range(0, sets.num_items, _PREDICT_ROWS):
            rows = sets.features[lo : lo + _PREDICT_ROWS]
            out[lo : lo + rows.shape[0]] = self.booster.predict(rows, raw_score=True)
        if not np.all(np.isfinite(out)):
            raise ScoreTableError("the LightGBM teacher produced non-finite scores")
        return out

    def to_text(self) -> str:
        return str(self.booster.model_to_string())


def _count_leaves(node: Mapping[str, Any]) -> int:
    if "leaf_value" in node and "left_child" not in node:
        return 1
    return _count_leaves(node["left_child"]) + _count_leaves(node["right_child"])


def _group_data(sets: ExampleSets, reference: Any = None) -> Any:
    labels = sets.labels
    if np.any(labels < 0) or np.any(labels != np.round(labels)) or labels.max(initial=0) > 30:
        raise ConfigError(
            "'teacher-kind' = lightgbm (LambdaRank) needs integer labels 0..30; this data has "
            f"labels {np.unique(labels)[:8].tolist()}"
        )
    return lightgbm.Dataset(
        sets.features,
        label=labels.astype(np.int32),
        group=sets.sizes,
        reference=reference,
        params={"verbosity": -1, "feature_pre_filter": False},
        free_raw_data=True,
    )


def train_lightgbm(
    train: ExampleSets,
    vali: ExampleSets | None,
    config: LightGBMConfig | None = None,
    progress: bool = False,
) -> LightGBMTeacher:
    """Train LambdaMART on ``train``, early-stopped on NDCG@10 over ``vali`` (best kept)."""
    lgb = require_lightgbm()
    config = config or LightGBMConfig()
    if vali is not None and vali.num_features != train.num_features:
        raise ConfigError(
            f"validation sets have {vali.num_features} features, training sets {train.num_features}"
        )
    started = time.perf_counter()
    dtrain = _group_data(train)
    valid_sets, names, callbacks = [], [], []
    history: dict[str, Any] = {}
    if vali is not None:
        valid_sets, names = [_group_data(vali, reference=dtrain)], ["vali"]
        callbacks.append(lgb.record_evaluation(history))
        if config.early_stopping > 0:
            callbacks.append(
                lgb.early_stopping(config.early_stopping, first_metric_only=True, verbose=False)
            )
    shown = progress and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    bar = tqdm(total=config.trees, desc="lightgbm trees", file=sys.stderr, disable=not shown)
    trained = [0]  # boosting rounds run (LightGBM keeps only the best ones after stopping)

    def count(env: Any) -> None:
        trained[0] = env.iteration + 1
        bar.update(1)

    callbacks.append(count)
    try:
        booster = lgb.train(
            config.params(),
            dtrain,
            num_boost_round=config.trees,
            valid_sets=valid_sets,
            valid_names=names,
            callbacks=callbacks,
        )
    finally:
        bar.close()
    best = int(booster.best_iteration or booster.current_iteration())
    curve = history.get("vali", {}).get("ndcg@10", [])
    info = {
        "best_iteration": best,
        "trees_trained": trained[0],
        "stopped": "early_stopping" if trained[0] < config.trees else "trees",
        # LightGBM's own NDCG@10 (a set without a relevant item counts 1 there)
        "vali_ndcg@10_lightgbm": float(curve[best - 1]) if curve else None,
        "train_seconds": round(time.perf_counter() - started, 3),
    }
    # keep only the best iteration's trees: the saved model scores as the early-stopped one
    text = booster.model_to_string(num_iteration=best)
    log.info(
        "lightgbm teacher: %d of %d trees kept (%s, %.1fs)",
        best,
        info["trees_trained"],
        info["stopped"],
        info["train_seconds"],
    )
    return LightGBMTeacher(lgb.Booster(model_str=text), info)


# ---- files ---------------------------------------------------------------------------------
def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_lightgbm_teacher(
    teacher: LightGBMTeacher, folder: str | os.PathLike[str], extra: Mapping[str, Any]
) -> Path:
    """Write ``model.txt`` and then ``teacher.json`` (with the model's SHA-256) atomically."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    text = teacher.to_text()
    atomic_write_text(target / MODEL_FILE, text)
    meta = {
        "format": FORMAT,
        "kind": KIND,
        "model_file": MODEL_FILE,
        "model_sha256": _sha256_text(text),
        "metrics": teacher.info,
        **dict(extra),
    }
    atomic_write_json(target / INFO_FILE, meta)
    return target


def load_lightgbm_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    return read_format_json(Path(folder) / INFO_FILE, FORMAT, "LightGBM teacher")


def load_lightgbm_teacher(folder: str | os.PathLike[str]) -> LightGBMTeacher:
    """Load a teacher saved by :func:`save_lightgbm_teacher`; the model text is checked
    against its SHA-256 before LightGBM parses it (CheckpointError naming the file)."""
    lgb = require_lightgbm()
    meta = load_lightgbm_info(folder)
    path = Path(folder) / str(meta.get("model_file", MODEL_FILE))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"LightGBM model {path} cannot be read: {err}") from err
    if _sha256_text(text) != meta.get("model_sha256"):
        raise CheckpointError(
            f"LightGBM model {path} does not match the checksum in {INFO_FILE}: "
            "corrupt, truncated or from another save"
        )
    try:
        booster = lgb.Booster(model_str=text)
    except lgb.basic.LightGBMError as err:
        raise CheckpointError(f"LightGBM model {path} cannot be parsed: {err}") from err
    return LightGBMTeacher(booster, meta.get("metrics"))


# ---- cache ---------------------------------------------------------------------------------
_NOT_IN_KEY = frozenset({"num_threads"})  # settings that do not change the trained model


def lightgbm_cache_key(splits: Mapping[str, ExampleSets], config: LightGBMConfig) -> str:
    """Cache key (16 hex chars) from the data, the settings and LightGBM's version."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_KEY}
    payload = json.dumps(
        {
            "format": FORMAT,
            "data": data_fingerprint(splits),
            "config": settings,
            "lightgbm": getattr(lightgbm, "__version__", None),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_or_load_lightgbm(
    dataset: Any,
    config: LightGBMConfig | None,
    cache_dir: str | os.PathLike[str],
    progress: bool = False,
) -> TeacherBundle:
    """The LightGBM teacher and its score table for every set of every split, cached in
    ``cache_dir/lightgbm-<key>``; a damaged cache entry is retrained and replaced."""
    require_lightgbm()
    config = config or LightGBMConfig()
    splits: Mapping[str, ExampleSets] = getattr(dataset, "splits", dataset)
    if "train" not in splits:
        raise ConfigError(f"dataset has no 'train' split (splits: {sorted(splits)})")
    all_sets = concat_splits(splits)
    key = lightgbm_cache_key(splits, config)
    folder = Path(cache_dir) / f"lightgbm-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    if (folder / INFO_FILE).is_file():
        try:
            info = load_lightgbm_info(folder)
            teacher = load_lightgbm_teacher(folder)
            table = ScoreTable.load(table_path(folder))
            if table.version != info.get("score_table_version"):
                raise CheckpointError(f"cached score table in {folder} belongs to another model")
            table.check_covers(all_sets)
        except (CheckpointError, ScoreTableError) as err:
            log.warning("lightgbm teacher cache %s is unusable (%s); retraining", folder, err)
        else:
            log.info("lightgbm teacher: reusing %s (table %s)", folder, table.version)
            return TeacherBundle(teacher, table, True, folder, info)
    teacher = train_lightgbm(splits["train"], splits.get("vali"), config, progress=progress)
    table = score_to_table(
        all_sets, teacher.score, table_path(folder), progress=progress, desc="lightgbm scores"
    )
    extra = {
        "config": config.to_dict(),
        "cache_key": key,
        "data_fingerprint": data_fingerprint(splits),
        "score_table_version": table.version,
        "split_metrics": split_metrics(splits, table),
        "dataset": getattr(dataset, "name", None),
        "lightgbm_version": lightgbm.__version__,
    }
    save_lightgbm_teacher(teacher, folder, extra)
    return TeacherBundle(teacher, table, False, folder, load_lightgbm_info(folder))
