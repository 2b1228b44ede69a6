"""The server-side teacher: training, checkpoints, the teacher score table and its cache.

The teacher is a set-aware :class:`fedrank.common.models.TeacherModel` that sees every feature
(including privileged ones a device cannot compute) and every other item of a set. It is
trained on the full training data with a listwise softmax loss plus a pointwise sigmoid loss,
early-stopped on validation NDCG@10, and then scores every set of every split once: that
:class:`~fedrank.common.score_table.ScoreTable` is what students distil from.

The teacher takes raw features: with ``standardize`` (the default) a
:class:`~fedrank.common.feature_transform.FeatureTransform` fitted on the training and validation
features (signed log1p of heavy-tailed columns, then standardisation; never the test split) is
the model's first step, saved with it (``transform.*`` state-dict keys). The server fits the
same transform, with the same function on the same data, for the students.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedrank.common.atomic_io import (
    atomic_path,
    atomic_write_json,
    read_format_json,
    sha256_file,
)
from fedrank.common.config import FedrankConfig
from fedrank.common.errors import CheckpointError, ConfigError, ScoreTableError
from fedrank.common.evaluation import mean_ndcg
from fedrank.common.example_sets import ExampleSets
from fedrank.common.feature_transform import TRANSFORM_VERSION, fit_transform
from fedrank.common.losses import CompositeLoss, LossTerm
from fedrank.common.models import TeacherModel, build_model, score_sets
from fedrank.common.records import load_arrays
from fedrank.common.score_table import ScoreTable
from fedrank.server.teacher_scoring import score_to_table

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "TeacherConfig",
    "TeacherResult",
    "TeacherBundle",
    "train_teacher",
    "evaluate",
    "save_teacher",
    "load_teacher",
    "load_teacher_info",
    "build_score_table",
    "concat_splits",
    "data_fingerprint",
    "teacher_cache_key",
    "train_or_load_teacher",
]

log = logging.getLogger("fedrank.teacher")

CHECKPOINT_FORMAT = "fedrank-teacher-v1"
WEIGHTS_FILE = "teacher.pt"
SPEC_FILE = "teacher.json"
SCORES_DIR = "scores"  # the score table folder (fedrank.common.score_table)


@dataclass
class TeacherConfig:
    """Teacher model size, optimiser and loss settings.

    The defaults train a strong teacher on the default synthetic data in under a minute and on
    MQ2008 Fold1 in about 20 seconds on one CPU thread (early stopping usually ends sooner).
    """

    d_model: int = 32
    num_heads: int = 4
    num_layers: int = 2
    dropout: float = 0.1
    lr: float = 2e-3
    weight_decay: float = 1e-4
    epochs: int = 12
    batch_size: int = 32
    patience: int = 4
    seed: int = 0
    # composite loss: listwise softmax over the labels + pointwise sigmoid cross-entropy
    label_softmax_weight: float = 1.0
    label_sigmoid_ce_weight: float = 0.2
    label_sigmoid_ce_options: dict[str, Any] = field(default_factory=dict)
    grad_clip: float = 1.0
    max_seconds: float | None = None
    standardize: bool = True
    # torch threads while training (None: leave torch's setting); results do not depend on it
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        ints = {"d_model": 1, "num_heads": 1, "num_layers": 0, "epochs": 1, "batch_size": 1}
        ints |= {"patience": 1, "seed": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(
                    f"teacher option {name!r} must be an integer >= {low}, got {value!r}"
                )
        for name in ("lr", "weight_decay", "label_softmax_weight", "label_sigmoid_ce_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"teacher option {name!r} must be a finite number >= 0, got {value!r}"
                )
        if self.lr <= 0:
            raise ConfigError(f"teacher option 'lr' must be > 0, got {self.lr}")
        if self.label_softmax_weight + self.label_sigmoid_ce_weight <= 0:
            raise ConfigError("teacher loss weights are all zero: nothing to train on")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"teacher option 'dropout' must lie in [0, 1), got {self.dropout}")
        if self.d_model % self.num_heads:
            raise ConfigError(
                f"teacher option 'd_model' ({self.d_model}) must be divisible by "
                f"'num_heads' ({self.num_heads})"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"teacher option 'max_seconds' must be > 0, got {self.max_seconds}")
        if self.num_threads is not None and (
            isinstance(self.num_threads, bool)
            or not isinstance(self.num_threads, int)
            or self.num_threads < 1
        ):
            raise ConfigError(
                f"teacher option 'num_threads' must be >= 1, got {self.num_threads!r}"
            )
        if not isinstance(self.label_sigmoid_ce_options, Mapping):
            raise ConfigError("teacher option 'label_sigmoid_ce_options' must be a mapping")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TeacherConfig:
        """Build from a mapping (hyphens or underscores); unknown keys raise ConfigError."""
        names = {f.name for f in fields(cls)}
        options = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(f"unknown teacher options {unknown}; valid: {sorted(names)}")
        return cls(**options)

    @classmethod
    def from_config(cls, cfg: FedrankConfig) -> TeacherConfig:
        """The built-in teacher of a run: the ``teacher-*`` keys of ``cfg`` (validated there)."""
        return cls(
            d_model=cfg.teacher_d_model,
            num_heads=cfg.teacher_heads,
            num_layers=cfg.teacher_layers,
            lr=cfg.teacher_lr,
            epochs=cfg.teacher_epochs,
            seed=cfg.seed,
        )

    def composite_loss(self) -> Any:
        """The training loss: listwise softmax (rank_label family) + sigmoid CE (label family)."""

        terms = []
        if self.label_softmax_weight > 0:
            terms.append(
                LossTerm("rank_label", "label_softmax", float(self.label_softmax_weight), {})
            )
        if self.label_sigmoid_ce_weight > 0:
            terms.append(
                LossTerm(
                    "label",
                    "label_sigmoid_ce",
                    float(self.label_sigmoid_ce_weight),
                    dict(self.label_sigmoid_ce_options),
                )
            )
        return CompositeLoss(terms)


@dataclass
class TeacherResult:
    """What :func:`train_teacher` returns; ``model`` holds the best validation weights."""

    model: torch.nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    vali_ndcg10: float
    seconds: float = 0.0
    stopped: str = "epochs"  # "epochs", "early_stopping" or "max_seconds"

    def metrics(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "vali_ndcg@10": self.vali_ndcg10,
            "train_seconds": round(self.seconds, 3),
            "stopped": self.stopped,
            "epochs_run": len(self.history),
        }


# ---- training ------------------------------------------------------------------------------
def evaluate(
    model: torch.nn.Module, sets: ExampleSets, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Mean NDCG@k over ``sets`` (sets without a relevant item count 0)."""
    return mean_ndcg(sets, score_sets(model, sets), ks)


