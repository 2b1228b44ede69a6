"""Ranking, calibration and teacher-student agreement metrics over padded batches of sets.

Inputs are torch tensors ``scores [B, N]``, ``labels [B, N]`` and a boolean ``mask [B, N]`` (True
for real items); numpy arrays are accepted too. Per-set metrics return a float64 ``[B]`` tensor,
one value per set.

Conventions (the same in every function):

- Ranking: items are sorted by score, descending; **ties break by item order** (the earlier item
  ranks higher, a stable sort). Ranks start at 1.
- Masked items never count, whatever their scores or labels hold (padding content changes
  nothing).
- Gain ``2^y - 1``, discount ``1 / log2(1 + rank)``; an item is *relevant* when ``y > 0``.
  Labels are expected to be ``>= 0`` (binary or graded). ``dcg`` and ``ndcg`` take
  ``gain="linear"`` for gain ``y`` (trec_eval's and ir-measures' nDCG).
- A row with no real item is not a set: every per-set metric gives NaN for it.
- Undefined values are NaN (e.g. AUC of a set without both a positive and a negative item);
  :func:`ranking_summary` averages over the sets with a finite value.
- Sets without any relevant item: ``ndcg``, ``average_precision`` and ``mrr`` take
  ``empty="zero"`` (default; Rax, TF-Ranking, trec_eval), ``"one"`` (LightGBM, XGBoost,
  allRank) or ``"skip"`` (NaN, dropped by summaries).
- ``k=None`` means the whole set; ``k`` larger than a set means the whole set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedrank.common.errors import ConfigError

__all__ = [
    "EMPTY_CONVENTIONS",
    "ndcg",
    "dcg",
    "average_precision",
    "map",
    "mrr",
    "precision",
    "pairwise_accuracy",
    "auc",
    "log_loss",
    "expected_calibration_error",
    "kendall_tau",
    "spearman",
    "topk_overlap",
    "ranking_summary",
    "nanmean",
]

EMPTY_CONVENTIONS = ("zero", "one", "skip")
GAINS = ("exponential", "linear")  # 2^y - 1 (default) or y (trec_eval)
_PAIR_BUDGET = 1 << 22  # max B * N * N cells a pairwise metric materialises at once

Array = torch.Tensor | np.ndarray


# ---- helpers ------------------------------------------------------------------------------
def _as_tensor(x: Array, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise ValueError(f"{name} must be [B, N], got shape {tuple(t.shape)}")
    return t.detach().to(dtype)


def _prepare(
    scores: Array, other: Array, mask: Array, other_name: str = "labels"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 scores/other with masked entries zeroed, bool mask; shapes checked."""
    m = _as_tensor(mask, "mask", torch.bool)
    s = _as_tensor(scores, "scores", torch.float64)
    o = _as_tensor(other, other_name, torch.float64)
    if s.shape != m.shape or o.shape != m.shape:
        raise ValueError(
            f"scores {tuple(s.shape)}, {other_name} {tuple(o.shape)} and mask {tuple(m.shape)} "
            "must have the same shape"
        )
    zero = torch.zeros((), dtype=torch.float64, device=s.device)
    m = m.to(s.device)
    return torch.where(m, s, zero), torch.where(m, o.to(s.device), zero), m


def _check_k(k: int | None) -> None:
    if k is not None and (isinstance(k, bool) or int(k) != k or k < 1):
        raise ConfigError(f"metric cutoff k must be a positive integer or None, got {k!r}")


def _check_empty(empty: str) -> None:
    if empty not in EMPTY_CONVENTIONS:
        raise ConfigError(f"empty must be one of {list(EMPTY_CONVENTIONS)}, got {empty!r}")


