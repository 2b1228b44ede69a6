"""Scenario files, search spaces, per-client and adaptive weight policies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import optuna
import pytest

from fedrank.common.config import FedrankConfig
from fedrank.common.errors import ConfigError, FedrankError
from fedrank.common.features import restrict_features
from fedrank.server.client_policy import UniformPolicy
from fedrank.server.client_weights import (
    POLICIES,
    AdaptiveWeights,
    PerClientWeights,
    check_policy_options,
    make_policy,
    policy_config,
    register_policy,
)
from fedrank.simulations.scenarios import list_scenarios, load_scenario, parse_scenario
from fedrank.simulations.search_space import SearchSpace
from fedrank.simulations.sweep import make_spec
from fedrank.simulations.sweep_app import TrialRunner, run_hash


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- scenarios ------------------------------------------------------------------------------
def test_every_builtin_scenario_loads_and_validates() -> None:
    names = list_scenarios()
    for required in ("iid", "non-iid", "label-scarce", "privileged", "skewed-sizes", "tiny"):
        assert required in names
    for name in names:
        scenario = load_scenario(name)
        assert scenario.name == name and scenario.clients >= 1 and scenario.seeds
        config = scenario.run_config()
        assert set(config) == set(FedrankConfig.keys())  # fully resolved, every key
        assert config["seed"] == scenario.seeds[0]


def test_scenarios_fix_what_the_issue_lists() -> None:
    scarce = load_scenario("label-scarce").run_config()
    assert scarce["label-fraction"] == 0.1 and scarce["partition-scheme"] == "dirichlet"
    assert load_scenario("privileged").run_config()["student-features"] == "device"
    assert load_scenario("skewed-sizes").run_config()["partition-scheme"] == "sizes"
    mixed = load_scenario("label-scarce-mixed")
    assert mixed.client_weights and mixed.client_weights["policy"] == "per-client"
    assert load_scenario("adaptive").client_weights["policy"] == "adaptive"


def test_a_run_is_reproducible_from_scenario_and_seed(tmp_path: Path) -> None:
    a = load_scenario("non-iid")
    b = load_scenario(a.path)  # the same file by path
    assert a.run_config(1) == b.run_config(1)
    assert run_hash(a.run_config(1)) == run_hash(b.run_config(1))
    assert run_hash(a.run_config(1)) != run_hash(a.run_config(2))
    spec = make_spec(a, "grid", seeds=[0, 1])
    runs = TrialRunner(spec, a, tmp_path, "test").configs({"rank-weight": 2.0})
    assert [r["seed"] for r in runs] == [0, 1]
    assert all(
        float(r["rank-weight"]) == 2.0 and Path(r["out-dir"]).parent == tmp_path / "runs"
        for r in runs
    )
    # output folders do not change the hash: the same run found from another sweep folder
    again = TrialRunner(spec, a, tmp_path / "elsewhere", "test").configs({"rank-weight": 2.0})
    assert [Path(r["out-dir"]).name for r in runs] == [Path(r["out-dir"]).name for r in again]


def test_scenario_mistakes_name_the_file_and_key(tmp_path: Path) -> None:
    bad = write(tmp_path, "clients = 2\n[config]\nnum-server-round = 3\n")
    with pytest.raises(ConfigError, match=r"s\.toml.*'num-server-round'"):
        load_scenario(bad)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rounds'\]"):
        load_scenario(write(tmp_path, "rounds = 3\n"))
    with pytest.raises(ConfigError, match="'seeds'"):
        load_scenario(write(tmp_path, "seeds = [-1]\n"))
    with pytest.raises(ConfigError, match="must not set 'seed'"):
        load_scenario(write(tmp_path, "[config]\nseed = 3\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(write(tmp_path, "clients = \n"))
    with pytest.raises(ConfigError, match="unknown scenario 'nope'"):
        load_scenario("nope")
    with pytest.raises(ConfigError, match="min_items"):
        parse_scenario({"config": {"data-path": "synthetic:min_items=4"}}, name="x")
    with pytest.raises(ConfigError, match=r"\[sweep.space\].*'rank_weight'"):
        parse_scenario({"sweep": {"space": {"rank_weight": [1.0]}}}, name="x")
    with pytest.raises(ConfigError, match=r"\[client-weights\].*'label-wieght'"):
        parse_scenario(
            {"client-weights": {"policy": "per-client", "default": {"label-wieght": 1}}}, name="x"
        )


# ---- search spaces --------------------------------------------------------------------------
def test_search_space_grid_ranges_and_sampling() -> None:
    space = SearchSpace.parse(
        {
            "rank-weight": [0.0, 1.0, 4.0],
            "temperature": {"low": 0.5, "high": 2.0, "log": True, "steps": 3},
            "rank-loss": ["rank_l2", "rank_softmax_ce"],
        }
    )
    grid = space.grid()
    assert len(grid) == 3 * 3 * 2
    assert sorted({p["temperature"] for p in grid}) == [0.5, 1.0, 2.0]

    # ranges and lists through an Optuna sampler: values in range, from the list, seeded
    def draw(seed: int) -> list[dict]:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        return [{p.name: p.suggest(study.ask()) for p in space.params} for _ in range(5)]

    sample = draw(3)
    assert sample == draw(3) and sample != draw(4)
    assert all(0.5 <= p["temperature"] <= 2.0 for p in sample)
    assert all(p["rank-loss"] in ("rank_l2", "rank_softmax_ce") for p in sample)
    lists = SearchSpace.parse({"rank-weight": [0.0, 1.0, 4.0], "temperature": [1.0, 2.0]})
    assert len(lists.grid()) == 6
    with pytest.raises(ConfigError, match="'steps'"):
        SearchSpace.parse({"temperature": {"low": 0.5, "high": 2.0}}).grid()
    with pytest.raises(ConfigError, match="'rank-loss' value 'rank_l3'"):
        SearchSpace.parse({"rank-loss": ["rank_l3"]})
    default = SearchSpace.default()
    families = {"label-weight", "score-weight", "rank-label-weight", "rank-weight"}
    assert families <= set(default.names) and "temperature" in default.names


def test_invalid_points_are_skipped_not_run(tmp_path: Path) -> None:
    scenario = load_scenario("tiny")
    points = [{"label-weight": 0.0, "rank-label-weight": 0.0, "rank-weight": 0.0}, {}]
    runner = TrialRunner(make_spec(scenario, "grid"), scenario, tmp_path, "test")
    assert len(runner.configs(points[1])) == 1
    with pytest.raises(ConfigError, match="are 0"):
        runner.configs(points[0])


# ---- per-client weights -----------------------------------------------------------------------
MIXED = {
    "policy": "per-client",
    "default": {"rank-weight": 1.0},
    "groups": [{"clients": [0, 1, 2], "label-fraction": 0.1}],
    "clients": {"2": {"temperature": 2.0}},
    "by-label-fraction": [
        {"below": 0.2, "label-weight": 0.05, "rank-weight": 3.0},
        {"below": 0.9, "rank-weight": 9.0},
    ],
}


def test_per_client_settings_follow_groups_clients_and_scarcity() -> None:
    policy = PerClientWeights({k: v for k, v in MIXED.items() if k != "policy"})
    scarce = {"rank-weight": 3.0, "label-fraction": 0.1, "label-weight": 0.05}
    assert policy.settings_for(0) == scarce
    assert policy.settings_for(2) == {**scarce, "temperature": 2.0}
    assert policy.settings_for(7) == {"rank-weight": 1.0}  # labelled: no rule applies
    assert policy.configure(1, 123, {"client-key": 1}) == scarce
    assert policy.state()["assigned"] == {"1": scarce}
    with pytest.raises(FedrankError, match="client-key"):
        policy.configure(1, 5, {"client-key": None})


def test_policy_options_are_checked() -> None:
    check_policy_options(MIXED)
    for bad, match in [
        ({"policy": "bandit"}, "unknown"),
        ({"policy": "per-client", "groups": [{"clients": [], "rank-weight": 1}]}, "non-empty"),
        ({"policy": "per-client", "default": {"data-path": "x"}}, "not per-client settings"),
        ({"policy": "per-client", "default": {"rank-weight": -1}}, "rank-weight"),
        ({"policy": "per-client", "by-label-fraction": [{"rank-weight": 1}]}, "'below'"),
        ({"policy": "adaptive", "candidates": [{"rank-weight": 1}]}, "at least two"),
        ({"policy": "adaptive", "candidates": [{}, {}], "gamma": 2}, "'gamma'"),
        ({"policy": "adaptive", "candidates": [{}, {}], "eta": 0}, "'eta'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            check_policy_options(bad)


def test_policy_config_selects_the_policy_on_the_server() -> None:
    keys = policy_config(MIXED)
    config = FedrankConfig.from_run_config(keys)
    policy = make_policy(config)  # what the ServerApp does with the run configuration
    assert isinstance(policy, PerClientWeights)
    assert policy.settings_for(0)["rank-weight"] == 3.0
    assert keys["client-policy"] in POLICIES
    assert policy_config({"policy": "uniform"}) == {"client-policy": "uniform"}


# ---- adaptive weights (Exp3) --------------------------------------------------------------------
ADAPTIVE = {"candidates": [{"rank-weight": 0.0}, {"rank-weight": 1.0}, {"rank-weight": 4.0}]}


def play(policy: AdaptiveWeights, rounds: int, gains: list[float], clients: int = 3) -> list:
    """Each client's reward is a noisy validation gain that depends on the chosen candidate."""
    rng = np.random.default_rng(0)
    chosen = []
    for rnd in range(1, rounds + 1):
        for key in range(clients):
            settings = policy.configure(rnd, 1000 + key, {"client-key": key})
            arm = policy.candidates.index(settings)
            chosen.append(arm)
            start = 0.5
            gain = gains[arm] + rng.normal(0, 0.01)
            policy.observe(
                rnd,
                1000 + key,
                {"client_key": key, "val_ndcg@10_start": start, "val_ndcg@10": start + gain},
            )
    return chosen