@contextlib.contextmanager
def _seeded(seed: int, num_threads: int | None = None) -> Iterator[None]:
    """Seed torch (and set its thread count) inside; restore the caller's state afterwards.

    One thread is the default: small set-wise batches gain little from intra-op threads, and
    on a shared or busy machine extra threads make training many times slower.
    """
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:

    disable = not enabled or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, leave=False)


def train_teacher(
    train: ExampleSets,
    vali: ExampleSets | None,
    config: TeacherConfig | None = None,
    progress: bool = True,
) -> TeacherResult:
    """Train a teacher on ``train``, early-stopped on NDCG@10 over ``vali`` (best kept).

    With ``vali=None`` the training sets serve for model selection. Deterministic for a given
    ``config.seed`` (the caller's torch RNG state is left untouched).
    """

    config = config or TeacherConfig()
    if vali is not None and vali.num_features != train.num_features:
        raise ConfigError(
            f"validation sets have {vali.num_features} features, training sets {train.num_features}"
        )
    started = time.perf_counter()
    loss_fn = config.composite_loss()
    transform = fit_transform(train, vali) if config.standardize else None
    vali_n = vali if vali is not None else train

    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, best_value, stale = 0, -math.inf, 0
    stopped = "epochs"
    with _seeded(config.seed, config.num_threads):
        model = TeacherModel(
            train.num_features,
            d_model=config.d_model,
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            dropout=config.dropout,
            transform=transform,
        )
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        num_batches = math.ceil(train.num_sets / config.batch_size)
        total_steps = config.epochs * num_batches
        if 0.1 * total_steps > 1:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=config.lr,
                total_steps=total_steps,
                pct_start=0.1,
                anneal_strategy="cos",
            )
        else:  # ten steps or fewer: too short for a warm-up phase (OneCycleLR divides by 0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        step = 0
        for epoch in range(1, config.epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            loss_sum, parts_sum, seen = 0.0, {}, 0
            bar = _progress_bar(num_batches, progress, f"teacher epoch {epoch}/{config.epochs}")
            try:
                for batch in train.batches(
                    config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch
                ):
                    scores = model(batch.features, batch.mask)
                    loss, parts = loss_fn(scores, batch.labels, None, batch.mask, step=step)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    n = batch.batch_size
                    loss_sum += float(loss.detach()) * n
                    for key, value in parts.items():
                        parts_sum[key] = parts_sum.get(key, 0.0) + float(value) * n
                    seen += n
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
            finally:
                bar.close()
            value = evaluate(model, vali_n, ks=(10,))["ndcg@10"]
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / max(seen, 1),
                **{f"train_{k}": v / max(seen, 1) for k, v in parts_sum.items() if k != "total"},
                "vali_ndcg@10": value,
                "seconds": time.perf_counter() - epoch_start,
            }
            history.append(row)
            improved = value > best_value
            if improved:
                best_value, best_epoch, stale = value, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            log.info(
                "teacher epoch %d/%d: train loss %.4f, vali NDCG@10 %.4f%s (%.1fs)",
                epoch,
                config.epochs,
                row["train_loss"],
                value,
                " *" if improved else "",
                row["seconds"],
            )
            if stale >= config.patience:
                stopped = "early_stopping"
                break
            elapsed = time.perf_counter() - started
            if config.max_seconds is not None and elapsed >= config.max_seconds:
                stopped = "max_seconds"
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    seconds = time.perf_counter() - started
    log.info(
        "teacher: best vali NDCG@10 %.4f at epoch %d of %d (%s, %.1fs)",
        best_value,
        best_epoch,
        len(history),
        stopped,
        seconds,
    )
    return TeacherResult(model, history, best_epoch, float(best_value), seconds, stopped)


