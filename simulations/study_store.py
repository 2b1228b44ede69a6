"""A sweep's Optuna study: where it is stored, what it searches, and its trials as a table.

A sweep is one Optuna study in a storage that every worker (on this machine or another) opens
by URL and name:

- ``sqlite:///PATH`` (the default: ``SWEEP/study.db``) or any SQLAlchemy URL
  (``postgresql://...``, ``mysql+pymysql://...``): Optuna's RDB storage with heartbeats, so a
  trial whose worker was killed is marked failed after :data:`GRACE_SECONDS` without a
  heartbeat and queued again with the same parameters (at most :data:`MAX_RETRY` times);
- ``journal:PATH``: Optuna's journal file (``JournalFileBackend``; one file on a shared file
  system, no database). Journal storage has no heartbeats: a worker that is interrupted puts
  its trial back itself, but the trial of a worker killed outright stays ``RUNNING``.

The study's user attribute ``fedrank_sweep`` holds the :class:`SweepSpec` (scenario, sampler,
seeds, overrides, metric), so a worker needs only the storage URL and the study name, and a
second ``fedrank sweep`` with a different spec on the same study is refused with the key that
differs. Grid, random and TPE search are Optuna's samplers over the scenario's search space
(:mod:`fedrank.simulations.search_space`). A trial is one point of the space; its seeds are
repeats: the trial's value is the mean of the metric over the seeds, its user attributes hold
each seed's value, the spread (``std``), the run folders and, for a failed trial, the error.
"""

from __future__ import annotations

import json
import math
import os
import socket
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from fedrank.common.errors import ConfigError, FedrankError
from fedrank.simulations.scenarios import Scenario, parse_scenario
from fedrank.simulations.search_space import SearchSpace

__all__ = [
    "GRACE_SECONDS",
    "HEARTBEAT_SECONDS",
    "MODES",
    "SweepSpec",
    "default_storage",
    "describe_trial",
    "open_storage",
    "open_study",
    "trial_rows",
    "worker_name",
]

# heartbeats and the retry callback are marked experimental in Optuna; they are what makes a
# killed worker's trial come back, and the notice would repeat in every worker's log
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

MODES = ("grid", "random", "tpe")
SPEC_ATTR = "fedrank_sweep"
HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20
MAX_RETRY = 2  # a trial whose worker died is queued again at most this often
SQLITE_TIMEOUT = 120.0  # seconds a worker waits for another's write to the SQLite file


@dataclass(frozen=True)
class SweepSpec:
    """Everything a worker needs to run a sweep's trials (stored in the study)."""

    scenario: dict[str, Any]  # Scenario.to_dict()
    mode: str  # grid | random | tpe
    trials: int  # the study's budget of finished trials (grid: the grid's size)
    seeds: list[int]
    overrides: dict[str, Any] = field(default_factory=dict)
    sweep_seed: int = 0
    metric: str = "ndcg@10"
    direction: str = "maximize"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown sweep mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.trials < 1:
            raise ConfigError(f"a sweep needs at least one trial, got {self.trials}")

    @property
    def name(self) -> str:
        return str(self.scenario["name"])

    def load_scenario(self) -> Scenario:
        return parse_scenario(self.scenario, name=self.name)

    def space(self) -> SearchSpace:
        sweep = self.scenario.get("sweep") or {}
        return SearchSpace.parse(sweep["space"]) if "space" in sweep else SearchSpace.default()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SweepSpec:
        return cls(**json.loads(text))

    def sampler(self, worker: str) -> optuna.samplers.BaseSampler:
        """The sampler of ``mode``. The grid's order is shuffled by ``sweep_seed`` alone: every
        worker must see the same order, or grid cells (trial numbers) name different points.
        Random and TPE are seeded by ``sweep_seed`` and the worker's name: workers with one
        seed would draw the same points."""
        if self.mode == "grid":
            grid = {p.name: p.grid() for p in self.space().params}
            return optuna.samplers.GridSampler(grid, seed=self.sweep_seed)
        entropy = [self.sweep_seed, zlib.crc32(worker.encode())]
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        if self.mode == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The trial's point of the search space."""
        space = self.space()
        if self.mode == "grid":  # the grid's own points, as categories (GridSampler's values)
            return {p.name: trial.suggest_categorical(p.name, p.grid()) for p in space.params}
        return {p.name: p.suggest(trial) for p in space.params}


