"""Federation benchmark: Flower's share of a round, and the bytes a round moves.

Runs a real federation in Flower's simulation runtime (default: 10 clients on MQ2008 Fold1,
rank distillation, targeted scores) and prints:

1. **Flower's share of a round**: wall time of the round minus the slowest client's local
   training and the server's evaluation, as a fraction of the round (federated evaluation off,
   so a round is: score delivery if needed, train messages, aggregation, server evaluation).
   On a machine with fewer cores than clients, clients train in waves; the second figure
   subtracts the clients' total training time divided by the number of simulation workers
   instead of the slowest client.
2. **Bytes**: teacher scores per client in ``targeted`` vs ``broadcast`` mode, float32 vs
   float16 (the exact records the server sends, checked against what the run logged), and the
   student's update bytes per round (to and from the clients).

    python benchmarks/bench_federation.py                      # 10 clients, MQ2008 Fold1
    python benchmarks/bench_federation.py --clients 5 --rounds 3 --data synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MQ2008_FOLD1 = ROOT / ".." / "shared" / "data" / "MQ2008" / "Fold1"


def _bytes_table(summary: dict, data_path: str, clients: int, seed: int) -> list[tuple]:
    """Teacher-score bytes per client for each mode and dtype (the server's exact records)."""
    from fedrank.common.datasets import load_dataset
    from fedrank.common.partitioners import partition
    from fedrank.common.records import record_nbytes, score_table_to_record
    from fedrank.common.score_table import ScoreTable

    teacher_dir = Path(summary["teacher"]["path"])
    table = ScoreTable.load(teacher_dir / "scores")
    dataset = load_dataset(data_path, seed=seed)
    train, vali = dataset.splits["train"], dataset.splits["vali"]
    device_ids = [*train.set_ids.tolist(), *vali.set_ids.tolist()]
    device_table = table.subset(device_ids)
    train_parts = partition(train, clients, scheme="iid", seed=seed)
    vali_parts = partition(vali, clients, scheme="iid", seed=seed)
    rows = []
    for dtype in ("float32", "float16"):
        payload = device_table.to_float16() if dtype == "float16" else device_table
        broadcast = record_nbytes(score_table_to_record(payload))
        targeted = [
            record_nbytes(
                score_table_to_record(
                    payload.subset([*train.set_ids[tp].tolist(), *vali.set_ids[vp].tolist()])
                )
            )
            for tp, vp in zip(train_parts, vali_parts, strict=True)
        ]
        rows.append((dtype, broadcast, statistics.mean(targeted), min(targeted), max(targeted)))
    return rows


def _share_table(label: str, rounds: list[dict], workers: int) -> None:
    print(f"-- {label}")
    print(
        f"{'round':>5} {'wall s':>8} {'slowest train s':>16} {'server eval s':>14} "
        f"{'Flower share':>13} {'share (waves)':>14}"
    )
    shares, wave_shares = [], []
    for r in rounds:
        wall = r["seconds"]
        slowest = r["seconds_slowest_client_train"]
        evals = r["seconds_server_eval"]
        total_train = sum(c.get("train_seconds", 0.0) for c in r["clients_train"])
        share = max(wall - slowest - evals, 0.0) / wall
        parallel = min(workers, len(r["clients_train"]))
        waves = max(wall - total_train / parallel - evals, 0.0) / wall
        shares.append(share)
        wave_shares.append(waves)
        print(
            f"{r['round']:>5} {wall:>8.2f} {slowest:>16.3f} {evals:>14.3f} {share:>12.1%} "
            f"{waves:>13.1%}"
        )
    print(
        f"mean over rounds {rounds[0]['round']}..{rounds[-1]['round']}: Flower's share "
        f"{statistics.mean(shares):.1%} (wall - slowest client - server eval), "
        f"{statistics.mean(wave_shares):.1%} (wall - total client training / {workers} "
        f"workers - server eval); median {statistics.median(shares):.1%}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(MQ2008_FOLD1))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument(
        "--cpus", type=int, default=None, help="simulation workers (default: all cores)"
    )
    parser.add_argument(
        "--heavy-epochs", type=int, default=10, help="local epochs of the second federation"
    )
    args = parser.parse_args(argv)

    out = Path(args.out or tempfile.mkdtemp(prefix="bench-federation-"))
    config = {
        "data-path": args.data,
        "num-server-rounds": args.rounds,
        "fraction-evaluate": 0.0,
        "score-mode": "targeted",
        "score-dtype": "float32",
        "teacher-cache-dir": str(out / "teacher"),
    }
    workers = args.cpus or os.cpu_count() or 1
    heavy = args.heavy_epochs
    print(
        f"running {args.rounds} rounds with {args.clients} clients on {args.data} "
        f"({workers} workers): default local work, then {heavy} local epochs"
    )
    from fedrank.simulations.simulate import run_federations

    # both federations in one start of the runtime; the second reuses the warm workers and
    # the teacher scores the clients already hold
    summaries = run_federations(
        [
            {**config, "out-dir": str(out / "run")},
            {**config, "local-epochs": heavy, "out-dir": str(out / f"run-{heavy}-epochs")},
        ],
        num_clients=args.clients,
        num_cpus=workers,
    )
    summary = summaries[0]
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] > 0]

    print("\n== Flower's share of a round (federated evaluation off) ==")
    for label, folder in (
        (f"local-epochs={config.get('local-epochs', 2)} (default)", "run"),
        (f"local-epochs={heavy}", f"run-{heavy}-epochs"),
    ):
        lines = (out / folder / "metrics.jsonl").read_text().splitlines()
        _share_table(label, [r for r in map(json.loads, lines) if r["round"] > 0], workers)

    print("\n== Bytes ==")
    table = _bytes_table(summary, args.data, args.clients, seed=0)
    print(
        f"{'dtype':>8} {'broadcast B/client':>19} "
        f"{'targeted B/client (mean, min-max)':>35} {'targeted/broadcast':>19}"
    )
    for dtype, broadcast, mean, low, high in table:
        print(
            f"{dtype:>8} {broadcast:>19,} {mean:>17,.0f} ({low:,}-{high:,}) "
            f"{mean / broadcast:>18.3f}"
        )
    f32, f16 = table[0], table[1]
    print(f"float16/float32: broadcast {f16[1] / f32[1]:.3f}, targeted {f16[2] / f32[2]:.3f}")
    logged = [d["nbytes"] for d in summary["federation"]["score_deliveries"]]
    print(
        f"logged by the run (targeted float32): {len(logged)} deliveries, mean "
        f"{statistics.mean(logged):,.0f} B/client (check: matches the table above)"
    )
    w_to = [r["bytes_weights_to_clients"] for r in rounds]
    w_from = [r["bytes_from_clients"] for r in rounds]
    print(
        f"student update per round: {statistics.mean(w_to):,.0f} B to clients, "
        f"{statistics.mean(w_from):,.0f} B from clients ({args.clients} clients, "
        f"{summary['federation']['weights_bytes']:,} B of weights, "
        f"{summary['student']['parameters']:,} parameters)"
    )
    total_scores = sum(r["bytes_scores_to_clients"] for r in rounds)
    total = sum(r["bytes_to_clients"] for r in rounds)
    print(
        f"over {len(rounds)} rounds: {total:,} B to clients, of which teacher scores "
        f"{total_scores:,} B ({total_scores / total:.1%}), sent once per client"
    )
    print(f"\noutputs: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
