"""Round cost at 100+ clients: a federation in Flower's simulation runtime vs a plain loop.

Runs, in one process and on the same data, teacher, partitions, student and loss:

1. **federation**: ``--clients`` simulated clients for ``--rounds`` rounds in Flower's
   simulation runtime (every client trains every round, federated evaluation off), timed per
   round from its ``metrics.jsonl`` (``seconds``: hello / score delivery, train messages,
   aggregation and the server's evaluation; the server's evaluation is also shown apart);
2. **plain loop** (run first, on a quiet machine): the same client training
   (:func:`fedrank.client.trainer.train_student` on each client's partition with its teacher
   scores and label mask) and example-weighted averaging in a Python loop, one client after
   the other.

It prints both per round and the ratio (round 1 apart: the runtime's workers warm up and the
teacher scores are delivered then). ``--clients 1000 --rounds 1`` measures one round with
1,000 simulated clients.

    python benchmarks/bench_round_cost.py                        # 100 clients, 3 rounds
    python benchmarks/bench_round_cost.py --clients 1000 --rounds 1 --skip-plain
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedrank.client.client_app import app as client_app
from fedrank.client.local_data import load_local_data
from fedrank.client.trainer import TrainSettings, planned_steps, train_student
from fedrank.common.config import FedrankConfig
from fedrank.common.datasets import load_dataset
from fedrank.server.server_app import make_server_app
from fedrank.server.student_setup import build_student
from fedrank.server.teachers import run_teacher
from fedrank.simulations.runtime import RayOptions, start_simulation


def plain_loop(cfg: FedrankConfig, clients: int, rounds: int, cache: Path) -> list[float]:
    """Seconds per round of the same training and averaging without Flower."""
    dataset = load_dataset(cfg.data_path, seed=cfg.seed)
    table = run_teacher(cfg, dataset, cache).table
    student = build_student(cfg, dataset)
    loss = cfg.composite_loss()
    settings = cfg.client_dict()
    locals_ = [
        load_local_data({"partition-id": i, "num-partitions": clients}, settings)
        for i in range(clients)
    ]
    teacher = [table.align(local.train) if loss.needs_teacher else None for local in locals_]
    seconds = []
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        total: dict[str, torch.Tensor] = {}
        weight = 0
        for i, local in enumerate(locals_):
            model = copy.deepcopy(student)
            run = TrainSettings.from_config(
                cfg, proximal_mu=0.0, seed=cfg.seed * 1_000_003 + rnd + i
            )
            run = dataclasses.replace(
                run, step_offset=(rnd - 1) * planned_steps(run, local.train.num_sets)
            )
            train_student(
                model, local.train, loss, run, teacher=teacher[i], label_mask=local.label_mask
            )
            n = int(local.train.num_sets)
            for key, value in model.state_dict().items():
                total[key] = total.get(key, 0) + value.detach().double() * n
            weight += n
        student.load_state_dict({k: (v / weight).to(torch.float32) for k, v in total.items()})
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", default="synthetic:num_sets=2000")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="Ray's CPUs")
    parser.add_argument(
        "--client-cpus", type=float, default=1.0, help="CPUs each simulated client reserves"
    )
    parser.add_argument(
        "--min-local-steps",
        type=int,
        default=0,
        help="local steps per client and round at least (0: one epoch, 1 step on a client's "
        "~20 sets, the setting the issue measured; fedrank's default budget is 20)",
    )
    parser.add_argument("--skip-plain", action="store_true", help="only the federation")
    parser.add_argument("--out", help="folder (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-round-"))
    config = {
        "data-path": args.data,
        "num-server-rounds": args.rounds,
        "min-available-nodes": args.clients,
        "fraction-evaluate": 0.0,
        "local-epochs": 1,
        "min-local-steps": args.min_local_steps,
        "out-dir": str(out / "federation"),
        "teacher-cache-dir": str(out / "teacher"),
        "teacher-epochs": 5,
        "per-node-log": False,  # as `fedrank simulate` runs: no log line per node and round
    }
    cfg = FedrankConfig.from_run_config(config)
    dataset = load_dataset(cfg.data_path, seed=cfg.seed)
    t0 = time.perf_counter()
    run_teacher(cfg, dataset, out / "teacher")  # both paths read it from the cache
    print(f"teacher ready in {time.perf_counter() - t0:.1f}s", flush=True)
    torch.set_num_threads(1)
    # the plain loop first, on a quiet machine (after the federation, Ray's processes are
    # still winding down and would slow it)
    plain = None if args.skip_plain else plain_loop(cfg, args.clients, args.rounds, out / "teacher")

    t0 = time.perf_counter()
    start_simulation(
        make_server_app([cfg.to_dict()]),
        client_app,
        args.clients,
        ray=RayOptions(num_cpus=args.cpus, client_cpus=args.client_cpus),
    )
    fed_wall = time.perf_counter() - t0
    rows = [
        json.loads(line)
        for line in (out / "federation" / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ][1:]
    fed = [float(r["seconds"]) for r in rows]
    fed_eval = [float(r.get("seconds_server_eval", 0.0)) for r in rows]
    client_train = [
        sum(float(c.get("train_seconds", 0.0)) for c in r["clients_train"]) for r in rows
    ]
    print(f"\nfederation: {args.clients} clients, {args.rounds} round(s), {fed_wall:.1f}s wall")
    print(f"{'round':>5} {'round s':>8} {'server eval s':>14} {'clients train s (sum)':>22}")
    for i, r in enumerate(rows):
        print(f"{r['round']:>5} {fed[i]:>8.2f} {fed_eval[i]:>14.2f} {client_train[i]:>22.2f}")
    result: dict[str, Any] = {
        "clients": args.clients,
        "rounds": args.rounds,
        "federation_round_seconds": fed,
        "federation_server_eval_seconds": fed_eval,
        "clients_train_seconds": client_train,
    }
    if plain is not None:
        result["plain_round_seconds"] = plain
        print(f"\nplain loop (same training and averaging, one process): {plain}")
        later = slice(1, None) if args.rounds > 1 else slice(0, None)
        fed_mean = statistics.mean(fed[later])
        fed_no_eval = statistics.mean([a - b for a, b in zip(fed, fed_eval, strict=True)][later])
        plain_mean = statistics.mean(plain[later])
        print(
            f"rounds {'2..' if args.rounds > 1 else '1..'}{args.rounds}: federation "
            f"{fed_mean:.2f}s ({fed_no_eval:.2f}s without the server's evaluation) vs plain "
            f"{plain_mean:.2f}s per round: ratio {fed_mean / plain_mean:.2f}x "
            f"({fed_no_eval / plain_mean:.2f}x without evaluation); goal <= 1.5x"
        )
        result["ratio"] = fed_mean / plain_mean
        result["ratio_without_server_eval"] = fed_no_eval / plain_mean
    (out / "bench_round_cost.json").write_text(json.dumps(result, indent=1))
    print(f"results: {out / 'bench_round_cost.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
