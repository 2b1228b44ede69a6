"""Sweep throughput: runs per hour with one runtime start per trial vs many trials per start.

Runs the same sweep twice in one run, on the same machine and teacher cache:

1. **one run per process** (how sweeps ran before): every trial is a new worker process with
   its own start of Flower's simulation runtime (``fedrank sweep --one-run-per-process``);
2. **many runs per start**: each worker starts the runtime once and runs trial after trial in
   it (``fedrank sweep``, the default);

each with ``--workers`` workers (default 2) over the first ``--trials`` points of the
scenario's grid (default ``label-scarce``, one seed per trial, so a trial is one run), and
prints the wall time, runs per hour and the ratio. The teacher is trained once before both,
into a cache both read.

    python benchmarks/bench_sweep_throughput.py                    # label-scarce, 8 trials
    python benchmarks/bench_sweep_throughput.py --trials 4 --scenario tiny
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fedrank.common.atomic_io import atomic_write_json
from fedrank.common.config import FedrankConfig
from fedrank.common.datasets import load_dataset
from fedrank.server.teachers import run_teacher
from fedrank.simulations.scenarios import load_scenario
from fedrank.simulations.sweep import run_sweep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="label-scarce")
    parser.add_argument("--trials", type=int, default=8, help="grid points per path")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="the one seed of every trial")
    parser.add_argument(
        "--teacher-epochs", type=int, help="override the scenario's (the teacher is cached)"
    )
    parser.add_argument("--out", help="folder for both sweeps (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-sweep-"))
    scenario = load_scenario(args.scenario)
    cache = out / "teacher"
    overrides: dict[str, object] = {"teacher-cache-dir": str(cache)}
    if args.teacher_epochs:
        overrides["teacher-epochs"] = args.teacher_epochs
    cfg = FedrankConfig.from_run_config(
        {**scenario.run_config(args.seed, overrides), "out-dir": str(out / "unused")}
    )
    t0 = time.perf_counter()
    run_teacher(cfg, load_dataset(cfg.data_path, seed=cfg.seed), cache)
    print(f"teacher ready in {time.perf_counter() - t0:.1f}s (shared by both sweeps)", flush=True)

    results = {}
    for name, one_per_process in (("one run per process", True), ("many runs per start", False)):
        print(f"\n== {name}: {args.trials} trial(s), {args.workers} worker(s)", flush=True)
        t0 = time.perf_counter()
        result = run_sweep(
            scenario,
            "grid",
            out / ("per-process" if one_per_process else "per-start"),
            max_trials=args.trials,
            seeds=[args.seed],
            overrides=overrides,
            workers=args.workers,
            one_run_per_process=one_per_process,
            report=False,
        )
        seconds = time.perf_counter() - t0
        runs = result.completed * len([args.seed])
        results[name] = {
            "seconds": seconds,
            "runs": runs,
            "failed": len(result.failed),
            "runs_per_hour": 3600.0 * runs / seconds,
        }
    before, after = results["one run per process"], results["many runs per start"]
    ratio = after["runs_per_hour"] / before["runs_per_hour"]
    print(f"\n{args.scenario} --grid, {args.workers} workers, {args.trials} trials x 1 seed")
    print(f"{'path':<22} {'runs':>5} {'failed':>6} {'seconds':>8} {'runs/hour':>10}")
    for name, r in results.items():
        print(
            f"{name:<22} {r['runs']:>5} {r['failed']:>6} {r['seconds']:>8.1f} "
            f"{r['runs_per_hour']:>10.0f}"
        )
    print(f"throughput ratio (many per start / one per process): {ratio:.2f}x  (goal >= 3x)")
    atomic_write_json(
        out / "bench_sweep_throughput.json",
        {"scenario": args.scenario, "workers": args.workers, "results": results, "ratio": ratio},
    )
    print(f"results: {out / 'bench_sweep_throughput.json'}")
    return 0 if before["failed"] == after["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
