"""The exported student against the teacher on the same sets: size, speed, and exactness.

    python benchmarks/bench_export.py [--data ../shared/data/MQ2008/Fold1] [--epochs 3]

Trains a teacher (the server's set-aware model, default size of a run) and a student (the
default device student) on the fold's training sets for a few epochs, exports the student to
safetensors and ONNX with ``fedrank.client.export`` (and to TorchScript, which fedrank writes for
other runtimes but never loads: file size only) and measures, on the fold's test sets:

- parameters and file size (teacher: its saved state dict; student: each export file);
- scoring latency per set, one set at a time on one thread (what a device does), for the
  teacher and for the student in memory, as loaded from safetensors (rebuilt from the spec)
  and with ONNX Runtime; the load time of each file; ratios;
- NDCG@10 of each exported student against the in-memory student (must be equal).

Prints one table with ratios measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedrank.client.export import export_student  # noqa: E402
from fedrank.client.student_files import load_exported  # noqa: E402
from fedrank.common.evaluation import mean_ndcg  # noqa: E402
from fedrank.common.letor import read_letor_folder  # noqa: E402
from fedrank.common.models import StudentModel, count_parameters, score_sets  # noqa: E402


def _train_student(model: StudentModel, sets, epochs: int, seed: int = 0) -> None:
    from fedrank.common.losses import CompositeLoss, LossTerm

    loss = CompositeLoss(
        [
            LossTerm("rank_label", "label_softmax", 1.0, {}),
            LossTerm("label", "label_sigmoid_ce", 0.2, {}),
        ]
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for epoch in range(epochs):
        for positions in sets.batch_positions(16, shuffle=True, seed=seed + epoch):
            batch = sets.pad(positions)
            total, _ = loss(model(batch.features, batch.mask), batch.labels, None, batch.mask)
            opt.zero_grad()
            total.backward()
            opt.step()
    model.eval()


def _per_set_latency(score_one, sets, repeats: int) -> float:
    """Median over sets of the mean seconds to score one set (padded to its own size)."""
    batches = [sets.pad(np.array([k])) for k in range(sets.num_sets)]
    for b in batches[:5]:  # warm-up
        score_one(b)
    times = []
    for b in batches:
        t0 = time.perf_counter()
        for _ in range(repeats):
            score_one(b)
        times.append((time.perf_counter() - t0) / repeats)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "MQ2008" / "Fold1"))
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of both models")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per set")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    splits = read_letor_folder(args.data)
    train, test = splits["train"], splits.get("test", splits["train"])
    num_features = train.num_features

    from fedrank.server.teacher import TeacherConfig, train_teacher

    teacher_cfg = TeacherConfig(epochs=args.epochs, patience=args.epochs, seed=0)
    teacher = train_teacher(train, splits.get("vali"), teacher_cfg, progress=False).model.eval()
    student = StudentModel(num_features, hidden=(16,))
    _train_student(student, train, args.epochs)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        teacher_file = folder / "teacher.pt"
        torch.save({k: v.detach().cpu() for k, v in teacher.state_dict().items()}, teacher_file)
        files = {"safetensors": folder / "student.safetensors", "onnx": folder / "student.onnx"}
        exported, load_ms = {}, {}
        for fmt, path in files.items():
            export_student(student, path, fmt)
            t0 = time.perf_counter()
            exported[fmt] = load_exported(path)
            load_ms[fmt] = 1000 * (time.perf_counter() - t0)
        write_only = folder / "student.pt"
        export_student(student, write_only, "torchscript")
        t0 = time.perf_counter()  # the old scoring path, for comparison (we wrote this file)
        torch.jit.load(str(write_only))
        load_ms["torchscript via torch.jit.load (old path)"] = 1000 * (time.perf_counter() - t0)

        in_memory = score_sets(student, test)
        ndcg_mem = mean_ndcg(test, in_memory)["ndcg@10"]
        ndcg_teacher = mean_ndcg(test, score_sets(teacher, test))["ndcg@10"]
        ndcg_exp, max_diff = {}, {}
        for fmt, model in exported.items():
            flat = model.score_sets(test)
            ndcg_exp[fmt] = mean_ndcg(test, flat)["ndcg@10"]
            max_diff[fmt] = float(np.max(np.abs(flat - in_memory)))

        def torch_scorer(model):
            def run(batch):
                with torch.inference_mode():
                    return model(batch.features, batch.mask)

            return run

        def exported_scorer(model):
            return lambda batch: model.score_padded(batch.features.numpy())

        latency = {
            "teacher (torch)": _per_set_latency(torch_scorer(teacher), test, args.repeats),
            "student (torch)": _per_set_latency(torch_scorer(student), test, args.repeats),
        }
        for fmt, model in exported.items():
            latency[f"student ({fmt})"] = _per_set_latency(
                exported_scorer(model), test, args.repeats
            )
        sizes = {
            "teacher (state dict)": teacher_file.stat().st_size,
            **{f"student ({fmt})": p.stat().st_size for fmt, p in files.items()},
            "student (torchscript, write-only)": write_only.stat().st_size,
        }

    params_t, params_s = count_parameters(teacher), count_parameters(student)
    print(
        f"data: {args.data} test split, {test.num_sets} sets, {test.num_items} items, "
        f"{num_features} features; 1 thread; latency = median over sets of one-set calls"
    )
    print(f"{'model':<24}{'parameters':>12}{'file bytes':>14}{'ms per set':>12}{'vs teacher':>12}")
    t_lat = latency["teacher (torch)"]
    for name in latency:
        params = params_t if name.startswith("teacher") else params_s
        size_key = "teacher (state dict)" if name.startswith("teacher") else name
        size = sizes.get(size_key)
        size_text = f"{size:,}" if size is not None else "-"
        print(
            f"{name:<24}{params:>12,}{size_text:>14}{1000 * latency[name]:>12.3f}"
            f"{t_lat / latency[name]:>11.1f}x"
        )
    print(
        "student (torchscript, write-only): "
        f"{sizes['student (torchscript, write-only)']:,} bytes (never loaded by fedrank)"
    )
    print("load time: " + ", ".join(f"{fmt} {ms:.1f} ms" for fmt, ms in load_ms.items()))
    print(f"parameters: teacher / student = {params_t / params_s:.1f}x")
    for fmt in files:
        print(
            f"file size: teacher state dict / student {fmt} = "
            f"{sizes['teacher (state dict)'] / sizes[f'student ({fmt})']:.1f}x"
        )
    print(
        f"NDCG@10 on the test sets: teacher {ndcg_teacher:.4f}, student in memory "
        f"{ndcg_mem:.4f}, " + ", ".join(f"exported {f} {v:.4f}" for f, v in ndcg_exp.items())
    )
    for fmt in files:
        same = abs(ndcg_exp[fmt] - ndcg_mem) < 1e-9
        print(
            f"exported {fmt} == in-memory: {'yes' if same else 'NO'} "
            f"(NDCG@10 difference {ndcg_exp[fmt] - ndcg_mem:+.2e}, max |score diff| "
            f"{max_diff[fmt]:.2e})"
        )
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
