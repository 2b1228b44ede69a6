"""Does the reported DP epsilon hold? The sensitivity of the release, measured.

For pairs of neighbouring rounds (the same sampled clients, one client's reply present in one
and absent in the other: it crashed, timed out or was rejected), this measures how far the
noise-free release moves, ``delta = ||release(D) - release(D')||``, next to the noise std the
server adds, and turns their ratio into the noise multiplier the mechanism really has,
``sigma_eff = min(std) / delta`` over the pairs. The true epsilon is that of ``sigma_eff``;
the reported one that of the configured sigma.

- **before**: the clipped updates averaged over the ``m`` valid replies, noise
  ``sigma * C / m`` (the old code path, reproduced here: it is gone from the server);
- **after**: the real :class:`fedrank.server.privacy.FedrankDPFixedClipping` around the real FedAvg
  strategy: sum of clipped updates over the fixed ``n`` sampled clients, noise
  ``sigma * C / n``.

    python benchmarks/bench_dp_accounting.py               # sigma 1, 5 rounds, n = 10
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.differential_privacy import compute_stdv  # noqa: E402

from fedrank.common.config import FedrankConfig  # noqa: E402
from fedrank.common.reply_schema import TRAIN_METRICS  # noqa: E402
from fedrank.server.client_weights import make_policy  # noqa: E402
from fedrank.server.nodes import NodeRegistry  # noqa: E402
from fedrank.server.privacy import DPSettings, epsilon, wrap_strategy  # noqa: E402
from fedrank.server.strategy import build_strategy  # noqa: E402

DIM = 64


def _reply(node: int, weights: np.ndarray) -> Message:
    metrics = {**dict.fromkeys(TRAIN_METRICS.required, 1), "num_examples": 10}
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(weights)}), "metrics": MetricRecord(metrics)}
    )
    meta = Metadata(
        run_id=1,
        message_id=f"reply-{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"ins-{node}",
        group_id="1",
        created_at=0.0,
        ttl=60,
        message_type="train",
    )
    return Message(content, metadata=meta)


def _clip(u: np.ndarray, c: float) -> np.ndarray:
    norm = float(np.linalg.norm(u))
    return u * min(1.0, c / norm) if norm > 0 else u


def release_before(updates: list[np.ndarray], c: float, sigma: float) -> tuple[np.ndarray, float]:
    """The old release: mean over the valid replies, noise sized for their number."""
    clipped = [_clip(u, c) for u in updates]
    return np.mean(clipped, axis=0), sigma * c / len(clipped)


def release_after(
    updates: list[np.ndarray], c: float, sigma: float, n: int
) -> tuple[np.ndarray, float]:
    """The server's release (noise-free part) and its noise std, through the real wrapper."""
    cfg = FedrankConfig.from_run_config({"min-available-nodes": 1})
    nodes = NodeRegistry({})
    for node in range(1, n + 1):
        info = nodes.node(node)
        info.confirmed, info.num_sets, info.num_train_sets = True, 10, 10
    inner = build_strategy(cfg, make_policy(cfg), nodes)
    base = ArrayRecord({"w": Array(np.zeros(DIM, np.float64))})
    inner.global_arrays = base
    # a negligible noise multiplier exposes the noise-free release
    dp = wrap_strategy(inner, DPSettings(noise_multiplier=1e-12, clipping_norm=c), n)
    dp.current_arrays = base
    replies = [_reply(i + 1, u) for i, u in enumerate(updates)]
    arrays, _ = dp.aggregate_train(1, replies)
    return np.asarray(arrays["w"].numpy(), np.float64), compute_stdv(sigma, c, n)


def neighbours(n: int, c: float, rng: np.random.Generator) -> list[tuple[list, list]]:
    """(D, D') pairs of valid replies among n sampled clients; D' has one reply more."""
    u = rng.normal(size=DIM)
    u *= c / np.linalg.norm(u)
    pairs = [
        ([u] * (n - 1), [u] * (n - 1) + [-u]),  # all agree; the extra one opposes them
        ([u], [u, -u]),  # low participation: one reply, or two that cancel
        ([u] * (n // 2), [u] * (n // 2) + [-u]),
    ]
    for _ in range(20):  # random directions and lengths (clipped to C)
        k = int(rng.integers(1, n))
        updates = [rng.normal(size=DIM) * rng.uniform(0.1, 3.0) for _ in range(k + 1)]
        pairs.append((updates[:k], updates))
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10, help="sampled clients per round")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    rng = np.random.default_rng(0)
    pairs = neighbours(args.clients, args.clip, rng)
    effective = {}
    for name in ("before", "after"):
        worst = math.inf
        for d, d2 in pairs:
            if name == "before":
                (a, s1), (b, s2) = (release_before(x, args.clip, args.sigma) for x in (d, d2))
            else:
                (a, s1), (b, s2) = (
                    release_after(x, args.clip, args.sigma, args.clients) for x in (d, d2)
                )
            moved = float(np.linalg.norm(a - b))
            if moved > 0:
                worst = min(worst, min(s1, s2) / moved)
        effective[name] = worst
    reported = epsilon(args.sigma, args.rounds, args.delta)
    print(
        f"sigma {args.sigma:g}, C {args.clip:g}, {args.clients} sampled clients, "
        f"{args.rounds} rounds, delta {args.delta:g}; {len(pairs)} neighbouring pairs\n"
    )
    print(f"{'':<8} {'effective sigma':>16} {'true epsilon':>13} {'reported':>9} {'ratio':>6}")
    for name, sigma_eff in effective.items():
        true = epsilon(sigma_eff, args.rounds, args.delta)
        print(
            f"{name:<8} {sigma_eff:>16.3f} {true:>13.2f} {reported:>9.2f} {true / reported:>6.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
