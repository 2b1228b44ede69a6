"""Teacher vs. student: parameter counts and scoring time on the same example sets.

Measures, in one run, on MQ2008 Fold1 test (or synthetic random sets when the data is not next
to the project): parameters of the default-sized teacher and student, the time to score one set
at a time (as a device would: batch of one set, no grad, one thread) and the time to score all
sets in padded batches with ``score_sets``; prints the teacher / student ratios.

    python benchmarks/bench_models.py [--repeats 3] [--threads 1] [--data PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrank.common.example_sets import ExampleSets  # noqa: E402
from fedrank.common.models import StudentModel, TeacherModel, count_parameters, score_sets  # noqa: E402

DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "MQ2008" / "Fold1" / "test.txt.gz"


def load_sets(path: Path) -> tuple[ExampleSets, str]:
    if path.is_file():
        try:
            from fedrank.common.letor import read_letor

            return read_letor(path, cache=False), f"{path.parent.name}/{path.name} (MQ2008)"
        except ImportError:
            pass
    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 40, size=150)
    n = int(sizes.sum())
    sets = ExampleSets(
        features=rng.random((n, 46)),
        labels=rng.integers(0, 3, n),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        set_ids=[f"q{i}" for i in range(sizes.size)],
    )
    return sets, "synthetic random sets (150 sets, 46 features)"


@torch.no_grad()
def per_set_seconds(model: torch.nn.Module, sets: ExampleSets, repeats: int) -> float:
    """Best-of-``repeats`` mean time to score one set on its own."""
    model.eval()
    inputs = []
    for k in range(sets.num_sets):
        lo, hi = sets.offsets[k], sets.offsets[k + 1]
        x = torch.from_numpy(sets.features[lo:hi])[None]
        inputs.append((x, torch.ones(1, hi - lo, dtype=torch.bool)))
    model(*inputs[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for x, m in inputs:
            model(x, m)
        best = min(best, time.perf_counter() - start)
    return best / sets.num_sets


def batched_seconds(model: torch.nn.Module, sets: ExampleSets, repeats: int) -> float:
    score_sets(model, sets)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        score_sets(model, sets, batch_size=256)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LETOR file to score")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (device-like: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    sets, source = load_sets(args.data)
    teacher = TeacherModel(sets.num_features)
    student = StudentModel(sets.num_features)
    print(
        f"data: {source}: {sets.num_sets} sets, {sets.num_items} items, "
        f"{sets.num_features} features; torch threads: {args.threads}"
    )
    rows = []
    for name, model in (("teacher", teacher), ("student", student)):
        rows.append(
            (
                name,
                count_parameters(model),
                per_set_seconds(model, sets, args.repeats),
                batched_seconds(model, sets, args.repeats),
            )
        )
    print(
        f"{'model':8s} {'params':>9s} {'ms/set (one at a time)':>23s} "
        f"{'all sets batched (ms)':>22s}"
    )
    for name, params, one, batched in rows:
        print(f"{name:8s} {params:9d} {one * 1e3:23.3f} {batched * 1e3:22.1f}")
    (_, tp, t1, tb), (_, sp, s1, sb) = rows
    print(
        f"ratio teacher/student: params {tp / sp:.0f}x, per-set time {t1 / s1:.1f}x, "
        f"batched time {tb / sb:.1f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