# ---- checkpoints ---------------------------------------------------------------------------
def save_teacher(
    result_or_model: TeacherResult | torch.nn.Module,
    directory: str | os.PathLike[str],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``teacher.pt`` (state dict) and ``teacher.json`` (spec, metrics) atomically.

    ``teacher.json`` is written last and records the weights' SHA-256, so a reader never pairs
    a spec with weights from another save.
    """
    if isinstance(result_or_model, TeacherResult):
        model, info = (
            result_or_model.model,
            {
                **result_or_model.metrics(),
                "history": result_or_model.history,
            },
        )
    else:
        model, info = result_or_model, {}
    if not hasattr(model, "spec"):
        raise ConfigError(f"cannot save a {type(model).__name__}: it has no .spec")
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    weights = target / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        torch.save(state, tmp)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "spec": model.spec,
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(weights),
        "metrics": info,
        **dict(extra or {}),
    }
    atomic_write_json(target / SPEC_FILE, meta)
    return target


def load_teacher_info(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``teacher.json`` of a checkpoint (CheckpointError if missing or corrupt)."""
    path = Path(directory) / SPEC_FILE
    meta = read_format_json(path, CHECKPOINT_FORMAT, "teacher checkpoint")
    if not isinstance(meta.get("spec"), dict):
        raise CheckpointError(f"teacher checkpoint {path} has no model spec")
    return meta


def load_teacher(directory: str | os.PathLike[str]) -> torch.nn.Module:
    """Load a teacher saved by :func:`save_teacher` (eval mode).

    Corrupt, truncated or mismatched files raise :class:`CheckpointError` naming the file.
    """

    meta = load_teacher_info(directory)
    weights = Path(directory) / str(meta.get("weights_file", WEIGHTS_FILE))
    if not weights.is_file():
        raise CheckpointError(f"teacher weights {weights} do not exist")
    expected = meta.get("weights_sha256")
    if expected is not None and sha256_file(weights) != expected:
        raise CheckpointError(
            f"teacher weights {weights} do not match the checksum in {SPEC_FILE}: "
            "corrupt, truncated or from another save"
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"teacher weights {weights} are corrupt or truncated ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"teacher weights {weights} do not hold a state dict of tensors")
    try:
        model = build_model(meta["spec"])
    except ConfigError as err:
        raise CheckpointError(f"teacher checkpoint {directory} has a bad spec: {err}") from err
    try:
        load_arrays(model, state)
    except CheckpointError as err:
        raise CheckpointError(f"teacher weights {weights}: {err}") from err
    model.eval()
    return model


# ---- score table ---------------------------------------------------------------------------
def build_score_table(
    model: torch.nn.Module,
    sets: ExampleSets,
    version: str | None = None,
    path: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> ScoreTable:
    """Teacher logits for every item of ``sets`` (version: content hash unless given), scored
    in chunks of sets; with ``path`` they stream into that table folder."""

    return score_to_table(
        sets,
        lambda part: score_sets(model, part),
        path,
        version=version,
        progress=progress,
        desc="teacher scores",
    )


def concat_splits(splits: Mapping[str, ExampleSets]) -> ExampleSets:
    """All sets of all splits in one container (split names sorted); ids must be unique."""
    names = sorted(splits)
    seen: dict[str, str] = {}
    for name in names:
        for set_id in splits[name].set_ids.tolist():
            if set_id in seen:
                raise ScoreTableError(
                    f"set {set_id!r} appears in both the {seen[set_id]!r} and {name!r} splits; "
                    "the teacher score table needs unique set ids"
                )
            seen[set_id] = name
    return ExampleSets.concat([splits[name] for name in names])


# ---- cache ---------------------------------------------------------------------------------
def data_fingerprint(splits: Mapping[str, ExampleSets]) -> str:
    """SHA-256 over every split's set ids, offsets, features and labels."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        sets = splits[name]
        digest.update(f"{name}:{sets.num_sets}:{sets.num_items}:{sets.num_features}\n".encode())
        digest.update("\n".join(sets.set_ids.tolist()).encode("utf-8"))
        digest.update(sets.offsets.astype("<i8").tobytes())
        digest.update(sets.features.astype("<f4").tobytes())
        digest.update(sets.labels.astype("<f4").tobytes())
    return digest.hexdigest()


_NOT_IN_KEY = frozenset({"num_threads"})  # settings that do not change the trained teacher


def teacher_cache_key(splits: Mapping[str, ExampleSets], config: TeacherConfig) -> str:
    """Cache key (16 hex chars) from the data fingerprint and the teacher configuration."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_KEY}
    payload = {"format": CHECKPOINT_FORMAT, "data": data_fingerprint(splits), "config": settings}
    if config.standardize:  # a teacher fitted with an older transform is not reused
        payload["transform"] = TRANSFORM_VERSION
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class TeacherBundle(tuple):
    """``(model, table)``; also ``.model``, ``.table``, ``.cached`` (loaded, not trained),
    ``.path`` (cache folder) and ``.info`` (the checkpoint's ``teacher.json``)."""

    model: torch.nn.Module
    table: ScoreTable
    cached: bool
    path: Path
    info: dict[str, Any]

    def __new__(
        cls,
        model: torch.nn.Module,
        table: ScoreTable,
        cached: bool,
        path: Path,
        info: dict[str, Any],
    ) -> TeacherBundle:
        self = super().__new__(cls, (model, table))
        self.model, self.table, self.cached, self.path, self.info = model, table, cached, path, info
        return self


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so parallel runs train one teacher, not several."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover - no advisory locks on this platform
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _load_cached(folder: Path, sets: ExampleSets) -> tuple[torch.nn.Module, ScoreTable, dict]:
    info = load_teacher_info(folder)
    model = load_teacher(folder)
    table = ScoreTable.load(folder / SCORES_DIR)
    if table.version != info.get("score_table_version"):
        raise CheckpointError(f"cached score table in {folder} belongs to another teacher")
    table.check_covers(sets)  # the table covers these sets (no score is read)
    return model, table, info


def train_or_load_teacher(
    dataset: Any,
    config: TeacherConfig | None,
    cache_dir: str | os.PathLike[str],
    progress: bool = False,
) -> TeacherBundle:
    """The teacher and its score table for every set of every split, cached on disk.

    ``dataset`` has ``.splits`` (``{"train", "vali", "test"}`` -> ExampleSets) or is that
    mapping. The cache folder is ``cache_dir/teacher-<key>`` with the key from the data and the
    configuration, so repeated simulations on the same data reuse one teacher; a damaged cache
    entry is retrained and replaced. Returns a :class:`TeacherBundle` that unpacks as
    ``model, table``.
    """
    config = config or TeacherConfig()
    splits: Mapping[str, ExampleSets] = getattr(dataset, "splits", dataset)
    if "train" not in splits:
        raise ConfigError(f"dataset has no 'train' split (splits: {sorted(splits)})")
    all_sets = concat_splits(splits)
    key = teacher_cache_key(splits, config)
    folder = Path(cache_dir) / f"teacher-{key}"
    with _locked(Path(cache_dir) / f".teacher-{key}.lock"):
        if (folder / SPEC_FILE).is_file():
            try:
                model, table, info = _load_cached(folder, all_sets)
            except (CheckpointError, ScoreTableError) as err:
                log.warning("teacher cache %s is unusable (%s); retraining", folder, err)
            else:
                log.info("teacher: reusing cached teacher %s (table %s)", folder, table.version)
                return TeacherBundle(model, table, True, folder, info)
        result = train_teacher(splits["train"], splits.get("vali"), config, progress=progress)
        table = build_score_table(
            result.model, all_sets, path=folder / SCORES_DIR, progress=progress
        )
        metrics = {}
        for name in sorted(splits):
            metrics[name] = evaluate(result.model, splits[name])
        extra = {
            "config": config.to_dict(),
            "cache_key": key,
            "data_fingerprint": data_fingerprint(splits),
            "score_table_version": table.version,
            "split_metrics": metrics,
            "dataset": getattr(dataset, "name", None),
        }
        save_teacher(result, folder, extra=extra)
        info = load_teacher_info(folder)
    return TeacherBundle(result.model, table, False, folder, info)
