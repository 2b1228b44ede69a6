"""Benchmark of the teacher score table: what travels to the clients, and float16's cost.

Run from the project root: ``python benchmarks/bench_score_table.py`` (default data: MQ2008
Fold1 at ``../shared/data/MQ2008/Fold1``; ``--data synthetic`` works too). It trains a short
teacher (cached in a temporary folder unless ``--cache`` is given), splits the training sets
IID over 10 clients and prints, measured in this run:

- bytes of the full table vs each client's targeted subset (payload and Flower record bytes);
- float32 vs float16 bytes;
- the effect of float16 teacher scores on a distillation loss: relative difference of
  ``rank_softmax_ce`` (and ``rank_l2``) over the training sets, and of its gradient, plus how
  many sets' teacher order float16 changes.

Goals (PASS/FAIL): a client's subset is at most ~1.5/10 of the full table; float16 saves at
least 40% of the record bytes; float16 changes the rank_softmax_ce value by under 0.1%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedrank.common.datasets import load_dataset  # noqa: E402
from fedrank.common.records import record_nbytes, score_table_to_record  # noqa: E402
from fedrank.server.teacher import TeacherConfig, train_or_load_teacher  # noqa: E402

DEFAULT_DATA = ROOT / ".." / "shared" / "data" / "MQ2008" / "Fold1"


def _partition(sets, num_clients: int, seed: int) -> list[np.ndarray]:
    try:
        from fedrank.common.partitioners import partition
    except ImportError:  # pragma: no cover - the partitioner ships with the project
        rng = np.random.default_rng(seed)
        return [np.sort(p) for p in np.array_split(rng.permutation(sets.num_sets), num_clients)]
    return partition(sets, num_clients, "iid", seed=seed)


def _loss_effect(table32, table16, sets, loss_name: str) -> tuple[float, float]:
    """Relative difference of a distillation loss (value, gradient) with fp16 vs fp32 teacher."""
    from fedrank.common.losses import LOSSES, reduce_sets

    gen = torch.Generator().manual_seed(0)
    batch = sets.pad(extra={"t32": table32.align(sets), "t16": table16.align(sets)})
    # one student for both: ranks roughly like the teacher (teacher logits plus noise)
    student = batch.extra["t32"].double() + torch.randn(batch.mask.shape, generator=gen).double()
    values, grads = [], []
    for key in ("t32", "t16"):
        s = student.clone().requires_grad_(True)
        value = reduce_sets(LOSSES[loss_name](s, batch.extra[key].double(), batch.mask), batch.mask)
        value.backward()
        values.append(float(value.detach()))
        grads.append(s.grad.detach().clone())
    rel_value = abs(values[1] - values[0]) / abs(values[0])
    rel_grad = float((grads[1] - grads[0]).norm() / grads[0].norm())
    return rel_value, rel_grad


def _order_changes(table32, table16) -> tuple[int, int]:
    changed = 0
    for k in range(table32.num_sets):
        a, b = table32.offsets[k], table32.offsets[k + 1]
        o32 = np.argsort(-table32.scores[a:b], kind="stable")
        o16 = np.argsort(-table16.scores[a:b].astype(np.float32), kind="stable")
        changed += int(not np.array_equal(o32, o16))
    return changed, table32.num_sets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--epochs", type=int, default=4, help="teacher epochs (a short teacher)")
    p.add_argument("--cache", default=None, help="teacher cache folder (default: temporary)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    dataset = load_dataset(args.data)
    config = TeacherConfig(epochs=args.epochs, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model, table = train_or_load_teacher(dataset, config, args.cache or tmp)
        seconds = time.perf_counter() - started
    train = dataset.splits["train"]
    print(
        f"data {dataset.name}: {table.num_sets} sets / {table.num_items} items in the table "
        f"(teacher ready in {seconds:.1f}s); train {train.num_sets} sets over {args.clients} "
        "clients (IID)"
    )

    full32 = table
    full16 = table.to_float16()
    rec32 = record_nbytes(score_table_to_record(full32))
    rec16 = record_nbytes(score_table_to_record(full16))
    print("\nfull table          payload bytes   record bytes")
    print(f"  float32           {full32.nbytes:>13,}   {rec32:>12,}")
    print(f"  float16           {full16.nbytes:>13,}   {rec16:>12,}")

    parts = _partition(train, args.clients, args.seed)
    sub32, sub16 = [], []
    for positions in parts:
        ids = train.set_ids[positions]
        sub32.append(record_nbytes(score_table_to_record(full32.subset(ids))))
        sub16.append(record_nbytes(score_table_to_record(full16.subset(ids))))
    mean32, mean16 = float(np.mean(sub32)), float(np.mean(sub16))
    print(f"\nper-client targeted subset (record bytes, {args.clients} clients)")
    print(f"  float32  mean {mean32:>10,.0f}  min {min(sub32):>8,}  max {max(sub32):>8,}")
    print(f"  float16  mean {mean16:>10,.0f}  min {min(sub16):>8,}  max {max(sub16):>8,}")
    ratio_subset = mean32 / rec32
    ratio_half = rec16 / rec32
    ratio_both = mean16 / rec32
    total_sent = sum(sub16)
    print("\nratios")
    print(f"  client subset / full table (float32)       {ratio_subset:.3f}")
    print(f"  float16 / float32 (full table record)      {ratio_half:.3f}")
    print(f"  client float16 subset / full float32 table {ratio_both:.3f}")
    print(
        f"  all clients' float16 subsets / sending the full float32 table to each: "
        f"{total_sent / (rec32 * args.clients):.3f}"
    )

    print("\nfloat16 teacher scores in distillation (train sets, student = teacher + noise)")
    rel = {}
    for name in ("rank_softmax_ce", "rank_l2"):
        try:
            rel[name] = _loss_effect(full32, full16, train, name)
        except ImportError:  # pragma: no cover - losses ship with the project
            print("  fedrank.common.losses not available: skipped")
            break
        print(
            f"  {name:<16} relative difference: value {rel[name][0]:.2e}, "
            f"gradient {rel[name][1]:.2e}"
        )
    changed, total = _order_changes(full32, full16)
    print(f"  sets whose teacher order changes in float16: {changed} of {total}")

    goals = [
        ("client subset <= 1.5/clients of full table", ratio_subset <= 1.5 / args.clients),
        ("float16 saves >= 40% of record bytes", ratio_half <= 0.6),
    ]
    if "rank_softmax_ce" in rel:
        goals.append(("float16 changes rank_softmax_ce < 0.1%", rel["rank_softmax_ce"][0] < 1e-3))
    print()
    for label, ok in goals:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    return 0 if all(ok for _, ok in goals) else 1


if __name__ == "__main__":
    raise SystemExit(main())
