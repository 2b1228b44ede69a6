"""Poisoning benchmark: ten clients, two of them hostile, with and without the defences.

Runs, in ONE start of Flower's simulation runtime on the same ten simulated clients, a clean
federation and the same federation with partitions 0 and 1 poisoning every training reply
(:func:`fedrank.simulations.attacks.poisoned_client_app`: the update flipped and scaled ten times,
and a claim of 1e12 examples), aggregated with

- ``FedAvg``, defences off (``max-update-norm = 0``, ``update-norm-ratio = 0``,
  ``max-examples-per-node = -1``): what every run did before the defences;
- ``FedAvg``, defences on (the defaults: example weights capped by what each node reported at
  hello, updates clipped to ``max-update-norm`` and to ``update-norm-ratio`` times the round's
  median update norm);
- ``FedTrimmedAvg`` (``trim-beta = 0.2``), ``FedMedian``, ``MultiKrum`` and ``Krum``
  (``num-malicious-nodes = 2``), with the defaults on.

It prints NDCG@10 of the global student on the held-out sets after the last round for each,
next to the clean run's, and writes ``poisoning.png`` (NDCG@10 per round) and
``poisoning.json`` into ``--out``.

    python benchmarks/bench_poisoning.py                       # synthetic data, 5 rounds
    python benchmarks/bench_poisoning.py --data ../shared/data/MQ2008/Fold1 --rounds 5
    python benchmarks/bench_poisoning.py --quick               # 2 rounds, tiny teacher
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedrank.common.atomic_io import atomic_path, atomic_write_json  # noqa: E402
from fedrank.common.config import FedrankConfig  # noqa: E402
from fedrank.common.run_folder import read_metrics  # noqa: E402
from fedrank.server.server_app import make_server_app  # noqa: E402
from fedrank.simulations.attacks import poisoned_client_app  # noqa: E402
from fedrank.simulations.runtime import RayOptions, start_simulation  # noqa: E402

CLIENTS = 10
POISONERS = (0, 1)
SCALE = 10.0
CLAIM = 10**12
# name -> overrides; "clean" runs without the attack (score-mode broadcast: same training)
ARMS: dict[str, dict[str, object]] = {
    "clean (fedavg, defaults)": {"score-mode": "broadcast"},
    "fedavg, defences off": {
        "max-update-norm": 0.0,
        "update-norm-ratio": 0.0,
        "max-examples-per-node": -1,
    },
    "fedavg, defaults": {},
    "fedtrimmedavg 0.2": {"strategy": "fedtrimmedavg", "trim-beta": 0.2},
    "fedmedian": {"strategy": "fedmedian"},
    "multikrum f=2": {"strategy": "multikrum", "num-malicious-nodes": 2},
    "krum f=2": {"strategy": "krum", "num-malicious-nodes": 2},
}


def plot(series: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """NDCG@10 per round: the clean run as a thick dashed reference, every arm on top."""
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=100)
    names = list(series)
    for i, name in enumerate(names[1:], start=1):
        xs, ys = zip(*series[name], strict=True)
        ax.plot(xs, ys, marker="o", markersize=4, color=f"C{i}", label=name)
    xs, ys = zip(*series[names[0]], strict=True)
    ax.plot(xs, ys, "k--", linewidth=2.5, label=names[0], zorder=10)
    ax.set_xlabel("round")
    ax.set_ylabel("NDCG@10 (held-out sets)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--out", default="runs/bench-poisoning")
    parser.add_argument("--quick", action="store_true", help="2 rounds, a tiny teacher")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    data = args.data if args.data == "synthetic" else str(Path(args.data).resolve())
    base: dict[str, object] = {
        "data-path": data,
        "num-server-rounds": 2 if args.quick else args.rounds,
        "teacher-epochs": 1 if args.quick else args.teacher_epochs,
        "teacher-cache-dir": str(out / "teacher"),
        "min-available-nodes": CLIENTS,
        "min-replies": 7,  # every rule here keeps its guarantee with >= 7 replies (2f + 3)
        "fraction-evaluate": 0.0,
    }
    if args.quick:
        base.update({"teacher-d-model": 16, "teacher-heads": 2, "teacher-layers": 1})
    configs = []
    for i, overrides in enumerate(ARMS.values()):
        config = {**base, **overrides, "out-dir": str(out / f"arm-{i}")}
        FedrankConfig.from_run_config(config)  # a bad key fails before the runtime starts
        configs.append(config)
    start_simulation(
        make_server_app(configs),
        poisoned_client_app(POISONERS, scale=SCALE, claim=CLAIM),
        CLIENTS,
        ray=RayOptions(num_cpus=os.cpu_count() or 1),
    )
    series, results = {}, []
    for (name, overrides), config in zip(ARMS.items(), configs, strict=True):
        rows = read_metrics(Path(str(config["out-dir"])) / "metrics.jsonl")
        series[name] = [(r["round"], r["ndcg@10"]) for r in rows]
        clipped = sum(len(r.get("defences", [])) for r in rows[1:])
        results.append(
            {
                "arm": name,
                "overrides": overrides,
                "ndcg@10": rows[-1]["ndcg@10"],
                "start": rows[0]["ndcg@10"],
                "rounds": rows[-1]["round"],
                "defence_notes": clipped,
            }
        )
    clean = results[0]["ndcg@10"]
    start = results[0]["start"]
    print(
        f"\n{CLIENTS} clients, poisoners {list(POISONERS)} (update x-{SCALE:g}, claim {CLAIM:.0e})"
    )
    print(f"data {data}; NDCG@10 of the global student, start {start:.4f}\n")
    head = f"{'aggregation':<26} {'NDCG@10':>8} {'vs clean':>9} {'kept gain':>10} {'notes':>6}"
    print(head)
    print("-" * len(head))
    for r in results:
        gain = (r["ndcg@10"] - start) / (clean - start) if clean != start else float("nan")
        r["kept_gain"] = gain
        print(
            f"{r['arm']:<26} {r['ndcg@10']:>8.4f} {r['ndcg@10'] - clean:>+9.4f} "
            f"{gain:>9.0%} {r['defence_notes']:>6}"
        )
    print("\nkept gain: (NDCG@10 - start) / (clean - start); notes: capped weights and clipped")
    print("updates the defences logged over the run")
    plot(series, out / "poisoning.png", f"{CLIENTS} clients, 2 poisoners: NDCG@10 per round")
    atomic_write_json(out / "poisoning.json", {"data": data, "results": results})
    print(f"\noutputs: {out / 'poisoning.png'}, {out / 'poisoning.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