def test_exp3_learns_each_clients_best_candidate_and_is_seeded() -> None:
    base = FedrankConfig.from_run_config({"num-server-rounds": 60})  # sets Exp3's exploration
    policy = AdaptiveWeights(ADAPTIVE, seed=0, base=base)
    first = play(policy, 60, gains=[-0.02, 0.0, 0.03])
    assert policy.preferred() == {1000: 2, 1001: 2, 1002: 2}  # by the server's node id
    assert np.mean(np.asarray(first[-60:]) == 2) > 0.6  # mostly the best candidate late on
    again = AdaptiveWeights(ADAPTIVE, seed=0, base=base)
    assert play(again, 60, gains=[-0.02, 0.0, 0.03]) == first  # reproducible
    restored = AdaptiveWeights(ADAPTIVE, seed=0)
    restored.load_state(json.loads(json.dumps(policy.state())))
    assert restored.preferred() == policy.preferred()


def test_exp3_without_validation_metrics_stays_uniform() -> None:
    policy = AdaptiveWeights(ADAPTIVE, seed=0)
    policy.configure(1, 9, {"client-key": 0})
    policy.observe(1, 9, {"client_key": 0, "loss_total": 1.0})
    assert np.allclose(policy.probabilities(9), 1 / 3)
    # the learning rate of Exp3 for K = 3 candidates over the run's rounds
    rounds = FedrankConfig.from_run_config({"num-server-rounds": 10})
    eta = AdaptiveWeights(ADAPTIVE, base=rounds).eta
    assert eta == pytest.approx(np.sqrt(2 * np.log(3) / (10 * 3)))


