"""Named scenarios: TOML files that fix everything a simulation needs.

A scenario fixes the data, the partitioning, the number of clients, the rounds, the model
sizes, the losses and their weights and the seeds, so every run is reproducible from its
scenario and seed. Built-in scenarios live in ``simulations/scenarios/*.toml``; any other
``.toml`` file may be given by path. The format::

    name = "label-scarce"                 # defaults to the file name
    description = "what this scenario is for"
    clients = 10                          # simulated clients
    seeds = [0, 1, 2]                     # one run per seed (the 'seed' key of each run)

    [config]                              # keys of [tool.flwr.app.config] (FedrankConfig)
    data-path = "synthetic"
    num-server-rounds = 10
    partition-scheme = "dirichlet"
    rank-weight = 1.0

    [client-weights]                      # optional: per-client or adaptive weights
    policy = "per-client"                 # see fedrank.server.client_weights
    ...                                   # the policy's options

    [sweep]                               # optional: what `fedrank sweep` searches
    metric = "ndcg@10"
    [sweep.space]
    rank-weight = [0.0, 0.5, 1.0, 2.0]           # a list: these values
    temperature = { low = 0.5, high = 4.0, log = true, steps = 4 }   # a range

Keys are checked when the scenario loads: an unknown key or a bad value raises
:class:`~fedrank.common.errors.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrank.common.config import FedrankConfig
from fedrank.common.errors import ConfigError
from fedrank.common.synthetic import SyntheticConfig
from fedrank.server.client_weights import check_policy_options, policy_config
from fedrank.simulations.search_space import SearchSpace

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
TOP_KEYS = ("name", "description", "clients", "seeds", "config", "client-weights", "sweep")
SWEEP_KEYS = ("metric", "direction", "space", "seeds")
RANGE_KEYS = ("low", "high", "log", "int", "steps")


@dataclass
class Scenario:
    """A parsed scenario file (see the module docstring)."""

    name: str
    description: str = ""
    clients: int = 10
    seeds: list[int] = field(default_factory=lambda: [0])
    config: dict[str, Any] = field(default_factory=dict)
    client_weights: dict[str, Any] | None = None
    sweep: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # ---- runs -----------------------------------------------------------------------------
    def run_config(
        self, seed: int | None = None, overrides: Mapping[str, Any] | None = None
    ) -> dict:
        """The validated run configuration (hyphenated keys) for one seed.

        ``overrides`` (e.g. one point of a sweep) go on top of ``[config]``; the client-weight
        policy (``[client-weights]``) is included as the ``client-policy`` keys.
        """

        config = dict(self.config)
        if self.client_weights:
            config.update(policy_config(self.client_weights))
        config.update(dict(overrides or {}))
        config["seed"] = int(self.seeds[0] if seed is None else seed)
        config.setdefault("min-available-nodes", self.clients)
        try:
            resolved = FedrankConfig.from_run_config(config).to_dict()
            check_synthetic_spec(resolved["data-path"])
        except ConfigError as err:
            raise ConfigError(f"scenario {self.where}: {err}") from None
        return resolved

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else self.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-able content (what a sweep records next to its runs)."""
        return {
            "name": self.name,
            "description": self.description,
            "clients": self.clients,
            "seeds": list(self.seeds),
            "config": copy.deepcopy(self.config),
            "client-weights": copy.deepcopy(self.client_weights),
            "sweep": copy.deepcopy(self.sweep),
        }

    def digest(self) -> str:
        """A short hash of the scenario's content."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> Scenario:
        """A copy with fields changed (e.g. ``clients=2``, ``seeds=[0]``)."""
        data = {k: copy.deepcopy(getattr(self, k)) for k in self.__dataclass_fields__}
        data.update(changes)
        return Scenario(**data)


def check_synthetic_spec(spec: str) -> None:
    """Check ``synthetic:key=value,...`` knobs without generating the data (cheap), so a bad
    knob fails when the scenario loads rather than inside a run."""
    if not spec.startswith("synthetic"):
        return

    overrides: dict[str, str] = {}
    if ":" in spec:
        for item in filter(None, (s.strip() for s in spec.split(":", 1)[1].split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"'data-path' {spec!r}: expected 'synthetic:key=value,...'")
            overrides[key.strip()] = value.strip()
    if overrides:
        SyntheticConfig.from_overrides(overrides)


def list_scenarios() -> list[str]:
    """Names of the built-in scenarios."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def scenario_path(name_or_path: str | Path) -> Path:
    """The file of a built-in scenario name, or ``name_or_path`` itself if it is a file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"scenario file {path} does not exist")
        return path
    candidate = SCENARIO_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown scenario {str(name_or_path)!r}; built-in: {', '.join(list_scenarios())} "
            "(or give a path to a .toml file)"
        )
    return candidate


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Read and check a scenario (built-in name or path to a ``.toml`` file)."""
    path = scenario_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"scenario {path}: not valid TOML: {err}") from None
    return parse_scenario(data, path=path)


def parse_scenario(data: Mapping[str, Any], path: Path | None = None, name: str = "") -> Scenario:
    """Check a scenario's content (a dict as TOML gives it) and build the :class:`Scenario`."""
    where = str(path) if path is not None else (name or "scenario")

    def fail(what: str) -> ConfigError:
        return ConfigError(f"scenario {where}: {what}")

    unknown = sorted(k for k in data if k not in TOP_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {unknown}; valid: {list(TOP_KEYS)}")
    scenario_name = str(data.get("name") or (path.stem if path is not None else name) or "scenario")
    clients = data.get("clients", 10)
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise fail(f"'clients' must be an integer >= 1, got {clients!r}")
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
    ):
        raise fail(f"'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    config = data.get("config", {})
    if not isinstance(config, dict):
        raise fail("[config] must be a table of configuration keys")
    if "seed" in config:
        raise fail("[config] must not set 'seed': list the seeds in 'seeds'")
    if "out-dir" in config:
        raise fail("[config] must not set 'out-dir': the tools choose each run's folder")
    client_weights = data.get("client-weights")
    if client_weights is not None and not isinstance(client_weights, dict):
        raise fail("[client-weights] must be a table")
    sweep = data.get("sweep", {})
    if not isinstance(sweep, dict):
        raise fail("[sweep] must be a table")
    bad = sorted(k for k in sweep if k not in SWEEP_KEYS)
    if bad:
        raise fail(f"unknown [sweep] key(s) {bad}; valid: {list(SWEEP_KEYS)}")
    if sweep.get("direction", "maximize") not in ("maximize", "minimize"):
        raise fail(f"[sweep] 'direction' must be maximize or minimize, got {sweep['direction']!r}")
    scenario = Scenario(
        name=scenario_name,
        description=str(data.get("description", "")),
        clients=int(clients),
        seeds=[int(s) for s in seeds],
        config=dict(config),
        client_weights=dict(client_weights) if client_weights else None,
        sweep=dict(sweep),
        path=path,
    )
    # validate now: the policy options, the configuration and the sweep space
    if scenario.client_weights:
        try:
            check_policy_options(scenario.client_weights)
        except ConfigError as err:
            raise fail(f"[client-weights]: {err}") from None
    scenario.run_config()
    if "space" in sweep:
        try:
            SearchSpace.parse(sweep["space"])
        except ConfigError as err:
            raise fail(f"[sweep.space]: {err}") from None
    return scenario
