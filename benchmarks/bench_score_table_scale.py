"""Score tables at any size: streamed table folders vs the in-memory ``.npz`` table.

Run from the project root::

    python benchmarks/bench_score_table_scale.py                  # 10^5, 10^6, 10^7 items
    python benchmarks/bench_score_table_scale.py --sizes 1e5,1e6  # quicker

For each size a synthetic table (float32 scores) is built, saved and served both ways, in two
series: sets of 20 items on average (the index grows with the table), and a fixed number of
sets (``--fixed-sets``; the index stays the same, the sets grow). Each step runs in a fresh
subprocess so its peak resident memory (``ru_maxrss`` of that process) is its own:

- **folder** (new): :class:`~fedrank.common.score_table.ScoreTableWriter` streams chunks of sets
  to a table folder (hash computed by streaming the file back); serving opens it memory-mapped,
  verifies its checksum by streaming, and cuts one node's subset;
- **memory** (old): the whole table in memory, hashed, written as one ``.npz``; serving loads
  the ``.npz`` and cuts the same subset.

A node's payload is the subset of ``--node-sets`` random sets turned into its Flower record
(what the server sends), timed as the best of ``--repeats`` calls. Both paths build the same
table: the script checks that their versions are equal.

Goals (printed as ratios, largest size over smallest): the folder path's peak memory above the
interpreter's baseline does not grow with the table beyond its index (set ids and offsets: it
stays flat in the fixed-sets series), and the time to serve a node's subset does not grow with
the table (the first series, where a node's sets keep their size).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fedrank.common.records import score_table_to_record  # noqa: E402
from fedrank.common.score_table import ScoreTable, ScoreTableWriter  # noqa: E402

CHUNK_ITEMS = 1 << 16  # items per generated chunk


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def chunks(
    num_items: int, mean_size: int, seed: int = 0
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """The synthetic table as (set ids, sizes, scores) chunks of about CHUNK_ITEMS items; set
    sizes are uniform in 1..2 * mean_size - 1; the last set is cut to fit."""
    rng = np.random.default_rng(seed)
    made, first = 0, 0
    per_chunk = max(1, CHUNK_ITEMS // mean_size)
    while made < num_items:
        sizes = rng.integers(1, 2 * mean_size, size=per_chunk)
        ends = made + np.cumsum(sizes)
        keep = int(np.searchsorted(ends, num_items, side="left")) + 1
        sizes = sizes[:keep]
        sizes[-1] -= max(int(made + sizes.sum()) - num_items, 0)
        ids = [f"q{first + k:08d}" for k in range(sizes.size)]
        yield ids, sizes, rng.normal(size=int(sizes.sum())).astype(np.float32)
        made += int(sizes.sum())
        first += sizes.size


def node_sets(table: ScoreTable, count: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    picks = rng.choice(table.num_sets, size=min(count, table.num_sets), replace=False)
    return [f"q{int(k):08d}" for k in picks]  # ids by construction: no scan of the table


def serve(table: ScoreTable, ids: list[str], repeats: int) -> tuple[float, int]:
    times, nbytes = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        record = score_table_to_record(table.subset(ids))
        times.append(time.perf_counter() - t0)
        nbytes = int(record.count_bytes())
    return min(times), nbytes  # best of the repeats: the machine is shared and noisy


def child(mode: str, num_items: int, mean_size: int, folder: Path, node: int, repeats: int) -> dict:
    out: dict = {"mode": mode, "items": num_items}
    t0 = time.perf_counter()
    if mode == "baseline":
        pass
    elif mode == "build-folder":
        with ScoreTableWriter(folder / "table") as writer:
            for ids, sizes, scores in chunks(num_items, mean_size):
                writer.add(ids, sizes, scores)
        out["version"] = writer.table.version
        out["sets"] = writer.table.num_sets
        out["index_mb"] = (
            sum(
                (folder / "table" / f).stat().st_size
                for f in ("set_ids.npy", "offsets.npy", "index_ids.npy", "index_pos.npy")
            )
            / 2**20
        )
    elif mode == "build-memory":
        parts = list(chunks(num_items, mean_size))
        ids = [s for p in parts for s in p[0]]
        sizes = np.concatenate([p[1] for p in parts])
        scores = np.concatenate([p[2] for p in parts])
        del parts
        table = ScoreTable(ids, np.concatenate([[0], np.cumsum(sizes)]), scores)
        table.save(folder / "table.npz")
        out["version"] = table.version
    elif mode in ("serve-folder", "serve-memory"):
        path = folder / ("table" if mode == "serve-folder" else "table.npz")
        table = ScoreTable.load(path)  # a folder: memory-mapped, checksum verified
        out["open_s"] = time.perf_counter() - t0
        out["subset_s"], out["record_bytes"] = serve(table, node_sets(table, node), repeats)
    else:
        raise SystemExit(f"unknown mode {mode}")
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def _run_child(
    mode: str, num_items: int, mean: int, folder: Path, args: argparse.Namespace
) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(num_items), str(mean), str(folder)]
    cmd += ["--node-sets", str(args.node_sets), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} {num_items}: failed\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _series(name: str, sizes: list[int], mean_of, tmp: Path, args) -> list[dict]:
    rows = []
    for n in sizes:
        mean = mean_of(n)
        folder = tmp / f"{name}-n{n}-m{mean}"
        folder.mkdir()
        row = {"items": n, "mean": mean}
        for mode in ("build-folder", "build-memory", "serve-folder", "serve-memory"):
            row[mode] = _run_child(mode, n, mean, folder, args)
            print(
                f"  {n:>11,} items, sets of {mean:>5} on average: {mode:<13} "
                f"{row[mode]['seconds']:7.2f}s  peak {row[mode]['peak_rss_mb']:7.1f} MB",
                file=sys.stderr,
            )
        if row["build-folder"]["version"] != row["build-memory"]["version"]:
            raise SystemExit(f"{n} items: the two paths built different tables")
        rows.append(row)
    return rows


def _report(title: str, rows: list[dict], base: float) -> None:
    print(f"\n{title}\n")
    head = (
        f"{'items':>11} {'sets':>8} {'scores MB':>9} {'index MB':>8} | "
        f"{'build s':>7} {'RSS MB':>7} {'old s':>6} {'old RSS':>7} | {'open s':>6} "
        f"{'subset ms':>9} {'RSS MB':>7} {'old ms':>7} {'old RSS':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        bf, bm, sf, sm = (
            r[m] for m in ("build-folder", "build-memory", "serve-folder", "serve-memory")
        )
        print(
            f"{r['items']:>11,} {bf['sets']:>8,} {r['items'] * 4 / 2**20:>9.1f} "
            f"{bf['index_mb']:>8.1f} | {bf['seconds']:>7.2f} {bf['peak_rss_mb'] - base:>7.1f} "
            f"{bm['seconds']:>6.2f} {bm['peak_rss_mb'] - base:>7.1f} | {sf['open_s']:>6.2f} "
            f"{sf['subset_s'] * 1e3:>9.2f} {sf['peak_rss_mb'] - base:>7.1f} "
            f"{sm['subset_s'] * 1e3:>7.2f} {sm['peak_rss_mb'] - base:>7.1f}"
        )
    if len(rows) < 2:
        return
    lo, hi = rows[0], rows[-1]

    def ratio(mode: str, key: str, minus: float = 0.0) -> float:
        return (hi[mode][key] - minus) / max(lo[mode][key] - minus, 1e-9)

    index = hi["build-folder"]["index_mb"] / lo["build-folder"]["index_mb"]
    print(
        f"ratios {hi['items']:,} / {lo['items']:,} items "
        f"(table {hi['items'] / lo['items']:.0f}x, index {index:.1f}x):"
    )
    print(
        f"  build peak RSS:  folder {ratio('build-folder', 'peak_rss_mb', base):6.1f}x   "
        f"memory {ratio('build-memory', 'peak_rss_mb', base):6.1f}x"
    )
    print(
        f"  serve peak RSS:  folder {ratio('serve-folder', 'peak_rss_mb', base):6.1f}x   "
        f"memory {ratio('serve-memory', 'peak_rss_mb', base):6.1f}x"
    )
    print(
        f"  subset time:     folder {ratio('serve-folder', 'subset_s'):6.2f}x   "
        f"memory {ratio('serve-memory', 'subset_s'):6.2f}x"
    )

    def above(mode: str) -> float:
        return hi[mode]["peak_rss_mb"] - base

    build = above("build-folder") / above("build-memory")
    served = above("serve-folder") / above("serve-memory")
    print(
        f"  at {hi['items']:,} items the folder path needs {build:.2f}x the memory of the old "
        f"path to build and {served:.2f}x to serve"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1e5,1e6,1e7", help="items per table, comma separated")
    p.add_argument("--node-sets", type=int, default=50, help="sets one node holds")
    p.add_argument("--repeats", type=int, default=30, help="subset calls timed per size")
    p.add_argument(
        "--fixed-sets",
        type=int,
        default=5000,
        help="also a series with this many sets whatever the size (0: skip)",
    )
    p.add_argument(
        "--child", nargs=4, metavar=("MODE", "ITEMS", "MEAN", "DIR"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.child:
        mode, items, mean, folder = args.child
        result = child(mode, int(items), int(mean), Path(folder), args.node_sets, args.repeats)
        print(json.dumps(result))
        return 0

    sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-table-scale-") as tmp:
        base = _run_child("baseline", 0, 1, Path(tmp), args)["peak_rss_mb"]
        grow = _series("grow", sizes, lambda n: 20, Path(tmp), args)
        fixed = []
        if args.fixed_sets:
            fixed = _series("fixed", sizes, lambda n: max(1, n // args.fixed_sets), Path(tmp), args)
    print(
        f"\nscore tables, float32; interpreter baseline {base:.1f} MB peak RSS; a node holds "
        f"{args.node_sets} sets; RSS = peak RSS above the baseline; old = whole table in "
        "memory, one .npz"
    )
    _report("sets of 20 items on average (the index grows with the table):", grow, base)
    if fixed:
        _report(
            f"{args.fixed_sets:,} sets whatever the size (the index stays the same; a node's "
            f"{args.node_sets} sets grow with the table's sets):",
            fixed,
            base,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
