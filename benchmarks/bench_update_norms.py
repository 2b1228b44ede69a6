"""How long are honest updates? The measurement behind the default of ``max-update-norm``.

Runs the default federation (FedAvg, rank distillation, two local epochs, Adam at 0.01) in
Flower's simulation runtime with the norm bounds off, on the synthetic default data and on
MQ2008 Fold1 (one runtime start per client count), with 2, 5 and 10 clients (fewer clients
hold more sets and take more local steps, so their updates are longer), and prints the L2
norm ``||w_client - w_global||`` of every honest update: median and maximum per setting, and
the longest update of a round over that round's median. The last lines compare the defaults
of ``max-update-norm`` and ``update-norm-ratio`` with the most that was measured.

    python benchmarks/bench_update_norms.py                 # both data sets, 2/5/10 clients
    python benchmarks/bench_update_norms.py --quick         # synthetic, 5 clients, 2 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrank.common.config import FedrankConfig  # noqa: E402
from fedrank.common.run_folder import read_metrics  # noqa: E402
from fedrank.simulations.simulate import run_federations  # noqa: E402

MQ2008_FOLD1 = ROOT / ".." / "shared" / "data" / "MQ2008" / "Fold1"


def measure(
    clients: int, rounds: int, teacher_epochs: int, work: Path, datasets: list[str]
) -> dict[str, list[list[float]]]:
    """Every honest update norm of one federation per data set (one runtime start), per
    round: data set -> [[norms of round 1], [norms of round 2], ...]."""
    configs = []
    for data in datasets:
        name = Path(data).name
        configs.append(
            {
                "data-path": data,
                "num-server-rounds": rounds,
                "teacher-epochs": teacher_epochs,
                "teacher-cache-dir": str(work / f"teacher-{name}"),
                "max-update-norm": 0.0,  # measure, never clip
                "update-norm-ratio": 0.0,
                "fraction-evaluate": 0.0,
                "out-dir": str(work / f"{name}-{clients}"),
            }
        )
    run_federations(configs, num_clients=clients)
    out = {}
    for data, config in zip(datasets, configs, strict=True):
        rows = read_metrics(Path(config["out-dir"]) / "metrics.jsonl")
        out[data] = [[float(c["update_norm"]) for c in r["clients_train"]] for r in rows[1:]]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="synthetic, 5 clients, 2 rounds")
    args = parser.parse_args(argv)
    datasets = ["synthetic", str(MQ2008_FOLD1.resolve())]
    counts, rounds = (2, 5, 10), args.rounds
    if args.quick:
        datasets, counts, rounds = ["synthetic"], (5,), 2
    defaults = FedrankConfig()
    bound, ratio = defaults.max_update_norm, defaults.update_norm_ratio
    rows = []
    longest = widest = 0.0
    with tempfile.TemporaryDirectory(prefix="fedrank-norms-") as tmp:
        for clients in counts:
            measured = measure(clients, rounds, args.teacher_epochs, Path(tmp), datasets)
            for data, per_round in measured.items():
                norms = [n for r in per_round for n in r]
                # the longest update of a round over the round's median (what the ratio bounds)
                spread = max(max(r) / statistics.median(r) for r in per_round if r)
                longest, widest = max(longest, max(norms)), max(widest, spread)
                name = "synthetic" if data == "synthetic" else "MQ2008/Fold1"
                rows.append(
                    (name, clients, len(norms), statistics.median(norms), max(norms), spread)
                )
                print(
                    f"{name} {clients} clients: max norm {max(norms):.3f}, max/median {spread:.2f}"
                )
    print()
    print(f"{'data':>13}  clients  updates  median norm  max norm  max/round median")
    for name, clients, count, median, top, spread in rows:
        print(
            f"{name:>13}  {clients:>7}  {count:>7}  {median:>11.3f}  {top:>8.3f}  {spread:>16.2f}"
        )
    print(
        f"\nmax-update-norm default {bound:g}: {bound / longest:.1f}x the longest honest update "
        f"measured ({longest:.3f})"
    )
    print(
        f"update-norm-ratio default {ratio:g}: {ratio / widest:.1f}x the widest honest spread "
        f"measured ({widest:.2f}x a round's median)"
    )
    clipped = longest > bound or widest > ratio
    print(f"honest updates the defaults would clip: {'SOME' if clipped else 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