# ---- per-client weights reach the right clients (Flower's simulation runtime) -----------------
@pytest.mark.slow
def test_per_client_weights_reach_the_right_clients(tmp_path: Path) -> None:
    """A ClientApp that runs the real handlers, after asserting on the client what it got."""
    from flwr.clientapp import ClientApp

    import fedrank.client.client_app as real
    from fedrank.server.server_app import make_server_app
    from fedrank.simulations.runtime import RayOptions, start_simulation

    spec = {
        "policy": "per-client",
        "groups": [{"clients": [0], "label-fraction": 0.5, "rank-weight": 2.0}],
        "clients": {"1": {"rank-weight": 0.5}},
        "by-label-fraction": [{"below": 0.6, "label-weight": 0.05}],
    }
    scenario = load_scenario("tiny").replace(client_weights=spec)
    config = {
        **scenario.run_config(0),
        "out-dir": os.fspath(tmp_path / "run"),
        "teacher-cache-dir": os.fspath(tmp_path / "teacher"),
        # the same run checks that these keys reach the clients and the student
        "device-features": "3",
        "rank-loss": "rank_pairwise_ce",
        "pair-weight": "log_discount",
        "weight-ranks": "both",
    }
    # a per-client policy that also wants the clients' validation metrics (like `adaptive`);
    # its options travel in `client-policy-options`
    assert config["client-policy"] == "per-client" and config["client-policy-options"]
    observed: list[dict] = []

    class ValidatingPerClient(PerClientWeights):
        wants_validation = True

        def observe(self, server_round: int, node_id: int, metrics: dict) -> None:
            observed.append(dict(metrics))

    register_policy(
        "per-client-validating",
        lambda cfg: ValidatingPerClient(cfg.policy_options(), cfg),
    )
    config["client-policy"] = "per-client-validating"
    expected = {  # partition id -> what that client must train with
        0: {"rank-weight": 2.0, "label-fraction": 0.5, "label-weight": 0.05},
        1: {"rank-weight": 0.5, "label-fraction": 1.0, "label-weight": 0.2},
    }
    app = ClientApp()

    @app.query("hello")
    def hello(msg, context):  # noqa: ANN001, ANN202
        return real.hello(msg, context)

    @app.query("scores")
    def scores(msg, context):  # noqa: ANN001, ANN202
        return real.receive_scores(msg, context)

    @app.train()
    def train(msg, context):  # noqa: ANN001, ANN202
        pid = int(context.node_config["partition-id"])
        got = {k: float(msg.content["config"][k]) for k in expected[pid]}
        assert got == expected[pid], f"client {pid} got {got}, expected {expected[pid]}"
        config = msg.content["config"]
        assert config["report-validation"] is True  # the policy wants validation metrics
        assert (config["pair-weight"], config["weight-ranks"]) == ("log_discount", "both")
        reply = real.train(msg, context)
        for key in ("val_ndcg@10_start", "val_ndcg@10"):
            assert 0.0 <= reply.content["metrics"][key] <= 1.0
        # replies have a fixed metric schema: what the client saw goes to a file instead
        seen = tmp_path / f"seen-{pid}-{int(config['server-round'])}.json"
        seen.write_text(json.dumps(got))
        return reply

    @app.evaluate()
    def evaluate(msg, context):  # noqa: ANN001, ANN202
        return real.evaluate(msg, context)

    start_simulation(make_server_app([config]), app, 2, ray=RayOptions(num_cpus=2))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    replies = rows[-1]["clients_train"]
    assert len(replies) == 2
    # the server's key is the partition id
    assert sorted(int(r["client_key"]) for r in replies) == [0, 1]
    last = rows[-1]["round"]
    for pid, want in expected.items():
        assert json.loads((tmp_path / f"seen-{pid}-{last}.json").read_text()) == want
    # the policy saw the validation metrics of both clients
    assert sorted(int(m["client_key"]) for m in observed) == [0, 1]
    assert all("val_ndcg@10" in m and "val_ndcg@10_start" in m for m in observed)
    # device-features = "3": the student reads 3 seeded columns of the data
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    num_features = summary["data"]["num_features"]
    columns = restrict_features(num_features, 3, seed=0).tolist()
    assert summary["data"]["student_columns"] == columns
    assert summary["student"]["spec"]["feature_indices"] == columns


def test_policies_come_from_the_run_config_alone() -> None:
    """What `flwr run` gives the ServerApp is enough: the server package holds every policy,
    and the policy gets its options from `client-policy-options`."""
    options = json.dumps({"candidates": [{"rank-weight": 0.5}, {"rank-weight": 2.0}]})
    config = FedrankConfig.from_run_config(
        {"client-policy": "adaptive", "client-policy-options": options}
    )
    policy = make_policy(config)
    assert type(policy).__name__ == "AdaptiveWeights" and policy.wants_validation
    assert policy.candidates == [{"rank-weight": 0.5}, {"rank-weight": 2.0}]
    assert not UniformPolicy.wants_validation
    with pytest.raises(ConfigError, match="client-policy-options"):  # options are checked
        make_policy(config.replace(**{"client-policy-options": '{"scale": 1}'}))
    with pytest.raises(ConfigError, match="'client-policy' 'bandit' is unknown"):
        make_policy(config.replace(**{"client-policy": "bandit"}))