def _order(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` item indices by rank: real items by score descending (ties: item order),
    then masked items."""
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)
    valid_first = torch.argsort(
        mask.gather(1, by_score).to(torch.int8), dim=1, descending=True, stable=True
    )
    return by_score.gather(1, valid_first)


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` 1-based rank of each item (inverse of :func:`_order`)."""
    b, n = order.shape
    positions = torch.arange(1, n + 1, device=order.device).expand(b, n)
    return torch.empty_like(order).scatter_(1, order, positions)


def _cutoff(n_valid: torch.Tensor, n: int, k: int | None) -> torch.Tensor:
    """``[B, N]`` bool: rank position ``j`` (0-based) lies within the top ``min(k, n_valid)``."""
    pos = torch.arange(n, device=n_valid.device)
    limit = n_valid if k is None else torch.clamp(n_valid, max=int(k))
    return pos[None, :] < limit[:, None]


def _discounts(n: int, device: torch.device) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(n, device=device, dtype=torch.float64) + 2.0)


def _finish(
    values: torch.Tensor,
    defined: torch.Tensor,
    n_valid: torch.Tensor,
    empty_value: float = math.nan,
) -> torch.Tensor:
    """``values`` where defined, ``empty_value`` elsewhere, NaN for rows without items."""
    fill = torch.full_like(values, empty_value)
    out = torch.where(defined, values, fill)
    return torch.where(n_valid > 0, out, torch.full_like(values, math.nan))


def _empty_value(empty: str) -> float:
    _check_empty(empty)
    return {"zero": 0.0, "one": 1.0, "skip": math.nan}[empty]


def _in_row_chunks(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a pairwise (``[B, N, N]``) metric over chunks of rows so memory stays bounded."""

    @functools.wraps(fn)
    def wrapper(a: Array, b: Array, mask: Array, *args: Any, **kwargs: Any) -> torch.Tensor:
        m = torch.as_tensor(mask)
        if m.dim() != 2:
            return fn(a, b, mask, *args, **kwargs)
        rows = max(1, _PAIR_BUDGET // max(1, m.shape[1] ** 2))
        if m.shape[0] <= rows:
            return fn(a, b, mask, *args, **kwargs)
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        parts = [
            fn(a[i : i + rows], b[i : i + rows], m[i : i + rows], *args, **kwargs)
            for i in range(0, m.shape[0], rows)
        ]
        return torch.cat(parts)

    return wrapper


def _pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, N, N]`` ordered pairs ``(i, j)``, ``i != j``, both real."""
    n = mask.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    return mask[:, :, None] & mask[:, None, :] & ~eye


# ---- relevance metrics --------------------------------------------------------------------
def _gains(y: torch.Tensor, m: torch.Tensor, gain: str) -> torch.Tensor:
    if gain not in GAINS:
        raise ConfigError(f"gain must be one of {list(GAINS)}, got {gain!r}")
    values = torch.exp2(y) - 1.0 if gain == "exponential" else y
    return torch.where(m, values, torch.zeros_like(y))


def dcg(
    scores: Array, labels: Array, mask: Array, k: int | None = None, gain: str = "exponential"
) -> torch.Tensor:
    """Discounted cumulative gain@k per set: ``sum_{rank<=k} (2^y - 1) / log2(1 + rank)``
    (``gain="linear"``: ``y`` instead of ``2^y - 1``)."""
    _check_k(k)
    s, y, m = _prepare(scores, labels, mask)
    n_valid = m.sum(1)
    order = _order(s, m)
    gains = _gains(y, m, gain).gather(1, order)
    cut = _cutoff(n_valid, s.shape[1], k)
    value = (gains * _discounts(s.shape[1], s.device) * cut).sum(1)
    return _finish(value, torch.ones_like(m[:, 0]), n_valid)


def ndcg(
    scores: Array,
    labels: Array,
    mask: Array,
    k: int | None = None,
    empty: str = "zero",
    gain: str = "exponential",
) -> torch.Tensor:
    """Normalised DCG@k per set: DCG@k divided by the DCG@k of the ideal order of the labels.

    ``empty`` is the value for a set without a relevant item (ideal DCG 0): ``"zero"``
    (default), ``"one"`` or ``"skip"`` (NaN; summaries drop it). ``gain`` is
    ``"exponential"`` (``2^y - 1``, default) or ``"linear"`` (``y``, as trec_eval).
    """
    _check_k(k)
    empty_value = _empty_value(empty)
    s, y, m = _prepare(scores, labels, mask)
    n, n_valid = s.shape[1], m.sum(1)
    gains = _gains(y, m, gain)
    disc = _discounts(n, s.device)
    cut = _cutoff(n_valid, n, k)
    actual = (gains.gather(1, _order(s, m)) * disc * cut).sum(1)
    ideal_gains = torch.sort(torch.where(m, gains, -math.inf), dim=1, descending=True).values
    ideal_gains = torch.where(torch.isfinite(ideal_gains), ideal_gains, 0.0)
    ideal = (ideal_gains * disc * cut).sum(1)
    defined = ideal > 0
    value = actual / torch.where(defined, ideal, torch.ones_like(ideal))
    return _finish(value, defined, n_valid, empty_value)


def average_precision(
    scores: Array, labels: Array, mask: Array, k: int | None = None, empty: str = "zero"
) -> torch.Tensor:
    """Average precision@k per set (relevant: ``y > 0``).

    ``sum_{rank<=k, relevant} precision@rank / min(R, k)`` with ``R`` relevant items in the set
    (``R`` when ``k`` is None). ``empty`` handles sets with ``R == 0`` as in :func:`ndcg`.
    """
    _check_k(k)
    empty_value = _empty_value(empty)
    s, y, m = _prepare(scores, labels, mask)
    n, n_valid = s.shape[1], m.sum(1)
    rel = ((y > 0) & m).to(torch.float64)
    rel_sorted = rel.gather(1, _order(s, m)) * _cutoff(n_valid, n, k)
    hits = torch.cumsum(rel_sorted, dim=1)
    positions = torch.arange(1, n + 1, device=s.device, dtype=torch.float64)
    num_rel = rel.sum(1)
    denom = num_rel if k is None else torch.clamp(num_rel, max=float(k))
    defined = num_rel > 0
    value = (hits / positions * rel_sorted).sum(1) / torch.where(defined, denom, 1.0)
    return _finish(value, defined, n_valid, empty_value)


map = average_precision  # noqa: A001 - the metric's conventional name


def mrr(
    scores: Array, labels: Array, mask: Array, k: int | None = None, empty: str = "zero"
) -> torch.Tensor:
    """Reciprocal rank of the first relevant item (``y > 0``) within the top ``k``, else 0.

    ``empty`` handles sets without a relevant item as in :func:`ndcg`.
    """
    _check_k(k)
    empty_value = _empty_value(empty)
    s, y, m = _prepare(scores, labels, mask)
    n, n_valid = s.shape[1], m.sum(1)
    rel = (y > 0) & m
    rel_sorted = rel.gather(1, _order(s, m)) & _cutoff(n_valid, n, k)
    positions = torch.arange(1, n + 1, device=s.device, dtype=torch.float64)
    value = (rel_sorted / positions).amax(1) if n else torch.zeros_like(n_valid, dtype=s.dtype)
    return _finish(value, rel.any(1), n_valid, empty_value)


def precision(scores: Array, labels: Array, mask: Array, k: int | None = None) -> torch.Tensor:
    """Fraction of relevant items (``y > 0``) among the top ``min(k, N)`` items of the set."""
    _check_k(k)
    s, y, m = _prepare(scores, labels, mask)
    n, n_valid = s.shape[1], m.sum(1)
    rel_sorted = ((y > 0) & m).gather(1, _order(s, m)) & _cutoff(n_valid, n, k)
    top = n_valid if k is None else torch.clamp(n_valid, max=int(k))
    value = rel_sorted.sum(1).double() / torch.clamp(top, min=1)
    return _finish(value.to(torch.float64), torch.ones_like(m[:, 0]), n_valid)


@_in_row_chunks
def pairwise_accuracy(
    scores: Array, labels: Array, mask: Array, k: int | None = None
) -> torch.Tensor:
    """Fraction of item pairs with different labels that the scores order correctly.

    A pair ``y_i > y_j`` is correct when ``i`` ranks above ``j`` (score ties break by item
    order). With ``k``, only pairs with at least one item in the top ``k`` count. NaN for a set
    without such a pair.
    """
    _check_k(k)
    s, y, m = _prepare(scores, labels, mask)
    n_valid = m.sum(1)
    ranks = _ranks(_order(s, m))
    pairs = _pair_mask(m) & (y[:, :, None] > y[:, None, :])
    if k is not None:
        pairs &= (ranks[:, :, None] <= k) | (ranks[:, None, :] <= k)
    correct = (pairs & (ranks[:, :, None] < ranks[:, None, :])).sum((1, 2))
    total = pairs.sum((1, 2))
    value = correct.double() / torch.clamp(total, min=1)
    return _finish(value.to(torch.float64), total > 0, n_valid)


def auc(scores: Array, labels: Array, mask: Array) -> torch.Tensor:
    """Per-set ROC AUC with labels binarised ``y > 0``: the fraction of (positive, negative)
    pairs where the positive ranks above the negative (score ties break by item order, like
    every metric here). NaN for a set without both a positive and a negative item."""
    _, y, m = _prepare(scores, labels, mask)
    return pairwise_accuracy(scores, (y > 0).to(torch.float64), m)


# ---- calibration --------------------------------------------------------------------------
def log_loss(scores: Array, labels: Array, mask: Array) -> torch.Tensor:
    """Per-set mean binary cross-entropy of ``sigmoid(scores)`` against ``y > 0``.

    Scores are logits (computed stably, so huge logits stay finite). NaN for rows without items.
    """
    s, y, m = _prepare(scores, labels, mask)
    n_valid = m.sum(1)
    target = (y > 0).to(torch.float64)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(s, target, reduction="none")
    value = (loss * m).sum(1) / torch.clamp(n_valid, min=1)
    return _finish(value, torch.ones_like(m[:, 0]), n_valid)


def expected_calibration_error(
    scores: Array, labels: Array, mask: Array, n_bins: int = 10
) -> torch.Tensor:
    """**Global** expected calibration error over all real items of the batch (a 0-d tensor).

    ``p = sigmoid(score)`` in ``n_bins`` equal-width bins on [0, 1] (``p == 1`` falls in the last
    bin); ``ECE = sum_b (n_b / n) |mean(y > 0 in b) - mean(p in b)|``. NaN without items.
    """
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins!r}")
    s, y, m = _prepare(scores, labels, mask)
    p = torch.sigmoid(s[m])
    target = (y[m] > 0).to(torch.float64)
    if p.numel() == 0:
        return torch.tensor(math.nan, dtype=torch.float64)
    bins = torch.clamp((p * n_bins).floor().long(), 0, n_bins - 1)
    # sum_b (n_b / n) |mean_b(y) - mean_b(p)| = sum_b |sum_b(y) - sum_b(p)| / n
    conf = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, bins, p)
    acc = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, bins, target)
    return (acc - conf).abs().sum() / p.numel()


# ---- teacher-student agreement ------------------------------------------------------------
@_in_row_chunks
def kendall_tau(student: Array, teacher: Array, mask: Array) -> torch.Tensor:
    """Per-set Kendall tau-b between student and teacher scores.

    ``tau_b = sum_{i<j} sign(s_i - s_j) sign(t_i - t_j) / sqrt(P_s P_t)`` where ``P_s`` (``P_t``)
    counts the pairs not tied in the student (teacher) scores: tied scores count as ties here
    (they are not broken by item order). NaN for a set where either side has all items tied
    (e.g. a single item).
    """
    s, t, m = _prepare(student, teacher, mask, "teacher")
    n_valid = m.sum(1)
    upper = torch.triu(torch.ones(s.shape[1], s.shape[1], dtype=torch.bool, device=s.device), 1)
    pairs = (m[:, :, None] & m[:, None, :] & upper).to(torch.float64)
    ds = torch.sign(s[:, :, None] - s[:, None, :]) * pairs
    dt = torch.sign(t[:, :, None] - t[:, None, :]) * pairs
    denom = torch.sqrt(ds.abs().sum((1, 2)) * dt.abs().sum((1, 2)))
    defined = denom > 0
    value = (ds * dt).sum((1, 2)) / torch.where(defined, denom, 1.0)
    return _finish(value, defined, n_valid)


def _average_ranks(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """1-based ranks by value ascending among real items, ties get their average rank."""
    pairs = (m[:, None, :] & m[:, :, None]).to(torch.float64)
    below = ((x[:, None, :] < x[:, :, None]) * pairs).sum(2)
    equal = ((x[:, None, :] == x[:, :, None]) * pairs).sum(2)  # includes the item itself
    return below + (equal + 1.0) / 2.0


@_in_row_chunks
def spearman(student: Array, teacher: Array, mask: Array) -> torch.Tensor:
    """Per-set Spearman rank correlation (Pearson correlation of average ranks; tied scores
    share their average rank). NaN when either side has all items tied."""
    s, t, m = _prepare(student, teacher, mask, "teacher")
    n_valid = m.sum(1)
    w = m.to(torch.float64)
    count = torch.clamp(n_valid, min=1).to(torch.float64)
    rs, rt = _average_ranks(s, m), _average_ranks(t, m)
    rs = (rs - (rs * w).sum(1, keepdim=True) / count[:, None]) * w
    rt = (rt - (rt * w).sum(1, keepdim=True) / count[:, None]) * w
    denom = torch.sqrt((rs * rs).sum(1) * (rt * rt).sum(1))
    defined = denom > 1e-12
    value = (rs * rt).sum(1) / torch.where(defined, denom, 1.0)
    return _finish(value, defined, n_valid)


def topk_overlap(student: Array, teacher: Array, mask: Array, k: int = 10) -> torch.Tensor:
    """Per-set ``|top-k(student) ∩ top-k(teacher)| / min(k, N)`` (ties break by item order)."""
    _check_k(k)
    s, t, m = _prepare(student, teacher, mask, "teacher")
    n_valid = m.sum(1)
    top = torch.clamp(n_valid, max=int(k))
    in_s = _ranks(_order(s, m)) <= top[:, None]
    in_t = _ranks(_order(t, m)) <= top[:, None]
    value = (in_s & in_t & m).sum(1).double() / torch.clamp(top, min=1)
    return _finish(value.to(torch.float64), torch.ones_like(m[:, 0]), n_valid)


# ---- summary ------------------------------------------------------------------------------
def nanmean(values: torch.Tensor) -> float:
    """Mean of the finite entries (NaN if there are none)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    v = v[torch.isfinite(v)]
    return float(v.mean()) if v.numel() else math.nan


def ranking_summary(
    scores: Array,
    labels: Array,
    mask: Array,
    teacher: Array | None = None,
    ks: Sequence[int] = (1, 5, 10),
    empty: str = "zero",
) -> dict[str, float | str]:
    """Metrics averaged over the sets of a batch (sets with an undefined value are dropped).

    Keys: ``ndcg@k`` for each ``k`` in ``ks``, ``map``, ``mrr``, ``precision@K``, ``auc``,
    ``pairwise_accuracy``, ``log_loss`` (mean of per-set means), ``ece`` (global, 10 bins) and,
    with ``teacher``, ``kendall_tau``, ``spearman``, ``topk_overlap@K``, where ``K = max(ks)``;
    plus ``ndcg_empty`` naming the convention for sets without a relevant item (it applies to
    ndcg, map and mrr).
    """
    _check_empty(empty)
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ConfigError("ks must name at least one cutoff")
    for k in ks:
        _check_k(k)
    big = max(ks)
    out: dict[str, float | str] = {}
    for k in ks:
        out[f"ndcg@{k}"] = nanmean(ndcg(scores, labels, mask, k, empty=empty))
    out["map"] = nanmean(average_precision(scores, labels, mask, empty=empty))
    out["mrr"] = nanmean(mrr(scores, labels, mask, empty=empty))
    out[f"precision@{big}"] = nanmean(precision(scores, labels, mask, big))
    out["pairwise_accuracy"] = nanmean(pairwise_accuracy(scores, labels, mask))
    out["auc"] = nanmean(auc(scores, labels, mask))
    out["log_loss"] = nanmean(log_loss(scores, labels, mask))
    out["ece"] = float(expected_calibration_error(scores, labels, mask))
    if teacher is not None:
        out["kendall_tau"] = nanmean(kendall_tau(scores, teacher, mask))
        out["spearman"] = nanmean(spearman(scores, teacher, mask))
        out[f"topk_overlap@{big}"] = nanmean(topk_overlap(scores, teacher, mask, big))
    out["ndcg_empty"] = empty
    return out
