"""Metrics against brute-force reference implementations, hand-computed cases and conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrank.common import metrics as M
from fedrank.common.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- brute-force references (one set: python lists of the real items only) ----------------


def ref_order(s: list[float]) -> list[int]:
    # Python's sort is stable: descending score, ties by item order
    return sorted(range(len(s)), key=lambda i: -s[i])


def ref_dcg(s, y, k=None):
    order = ref_order(s)[: k or len(s)]
    return sum((2.0 ** y[i] - 1.0) / math.log2(2 + r) for r, i in enumerate(order))


def ref_ndcg(s, y, k=None, empty="zero"):
    ideal = sorted(y, reverse=True)[: k or len(y)]
    idcg = sum((2.0**g - 1.0) / math.log2(2 + r) for r, g in enumerate(ideal))
    if idcg <= 0:
        return {"zero": 0.0, "one": 1.0, "skip": math.nan}[empty]
    return ref_dcg(s, y, k) / idcg


def ref_ap(s, y, k=None):
    num_rel = sum(v > 0 for v in y)
    if num_rel == 0:
        return 0.0
    hits, total = 0, 0.0
    for r, i in enumerate(ref_order(s)[: k or len(s)], start=1):
        if y[i] > 0:
            hits += 1
            total += hits / r
    return total / (num_rel if k is None else min(num_rel, k))


def ref_mrr(s, y, k=None):
    if not any(v > 0 for v in y):
        return 0.0
    for r, i in enumerate(ref_order(s)[: k or len(s)], start=1):
        if y[i] > 0:
            return 1.0 / r
    return 0.0


def ref_precision(s, y, k=None):
    top = ref_order(s)[: k or len(s)]
    return sum(y[i] > 0 for i in top) / len(top)


def ref_pairwise(s, y, k=None):
    rank = {i: r for r, i in enumerate(ref_order(s), start=1)}
    good = total = 0
    for i in range(len(s)):
        for j in range(len(s)):
            if y[i] > y[j] and (k is None or rank[i] <= k or rank[j] <= k):
                total += 1
                good += rank[i] < rank[j]
    return good / total if total else math.nan


def ref_kendall_b(s, t):
    num = ns = nt = 0
    for i in range(len(s)):
        for j in range(i + 1, len(s)):
            a = np.sign(s[i] - s[j])
            b = np.sign(t[i] - t[j])
            num += a * b
            ns += a != 0
            nt += b != 0
    return num / math.sqrt(ns * nt) if ns and nt else math.nan


def ref_avg_ranks(x):
    return [
        1 + sum(v < x[i] for v in x) + (sum(v == x[i] for v in x) - 1) / 2 for i in range(len(x))
    ]


def ref_spearman(s, t):
    a, b = np.array(ref_avg_ranks(s)), np.array(ref_avg_ranks(t))
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 1e-12 else math.nan


def ref_topk(s, t, k):
    kk = min(k, len(s))
    return len(set(ref_order(s)[:kk]) & set(ref_order(t)[:kk])) / kk


def ref_log_loss(s, y):
    out = 0.0
    for v, lab in zip(s, y, strict=True):
        p = 1 / (1 + math.exp(-v))
        out += -math.log(p) if lab > 0 else -math.log(1 - p)
    return out / len(s)


# ---- random ragged batches ----------------------------------------------------------------


@st.composite
def ragged(draw, max_sets=5, max_items=7):
    """Sets of real items (scores with deliberate ties, graded labels, teacher scores) plus a
    padded batch whose padding holds garbage and whose real items are not always a prefix."""
    n_sets = draw(st.integers(1, max_sets))
    sets = []
    for _ in range(n_sets):
        n = draw(st.integers(1, max_items))
        s = draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.5]), min_size=n, max_size=n))
        y = draw(st.lists(st.sampled_from([0.0, 0.0, 1.0, 2.0]), min_size=n, max_size=n))
        t = draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=n, max_size=n))
        sets.append((s, y, t))
    width = max(len(s) for s, _, _ in sets) + draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    return sets, width, seed


def pad(sets, width, seed):
    rng = np.random.default_rng(seed)
    b = len(sets)
    scores = rng.normal(size=(b, width)) * 100
    labels = rng.integers(0, 5, size=(b, width)).astype(float)
    teacher = rng.normal(size=(b, width)) * 100
    mask = np.zeros((b, width), bool)
    for r, (s, y, t) in enumerate(sets):
        slots = np.sort(rng.choice(width, size=len(s), replace=False))  # keeps item order
        scores[r, slots], labels[r, slots], teacher[r, slots] = s, y, t
        mask[r, slots] = True
    return (torch.tensor(scores), torch.tensor(labels), torch.tensor(teacher), torch.tensor(mask))


def close(a, b):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-9


CHECKS = settings(max_examples=40, deadline=None)


@CHECKS
@given(ragged(), st.sampled_from([None, 1, 3, 5]))
def test_relevance_metrics_match_brute_force(data, k):
    sets, width, seed = data
    s, y, _, m = pad(sets, width, seed)
    got = {
        "dcg": M.dcg(s, y, m, k),
        "ndcg": M.ndcg(s, y, m, k),
        "ap": M.average_precision(s, y, m, k),
        "mrr": M.mrr(s, y, m, k),
        "precision": M.precision(s, y, m, k),
        "pairwise": M.pairwise_accuracy(s, y, m, k),
    }
    for r, (ss, yy, _) in enumerate(sets):
        want = {
            "dcg": ref_dcg(ss, yy, k),
            "ndcg": ref_ndcg(ss, yy, k),
            "ap": ref_ap(ss, yy, k),
            "mrr": ref_mrr(ss, yy, k),
            "precision": ref_precision(ss, yy, k),
            "pairwise": ref_pairwise(ss, yy, k),
        }
        for name, value in want.items():
            assert close(float(got[name][r]), value), (name, r, ss, yy, k)


@CHECKS
@given(ragged())
def test_auc_logloss_agreement_match_brute_force(data):
    sets, width, seed = data
    s, y, t, m = pad(sets, width, seed)
    got_auc, got_ll = M.auc(s, y, m), M.log_loss(s, y, m)
    tau, rho = M.kendall_tau(s, t, m), M.spearman(s, t, m)
    overlap = M.topk_overlap(s, t, m, 3)
    for r, (ss, yy, tt) in enumerate(sets):
        binary = [float(v > 0) for v in yy]
        assert close(float(got_auc[r]), ref_pairwise(ss, binary))
        assert abs(float(got_ll[r]) - ref_log_loss(ss, yy)) < 1e-9
        assert close(float(tau[r]), ref_kendall_b(ss, tt))
        assert close(float(rho[r]), ref_spearman(ss, tt))
        assert close(float(overlap[r]), ref_topk(ss, tt, 3))


@CHECKS
@given(ragged())
def test_padding_content_changes_nothing(data):
    sets, width, seed = data
    s1, y1, t1, m = pad(sets, width, seed)
    s2, y2, t2, _ = pad(sets, width, seed + 1)  # other garbage in the padding (other slots too)
    # compare on the *same* slots: rebuild the second batch with m's layout
    s2 = torch.where(m, s1, s2 * 7 + 3)
    y2 = torch.where(m, y1, y2 + 1)
    t2 = torch.where(m, t1, -t2)
    a = M.ranking_summary(s1, y1, m, teacher=t1)
    b = M.ranking_summary(s2, y2, m, teacher=t2)
    for key in a:
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key
    for fn in (M.ndcg, M.average_precision, M.mrr, M.precision, M.pairwise_accuracy, M.auc):
        torch.testing.assert_close(fn(s1, y1, m), fn(s2, y2, m), equal_nan=True)


@CHECKS
@given(ragged(max_sets=8))
def test_ece_matches_brute_force(data):
    sets, width, seed = data
    s, y, _, m = pad(sets, width, seed)
    p = [1 / (1 + math.exp(-v)) for ss, _, _ in sets for v in ss]
    lab = [float(v > 0) for _, yy, _ in sets for v in yy]
    bins: dict[int, list[int]] = {}
    for i, v in enumerate(p):
        bins.setdefault(min(int(v * 5), 4), []).append(i)
    want = sum(
        len(ix) / len(p) * abs(np.mean([lab[i] for i in ix]) - np.mean([p[i] for i in ix]))
        for ix in bins.values()
    )
    assert abs(float(M.expected_calibration_error(s, y, m, n_bins=5)) - want) < 1e-9


# ---- hand-computed cases ------------------------------------------------------------------


def one(values, labels=None, mask=None):
    s = torch.tensor([values], dtype=torch.float64)
    y = torch.tensor([labels if labels is not None else [0.0] * len(values)], dtype=torch.float64)
    m = torch.ones_like(s, dtype=torch.bool) if mask is None else torch.tensor([mask])
    return s, y, m


def test_hand_computed_ndcg_map_mrr():
    # order by score: item2 (y=0), item0 (y=2), item1 (y=1)
    s, y, m = one([0.5, 0.1, 0.9], [2.0, 1.0, 0.0])
    dcg = 3 / math.log2(3) + 1 / math.log2(4)
    idcg = 3 / math.log2(2) + 1 / math.log2(3)
    assert float(M.dcg(s, y, m)[0]) == pytest.approx(dcg)
    assert float(M.ndcg(s, y, m)[0]) == pytest.approx(dcg / idcg)
    assert float(M.ndcg(s, y, m, k=1)[0]) == 0.0
    assert float(M.ndcg(s, y, m, k=2)[0]) == pytest.approx((3 / math.log2(3)) / idcg)
    assert float(M.average_precision(s, y, m)[0]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert float(M.mrr(s, y, m)[0]) == pytest.approx(0.5)
    assert float(M.mrr(s, y, m, k=1)[0]) == 0.0
    assert float(M.precision(s, y, m, k=2)[0]) == pytest.approx(0.5)
    assert float(M.precision(s, y, m, k=10)[0]) == pytest.approx(2 / 3)  # k > N: whole set
    # pairs (0>1), (0>2), (1>2): only (0>1) is ordered correctly
    assert float(M.pairwise_accuracy(s, y, m)[0]) == pytest.approx(1 / 3)
    assert float(M.auc(s, y, m)[0]) == 0.0  # the one negative ranks above both positives


def test_empty_set_conventions():
    s, y, m = one([0.3, 0.2, 0.1], [0.0, 0.0, 0.0])
    assert float(M.ndcg(s, y, m)[0]) == 0.0
    assert float(M.ndcg(s, y, m, empty="one")[0]) == 1.0
    assert math.isnan(float(M.ndcg(s, y, m, empty="skip")[0]))
    assert float(M.average_precision(s, y, m)[0]) == 0.0
    assert float(M.mrr(s, y, m, empty="one")[0]) == 1.0
    # summary drops skipped sets: a perfect set + an empty set
    s2 = torch.tensor([[0.3, 0.2, 0.1], [0.3, 0.2, 0.1]])
    y2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    m2 = torch.ones(2, 3, dtype=torch.bool)
    assert M.ranking_summary(s2, y2, m2, empty="zero")["ndcg@10"] == pytest.approx(0.5)
    assert M.ranking_summary(s2, y2, m2, empty="one")["ndcg@10"] == pytest.approx(1.0)
    skip = M.ranking_summary(s2, y2, m2, empty="skip")
    assert skip["ndcg@10"] == pytest.approx(1.0) and skip["ndcg_empty"] == "skip"
    with pytest.raises(ConfigError, match="empty"):
        M.ndcg(s, y, m, empty="nan")


def test_rows_without_items_and_undefined_values_are_nan():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    m = torch.tensor([[True, True], [False, False]])
    for fn in (M.ndcg, M.dcg, M.average_precision, M.mrr, M.precision, M.log_loss):
        assert math.isnan(float(fn(s, y, m)[1])), fn.__name__
    assert math.isnan(float(M.auc(s, y, m)[0]))  # no negative item
    assert math.isnan(float(M.pairwise_accuracy(s, y, m)[0]))  # no label difference
    assert math.isnan(float(M.kendall_tau(s, s, m)[1]))
    one_item = torch.tensor([[True, False], [False, False]])
    assert math.isnan(float(M.spearman(s, s, one_item)[0]))


def test_ties_break_by_item_order():
    s, y, m = one([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0])
    assert float(M.mrr(s, y, m)[0]) == pytest.approx(0.25)  # the relevant item is last
    s, y, m = one([1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0])
    assert float(M.mrr(s, y, m)[0]) == 1.0
    assert float(M.ndcg(s, y, m)[0]) == 1.0
    assert float(M.auc(s, y, m)[0]) == 1.0
    # ties broken among real items only, wherever padding sits
    s = torch.tensor([[9.0, 1.0, 9.0, 1.0]])
    y = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    m = torch.tensor([[False, True, False, True]])
    assert float(M.mrr(s, y, m)[0]) == pytest.approx(0.5)
    # top-k overlap of two constant scorers: both pick the first k items
    assert (
        float(M.topk_overlap(torch.zeros(1, 5), torch.ones(1, 5), torch.ones(1, 5).bool(), 2)[0])
        == 1.0
    )


def test_agreement_hand_cases():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4, dtype=torch.bool)
    assert float(M.kendall_tau(s, s * 3 + 1, m)[0]) == pytest.approx(1.0)
    assert float(M.kendall_tau(s, -s, m)[0]) == pytest.approx(-1.0)
    assert float(M.spearman(s, s**3, m)[0]) == pytest.approx(1.0)
    # one swapped adjacent pair of 4: tau = (5 - 1) / 6, rho = 1 - 6*2/(4*15)
    t = torch.tensor([[1.0, 3.0, 2.0, 4.0]])
    assert float(M.kendall_tau(s, t, m)[0]) == pytest.approx(4 / 6)
    assert float(M.spearman(s, t, m)[0]) == pytest.approx(1 - 12 / 60)
    assert float(M.topk_overlap(s, t, m, 2)[0]) == pytest.approx(0.5)


def test_calibration_is_finite_for_huge_logits():
    s, y, m = one([1e4, -1e4, 1e4], [1.0, 0.0, 0.0])
    ll = float(M.log_loss(s, y, m)[0])
    assert ll == pytest.approx(1e4 / 3)
    assert float(M.expected_calibration_error(s, y, m)) == pytest.approx(1 / 3)


def test_summary_keys_and_inputs():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 8))
    y = rng.integers(0, 3, size=(6, 8)).astype(np.float32)
    m = rng.random((6, 8)) < 0.8
    out = M.ranking_summary(s, y, m, teacher=s + rng.normal(size=s.shape) * 0.1)
    assert set(out) == {
        "ndcg@1", "ndcg@5", "ndcg@10", "map", "mrr", "precision@10", "pairwise_accuracy",
        "auc", "log_loss", "ece", "kendall_tau", "spearman", "topk_overlap@10", "ndcg_empty",
    }  # fmt: skip
    assert "kendall_tau" not in M.ranking_summary(s, y, m)
    assert all(isinstance(v, float) for k, v in out.items() if k != "ndcg_empty")
    assert M.map is M.average_precision
    with pytest.raises(ConfigError, match="cutoff"):
        M.ndcg(s, y, m, k=0)
    with pytest.raises(ValueError, match="shape"):
        M.ndcg(s, y[:, :3], m)


def test_perfect_and_reversed_rankings():
    y = torch.tensor([[2.0, 1.0, 1.0, 0.0, 0.0]])
    m = torch.ones_like(y, dtype=torch.bool)
    assert float(M.ndcg(y, y, m)[0]) == pytest.approx(1.0)
    assert float(M.pairwise_accuracy(y, y, m)[0]) == 1.0
    assert float(M.pairwise_accuracy(-y, y, m)[0]) == 0.0
    assert float(M.ndcg(-y, y, m)[0]) < 0.7


def test_pairwise_metrics_chunk_rows_without_changing_results(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(40, 25, generator=gen), torch.randn(40, 25, generator=gen)
    y = torch.randint(0, 3, (40, 25), generator=gen).float()
    m = torch.rand(40, 25, generator=gen) < 0.8
    whole = [M.pairwise_accuracy(s, y, m, 5), M.kendall_tau(s, t, m), M.spearman(s, t, m)]
    monkeypatch.setattr(M, "_PAIR_BUDGET", 3 * 25 * 25)  # 3 rows per chunk
    chunked = [M.pairwise_accuracy(s, y, m, 5), M.kendall_tau(s, t, m), M.spearman(s, t, m)]
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True)