def default_storage(out_dir: Path) -> str:
    """``sqlite:///OUT/study.db`` (absolute, so workers started elsewhere find it)."""
    return f"sqlite:///{(out_dir / 'study.db').resolve()}"


def open_storage(url: str) -> BaseStorage:
    """The storage behind ``url`` (see the module docstring)."""
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:")).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"--storage {url}: folder {path.parent} does not exist")
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise ConfigError(
            f"--storage {url!r}: expected a SQLAlchemy URL (sqlite:///PATH, postgresql://...) "
            "or journal:PATH"
        )
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT}}
    try:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's errors: one line naming the URL
        raise FedrankError(f"--storage {url}: cannot open: {str(err).splitlines()[0]}") from None


def open_study(
    storage: BaseStorage, name: str, spec: SweepSpec | None, worker: str
) -> tuple[optuna.Study, SweepSpec]:
    """Create the study ``name`` with ``spec``, or load it; with a ``spec``, an existing
    study must have been made for the same spec."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if spec is None:
        try:
            summary = optuna.study.load_study(study_name=name, storage=storage)
        except KeyError:
            raise ConfigError(f"study {name!r} does not exist in the storage") from None
        stored = summary.user_attrs.get(SPEC_ATTR)
        if not stored:
            raise ConfigError(f"study {name!r} was not made by fedrank sweep")
        spec = SweepSpec.from_json(stored)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=spec.sampler(worker),
        direction=spec.direction,
        load_if_exists=True,
    )
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        study.set_user_attr(SPEC_ATTR, spec.to_json())
    elif stored != spec.to_json():
        theirs = json.loads(stored)
        ours = json.loads(spec.to_json())
        keys = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ConfigError(
            f"study {name!r} in this storage is a different sweep (differs in {', '.join(keys)}); "
            "give the same scenario and options, or another --study name"
        )
    return study, spec


def worker_name(pid: int | None = None) -> str:
    """``HOST:PID``: who ran a trial (a trial's ``worker`` attribute); ``pid``: a worker
    process started here (default: this process)."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


# ---- the study as a table ----------------------------------------------------------------------
def finished(study: optuna.Study) -> list[FrozenTrial]:
    done = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=done)


def describe_trial(trial: FrozenTrial, metric: str) -> str:
    """One progress line's tail: the value with its spread, or the error."""
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        std = attrs.get("std", 0.0)
        return f"{metric} {trial.value:.4f} ± {std:.4f} over {len(attrs.get('values', {}))} seed(s)"
    if trial.state == TrialState.PRUNED:
        return f"skipped: {attrs.get('skipped', 'pruned')}"
    if attrs.get("released"):
        return f"put back ({attrs.get('error', 'interrupted')}): runs again"
    reason = attrs.get("error") or trial.system_attrs.get("fail_reason", "no reason")
    return f"FAILED: {reason}"


def trial_rows(study: optuna.Study, spec: SweepSpec) -> tuple[list[str], list[list[Any]]]:
    """One row per trial (any state): number, state, parameters, mean and spread of the
    metric over the seeds, each seed's value, worker, seconds, error."""
    names = spec.space().names
    header = ["trial", "state", *names, f"{spec.metric} mean", f"{spec.metric} std", "seeds"]
    header += ["worker", "seconds", "error"]
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        values = attrs.get("values", {})
        seconds = (
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start
            else math.nan
        )
        rows.append(
            [
                trial.number,
                trial.state.name.lower(),
                *[trial.params.get(n, "") for n in names],
                trial.value if trial.value is not None else math.nan,
                attrs.get("std", math.nan),
                " ".join(f"{s}:{v:.4f}" for s, v in sorted(values.items())),
                attrs.get("worker", ""),
                round(seconds, 1),
                attrs.get("error") or attrs.get("skipped") or "",
            ]
        )
    return header, rows


def seed_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def as_jsonable(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(mapping), default=str))
