"""Tests of fedrank.common.losses: reference values, brute-force agreement, masking, numerics,
the composite loss and its configuration errors."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrank.common import losses as L
from fedrank.common.errors import ConfigError, FedrankError, ScoreTableError

F64 = torch.float64
SETTINGS = settings(max_examples=12, deadline=None)

# DESIGN.md reference example
S_REF = [0.2, 0.1, -0.4, 1.0]
T_REF = [1.5, -0.5, 0.3, 2.0]
Y_REF = [1.0, 0.0, 0.0, 1.0]

PAIR_WEIGHT_OPTIONS = [
    {"pair_weight": "inverse_rank"},
    {"pair_weight": "log_discount", "weight_ranks": "student"},
    {"pair_weight": "rank_gap", "alpha": 1.5, "weight_ranks": "both"},
    {"pair_weight": "log_discount", "weight_ranks": "both", "weight_combine": "mean"},
]

# (loss, options) combinations checked against the brute force and for masking
CASES: list[tuple[str, dict]] = [
    ("label_sigmoid_ce", {}),
    ("label_sigmoid_ce", {"graded": "scale", "max_grade": 3.0}),
    ("label_sigmoid_ce", {"uniform_sets": "zero"}),
    ("score_l2", {}),
    ("score_sigmoid_ce", {}),
    ("label_pairwise_logistic", {}),
    ("label_pairwise_logistic", {"ties": "half"}),
    ("label_softmax", {}),
    ("label_softmax", {"variant": "disjoint"}),
    ("rank_l2", {}),
    ("rank_l2", {"form": "pair"}),
    ("rank_pairwise_ce", {}),
    ("rank_pairwise_ce", {"temperature": 2.5}),
    ("rank_conditional", {}),
    ("rank_softmax_ce", {}),
    ("rank_softmax_ce", {"temperature": 0.5}),
    ("rank_spearman", {}),
    ("rank_spearman", {"temperature": 0.3}),
]
# every weighting option, each on a different pairwise loss (plus one repeat)
_PAIRWISE = ("label_pairwise_logistic", "rank_l2", "rank_pairwise_ce", "rank_conditional")
for _k, _opts in enumerate(PAIR_WEIGHT_OPTIONS):
    CASES.append((_PAIRWISE[_k], dict(_opts)))
CASES.append(("rank_conditional", dict(PAIR_WEIGHT_OPTIONS[0])))
POINTWISE = ("label_sigmoid_ce", "score_l2", "score_sigmoid_ce")
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in CASES]


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def call(name: str, scores, target, mask, teacher=None, **options) -> torch.Tensor:
    """Call a loss; label losses with teacher-rank weights get ``teacher``."""
    if L.LOSSES[name].target == "labels" and L.needs_teacher_ranks(name, options):
        options["teacher"] = teacher
    return L.LOSSES[name](scores, target, mask, **options)


# ---------------------------------------------------------------------------------------------
# brute force: per-set, per-pair python loops over scalar tensors (autograd gives gradients)
# ---------------------------------------------------------------------------------------------


def bf_ranks(x: list[float]) -> list[int]:
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    r = [0] * len(x)
    for pos, i in enumerate(order):
        r[i] = pos + 1
    return r


def bf_weight(i, j, s_vals, t_vals, opts) -> float:
    kind = opts.get("pair_weight")
    if kind in (None, "none"):
        return 1.0

    def w(r):
        if kind == "inverse_rank":
            return abs(1 / r[i] - 1 / r[j])
        if kind == "log_discount":
            return abs(1 / math.log2(1 + r[i]) - 1 / math.log2(1 + r[j]))
        return 1 / abs(r[i] - r[j]) ** opts.get("alpha", 1.0)

    src = opts.get("weight_ranks", "teacher")
    wt, ws = w(bf_ranks(t_vals)), w(bf_ranks(s_vals))
    if src == "teacher":
        return wt
    if src == "student":
        return ws
    return max(wt, ws) if opts.get("weight_combine", "max") == "max" else (wt + ws) / 2


def bf_loss(name, s, target, teacher, opts) -> torch.Tensor:
    """One set: ``s`` list of scalar tensors (requires grad), ``target``/``teacher`` floats."""
    n = len(s)
    zero = torch.zeros((), dtype=F64)
    if n < 2 and name not in POINTWISE:
        return zero
    sv = [float(x.detach()) for x in s]
    tv = teacher if teacher is not None else target
    ls = torch.nn.functional.logsigmoid
    sp = torch.nn.functional.softplus
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    total = zero
    if name == "label_sigmoid_ce":
        graded = opts.get("graded", "binarize")
        if graded == "binarize":
            y = [1.0 if v > 0 else 0.0 for v in target]
        else:
            y = [min(max(v / opts["max_grade"], 0.0), 1.0) for v in target]
        if opts.get("uniform_sets", "keep") == "zero" and len(set(y)) < 2:
            return zero
        for i in range(n):
            total = total - y[i] * ls(s[i]) - (1 - y[i]) * ls(-s[i])
        return total
    if name == "score_l2":
        for i in range(n):
            total = total + (target[i] - s[i]) ** 2
        return total
    if name == "score_sigmoid_ce":
        for i in range(n):
            q = 1 / (1 + math.exp(-target[i]))
            total = total - q * ls(s[i]) - (1 - q) * ls(-s[i])
        return total
    if name == "label_pairwise_logistic":
        if len(set(target)) < 2:
            return zero
        for i, j in pairs:
            if target[i] > target[j]:
                yij = 1.0
            elif target[i] == target[j] and opts.get("ties") == "half":
                yij = 0.5
            else:
                continue
            total = total - bf_weight(i, j, sv, tv, opts) * yij * ls(s[i] - s[j])
        return total
    if name == "label_softmax":
        pos = [max(v, 0.0) for v in target]
        if len(set(target)) < 2 or sum(pos) == 0:
            return zero
        lse = torch.logsumexp(torch.stack(s), 0)
        for i in range(n):
            if pos[i] == 0:
                continue
            if opts.get("variant") == "disjoint":
                group = torch.stack([s[j] for j in range(n) if target[j] == target[i]])
                log_p = torch.logsumexp(group, 0) - lse
            else:
                log_p = s[i] - lse
            total = total - pos[i] / sum(pos) * log_p
        return total
    if name == "rank_l2":
        for i, j in pairs:
            w = bf_weight(i, j, sv, tv, opts)
            total = total + w * ((target[i] - target[j]) - (s[i] - s[j])) ** 2
        return total
    if name == "rank_pairwise_ce":
        g = opts.get("temperature", 1.0)
        for i, j in pairs:
            p = 1 / (1 + math.exp(-(target[i] - target[j]) / g))
            total = total - g * g * bf_weight(i, j, sv, tv, opts) * p * ls((s[i] - s[j]) / g)
        return total
    if name == "rank_conditional":
        q = [1 / (1 + math.exp(-v)) for v in target]
        for i, j in pairs:
            if q[i] > q[j]:
                total = total + bf_weight(i, j, sv, tv, opts) * (q[i] - q[j]) * sp(-(s[i] - s[j]))
        return total
    if name == "rank_softmax_ce":
        g = opts.get("temperature", 1.0)
        m = max(target)
        ex = [math.exp((v - m) / g) for v in target]
        lse = torch.logsumexp(torch.stack(s) / g, 0)
        for i in range(n):
            total = total - g * g * ex[i] / sum(ex) * (s[i] / g - lse)
        return total
    if name == "rank_spearman":
        tau = opts.get("temperature", 1.0)
        u = bf_ranks(target)
        for i in range(n):
            r = 1.0
            for j in range(n):
                if j != i:
                    r = r + torch.sigmoid((s[j] - s[i]) / tau)
            total = total + (u[i] - r) ** 2
        return total
    raise AssertionError(name)


GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 7.0]


def ragged_batch(sizes, pad, seed, ties=False, dtype=F64, garbage=True):
    """A padded batch with garbage (NaN, inf, huge values) in every padded position."""
    rng = np.random.default_rng(seed)
    b, n = len(sizes), max(sizes + [1]) + pad
    s = rng.normal(0, 2, (b, n))
    t = rng.normal(0, 2, (b, n))
    if ties:
        s, t = np.round(s), np.round(t)
    y = rng.integers(0, 4, (b, n)).astype(float)
    mask = np.arange(n)[None, :] < np.array(sizes)[:, None]
    # shuffle the valid positions so padding is not always at the end
    for r in range(b):
        mask[r] = rng.permutation(mask[r])
    if garbage:
        bad = rng.choice(GARBAGE, size=(3, b, n))
        s, t, y = (np.where(mask, a, g) for a, g in zip((s, t, y), bad, strict=True))
    return (
        torch.tensor(s, dtype=dtype),
        torch.tensor(t, dtype=dtype),
        torch.tensor(y, dtype=dtype),
        torch.tensor(mask),
    )


batches = st.tuples(
    st.lists(st.integers(0, 6), min_size=1, max_size=4),
    st.integers(0, 2),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)


# ---------------------------------------------------------------------------------------------
# reference values (DESIGN.md)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "target", "options", "expected"),
    [
        ("rank_l2", T_REF, {}, 16.8),
        ("rank_l2", T_REF, {"form": "pair"}, 16.8),
        ("score_l2", T_REF, {}, 3.54),
        ("score_sigmoid_ce", T_REF, {}, 2.516523),
        ("label_pairwise_logistic", Y_REF, {}, 1.643456),
        ("rank_softmax_ce", T_REF, {}, 1.178575),
        ("rank_softmax_ce", T_REF, {"temperature": 1.0}, 1.178575),
        ("rank_softmax_ce", T_REF, {"temperature": 2.0}, 5.311825),
        ("rank_softmax_ce", T_REF, {"temperature": 4.0}, 21.947475),
        ("rank_pairwise_ce", T_REF, {}, 3.570982),
        ("rank_pairwise_ce", T_REF, {"temperature": 1.0}, 3.570982),
    ],
)
def test_reference_values(name, target, options, expected):
    mask = torch.ones(1, 4, dtype=torch.bool)
    value = L.LOSSES[name](t64([S_REF]), t64([target]), mask, **options)
    assert value.shape == (1,) and value.dtype == F64
    assert value.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("form", ["list", "pair"])
def test_reference_rank_l2_masked(form):
    mask = torch.tensor([[True, True, True, False]])
    # garbage in the masked slot must not matter
    s, t = t64([S_REF[:3] + [1e30]]), t64([T_REF[:3] + [float("nan")]])
    assert L.rank_l2(s, t, mask, form=form).item() == pytest.approx(11.32, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# brute-force agreement (value and gradient) on random ragged batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
@SETTINGS
@given(batch=batches)
def test_matches_brute_force(name, options, batch):
    sizes, pad, seed, ties = batch
    s, t, y, mask = ragged_batch(sizes, pad, seed, ties=ties)
    target = y if L.LOSSES[name].target == "labels" else t
    scores = s.clone().requires_grad_(True)
    value = call(name, scores, target, mask, teacher=t, **options)
    value.sum().backward()
    for b in range(len(sizes)):
        idx = mask[b].nonzero().flatten().tolist()
        s_set = [s[b, i].clone().requires_grad_(True) for i in idx]
        tv = [float(target[b, i]) for i in idx]
        teacher = [float(t[b, i]) for i in idx] if L.LOSSES[name].target == "labels" else None
        expected = bf_loss(name, s_set, tv, teacher, options)
        assert value[b].item() == pytest.approx(expected.item(), rel=1e-9, abs=1e-9)
        if expected.requires_grad:
            grads = torch.autograd.grad(expected, s_set)
            got = scores.grad[b, idx]
            assert torch.allclose(got, torch.stack(grads), rtol=1e-8, atol=1e-9)
        else:
            assert torch.all(scores.grad[b, idx] == 0)
        assert torch.all(scores.grad[b, ~mask[b]] == 0)


# ---------------------------------------------------------------------------------------------
# masking: padded items change nothing (value and gradient), whatever they hold
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
@SETTINGS
@given(batch=batches)
def test_padding_invariance(name, options, batch):
    sizes, pad, seed, ties = batch
    s, t, y, mask = ragged_batch(sizes, pad + 1, seed, ties=ties, dtype=torch.float32)
    target = y if L.LOSSES[name].target == "labels" else t
    scores = s.clone().requires_grad_(True)
    value = call(name, scores, target, mask, teacher=t, **options)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(scores.grad).all()
    assert torch.all(scores.grad[~mask] == 0)
    for b in range(len(sizes)):
        idx = mask[b].nonzero().flatten()
        compact = s[b, idx][None].clone().requires_grad_(True)
        ones = torch.ones(1, len(idx), dtype=torch.bool)
        one = call(name, compact, target[b, idx][None], ones, teacher=t[b, idx][None], **options)
        one.sum().backward()
        torch.testing.assert_close(value[b], one[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scores.grad[b, idx], compact.grad[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# rank_l2 identities
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(batch=batches)
def test_rank_l2_list_equals_pair_and_closed_form_gradient(batch):
    sizes, pad, seed, _ = batch
    s, t, _, mask = ragged_batch(sizes, pad, seed)
    values, grads = [], []
    for form in ("list", "pair"):
        scores = s.clone().requires_grad_(True)
        v = L.rank_l2(scores, t, mask, form=form)
        v.sum().backward()
        values.append(v.detach())
        grads.append(scores.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
    # dL/ds_k = -(4 N d_k - 4 sum_i d_i), d = t - s, on valid items; 0 on padding
    d = torch.where(mask, t - s, 0.0)
    n = mask.sum(-1, keepdim=True).to(F64)
    closed = torch.where(mask, -(4 * n * d - 4 * d.sum(-1, keepdim=True)), 0.0)
    torch.testing.assert_close(grads[0], closed, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["list", "pair"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_rank_l2_translation_invariance(form, dtype):
    s, t, _, mask = ragged_batch([5, 3, 6], 1, seed=3, dtype=dtype)
    base = L.rank_l2(s, t, mask, form=form)
    shift = torch.tensor([[3.0], [-250.0], [1000.0]], dtype=dtype)
    tol = {"rtol": 1e-4, "atol": 1e-3} if dtype == torch.float32 else {}
    torch.testing.assert_close(L.rank_l2(s, t + shift, mask, form=form), base, **tol)
    torch.testing.assert_close(L.rank_l2(s + shift, t, mask, form=form), base, **tol)
    # a shift of one item is not a translation: the value must change
    t2 = t.clone()
    t2[0, 0] += 1.0
    assert not torch.allclose(L.rank_l2(s, t2, mask, form=form), base)


# ---------------------------------------------------------------------------------------------
# degenerate sets and huge logits
# ---------------------------------------------------------------------------------------------


def design_value(name: str, s: list[float], target: list[float], options: dict) -> float:
    """DESIGN.md's rule for a one-item set or a set whose labels are all equal: the pointwise
    losses sum their per-item formula over every valid item; every other loss gives 0 (the
    ``uniform_sets="zero"`` option of ``label_sigmoid_ce`` drops all-equal sets)."""

    def softplus(x: float) -> float:
        return max(x, 0.0) + math.log1p(math.exp(-abs(x)))

    if name == "label_sigmoid_ce":
        y = [1.0 if v > 0 else 0.0 for v in target]
        if options.get("graded") == "scale":
            y = [min(max(v / options["max_grade"], 0.0), 1.0) for v in target]
        if options.get("uniform_sets") == "zero" and len(set(y)) < 2:
            return 0.0
        return sum(softplus(si) - yi * si for si, yi in zip(s, y, strict=True))
    if name == "score_l2":
        return sum((t - si) ** 2 for si, t in zip(s, target, strict=True))
    if name == "score_sigmoid_ce":
        return sum(softplus(si) - si / (1 + math.exp(-t)) for si, t in zip(s, target, strict=True))
    return 0.0


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_degenerate_sets_follow_design(name, options):
    nan = float("nan")
    # set 0: no valid item; set 1: one valid item; set 2: all labels equal (teacher differs)
    s = t64([[nan, 5.0, 1.0], [2.0, nan, 9.0], [0.3, -1.0, 2.0]])
    t = t64([[1.0, nan, 3.0], [-4.0, 2.0, 1.0], [0.5, 1.5, -2.0]])
    y = t64([[1.0, 0.0, nan], [1.0, 2.0, 0.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])
    labels = L.LOSSES[name].target == "labels"
    target = y if labels else t
    scores = s.clone().requires_grad_(True)
    value = call(name, scores, target, mask, teacher=t, **options)
    value.sum().backward()
    assert not torch.isnan(value).any() and not torch.isnan(scores.grad).any()
    assert value[0].item() == 0.0 and torch.all(scores.grad[0] == 0)
    one = design_value(name, [2.0], [float(target[1, 0])], options)
    assert value[1].item() == pytest.approx(one, rel=1e-12, abs=1e-12)
    # a one-item set trains the pointwise losses only (unless an option drops it)
    assert (scores.grad[1, 0] != 0).item() == (one != 0.0)
    assert torch.all(scores.grad[1, 1:] == 0)  # masked items get no gradient
    if labels:
        equal = design_value(name, s[2].tolist(), y[2].tolist(), options)
        assert value[2].item() == pytest.approx(equal, rel=1e-12, abs=1e-12)
    else:
        assert value[2].item() > 0.0  # the teacher's logits differ: a regular set


def test_one_item_and_all_equal_sets_match_design_for_every_loss():
    """Every registered loss, default options: the value on a one-item set and on a set whose
    labels are all equal (every label 0: a page view without a click) is DESIGN.md's."""
    s = t64([[0.7, 0.0, 0.0], [0.2, -1.3, 0.5]])
    t = t64([[-0.4, 0.0, 0.0], [1.0, 0.1, -2.0]])
    y = t64([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    for name in L.LOSSES:
        labels = L.LOSSES[name].target == "labels"
        value = call(name, s, y if labels else t, mask, teacher=t)
        single = design_value(name, [0.7], [0.0 if labels else -0.4], {})
        assert value[0].item() == pytest.approx(single, abs=1e-12), name
        if labels:
            equal = design_value(name, s[1].tolist(), [0.0] * 3, {})
            assert value[1].item() == pytest.approx(equal, abs=1e-12), name
    # the pointwise label loss keeps all-equal sets by default; the option drops them
    keep = L.label_sigmoid_ce(s, y, mask)
    drop = L.label_sigmoid_ce(s, y, mask, uniform_sets="zero")
    assert keep[1].item() > 0 and drop.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(("name", "options"), CASES, ids=CASE_IDS)
def test_huge_logits_stay_finite(name, options):
    gen = torch.Generator().manual_seed(0)
    s = (torch.randint(0, 2, (3, 8), generator=gen) * 2 - 1).float() * 1e4
    t = (torch.randint(0, 2, (3, 8), generator=gen) * 2 - 1).float() * 1e4
    s[1] = torch.linspace(-1e4, 1e4, 8)
    y = torch.randint(0, 3, (3, 8), generator=gen).float()
    y[:, 0], y[:, 1] = 0.0, 2.0
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[2, 5:] = False
    scores = s.clone().requires_grad_(True)
    target = y if L.LOSSES[name].target == "labels" else t
    value = call(name, scores, target, mask, teacher=t, **options)
    value.sum().backward()
    assert torch.isfinite(value).all(), value
    assert torch.isfinite(scores.grad).all()


# ---------------------------------------------------------------------------------------------
# temperature, ranks, weights
# ---------------------------------------------------------------------------------------------


def test_pairwise_ce_temperature_limit_is_rank_l2_over_16():
    s, t, _, mask = ragged_batch([6, 4], 1, seed=11)
    target = L.rank_l2(s, t, mask) / 16
    errors = []
    for g in (10.0, 100.0, 1000.0):
        gap = L.rank_pairwise_ce(s, t, mask, temperature=g) - L.rank_pairwise_ce(
            torch.where(mask, t, 0.0), t, mask, temperature=g
        )
        errors.append(((gap - target).abs() / target).max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4


def test_ranks_break_ties_by_item_order_and_ignore_padding():
    x = torch.tensor([[1.0, 3.0, 1.0, 1e9, 3.0]])
    mask = torch.tensor([[True, True, True, False, True]])
    r = L.ranks(x, mask)
    assert r[0, mask[0]].tolist() == [3.0, 1.0, 4.0, 2.0]


def test_pair_weight_values():
    mask = torch.ones(1, 3, dtype=torch.bool)
    t = t64([[3.0, 1.0, 2.0]])  # teacher ranks 1, 3, 2
    w = L.pair_weights(mask, pair_weight="inverse_rank", teacher=t)
    assert w[0, 0, 1].item() == pytest.approx(1 - 1 / 3)
    assert w[0, 1, 2].item() == pytest.approx(1 / 2 - 1 / 3)
    assert torch.all(torch.diagonal(w[0]) == 0)
    w = L.pair_weights(mask, pair_weight="log_discount", teacher=t)
    assert w[0, 0, 2].item() == pytest.approx(1 - 1 / math.log2(3))
    w = L.pair_weights(mask, pair_weight="rank_gap", teacher=t, alpha=2.0)
    assert w[0, 0, 1].item() == pytest.approx(1 / 4)
    s = t64([[1.0, 2.0, 3.0]])  # student ranks 3, 2, 1
    w_max = L.pair_weights(
        mask, pair_weight="inverse_rank", teacher=t, student=s, weight_ranks="both"
    )
    w_mean = L.pair_weights(
        mask,
        pair_weight="inverse_rank",
        teacher=t,
        student=s,
        weight_ranks="both",
        weight_combine="mean",
    )
    # pair (0, 2): teacher |1 - 1/2| = 0.5, student |1/3 - 1| = 2/3
    assert w_max[0, 0, 2].item() == pytest.approx(2 / 3)
    assert w_mean[0, 0, 2].item() == pytest.approx((0.5 + 2 / 3) / 2)
    assert L.pair_weights(mask, pair_weight=None) is None


def test_pair_weights_carry_no_gradient():
    s, t, _, mask = ragged_batch([5], 0, seed=2, garbage=False)
    scores = s.clone().requires_grad_(True)
    weighted = L.rank_l2(scores, t, mask, pair_weight="inverse_rank", weight_ranks="student")
    (g,) = torch.autograd.grad(weighted.sum(), scores)
    w = L.pair_weights(mask, pair_weight="inverse_rank", student=s, weight_ranks="student")
    d = t - s
    dd = d[:, :, None] - d[:, None, :]
    expected = (-2 * w * dd).sum(-1) + (2 * w * dd).sum(-2)
    torch.testing.assert_close(g, expected)


def test_label_loss_teacher_ranks_need_teacher():
    s, t, y, mask = ragged_batch([4], 0, seed=1, garbage=False)
    with pytest.raises(ConfigError, match="teacher"):
        L.label_pairwise_logistic(s, y, mask, pair_weight="inverse_rank")
    a = L.label_pairwise_logistic(s, y, mask, pair_weight="inverse_rank", teacher=t)
    b = L.label_pairwise_logistic(s, y, mask, pair_weight="inverse_rank", teacher=-t)
    assert not torch.allclose(a, b)  # the teacher's ranks are really used


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("rank_l2", {"form": "bogus"}),
        ("rank_l2", {"form": "list", "pair_weight": "inverse_rank"}),
        ("rank_pairwise_ce", {"temperature": 0.0}),
        ("rank_softmax_ce", {"temperature": float("inf")}),
        ("rank_spearman", {"temperature": -1.0}),
        ("rank_conditional", {"pair_weight": "dcg"}),
        ("rank_conditional", {"pair_weight": "rank_gap", "weight_ranks": "oracle"}),
        ("label_softmax", {"variant": "grouped"}),
        ("label_pairwise_logistic", {"ties": "third"}),
        ("label_sigmoid_ce", {"graded": "maybe"}),
    ],
)
def test_bad_option_values_raise_config_error(name, options):
    s, t, _, mask = ragged_batch([3], 0, seed=0, garbage=False)
    with pytest.raises(ConfigError):
        L.LOSSES[name](s, t, mask, **options)


def test_every_public_loss_has_a_runnable_example():
    """Each registered loss shows a short example in its docstring, and it gives what it says
    (the DESIGN.md reference values where they apply)."""
    found = {
        test.name.rsplit(".", 1)[-1]: test
        for test in doctest.DocTestFinder().find(L)
        if test.examples
    }
    assert set(L.LOSSES) <= set(found)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for name in L.LOSSES:
        runner.run(found[name])
    assert runner.failures == 0 and runner.tries >= 2 * len(L.LOSSES)


def test_registry_and_reduce_sets():
    assert len(L.LOSSES) == 10 and all(name == info.name for name, info in L.LOSSES.items())
    assert {info.target for info in L.LOSSES.values()} == {"labels", "teacher"}
    assert L.losses_of("rank_label") == ("label_pairwise_logistic", "label_softmax")
    pairwise = {name for name, info in L.LOSSES.items() if info.pairwise}
    assert pairwise == {
        "label_pairwise_logistic",
        "rank_l2",
        "rank_pairwise_ce",
        "rank_conditional",
    }
    # every teacher loss with a temperature calls it `temperature`; tau is an old alias
    assert L.LOSSES["rank_spearman"].takes("temperature")
    term = L.LossTerm("rank", "rank_spearman", 1.0, {"tau": 0.5})
    assert term.options == {"temperature": 0.5}
    per_set = t64([2.0, 100.0, 4.0])
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    assert L.reduce_sets(per_set, mask).item() == 3.0
    assert L.reduce_sets(per_set, mask, reduction="sum").item() == 6.0
    empty = L.reduce_sets(per_set, torch.zeros(3, 2, dtype=torch.bool))
    assert empty.item() == 0.0
    with pytest.raises(ConfigError):
        L.reduce_sets(per_set, mask, reduction="median")


# ---------------------------------------------------------------------------------------------
# weight schedules and the composite loss
# ---------------------------------------------------------------------------------------------


def test_weight_schedules():
    assert L.WeightSchedule.parse("0.5").value(100) == 0.5
    assert L.WeightSchedule.parse(2).value(0) == 2.0
    lin = L.WeightSchedule.parse("linear:0:1:10")
    assert [lin.value(k) for k in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    step = L.WeightSchedule.parse("step:1:0.25:3")
    assert [step.value(k) for k in (0, 2, 3, 9)] == [1.0, 1.0, 0.25, 0.25]
    assert L.WeightSchedule.parse(lin) is lin
    assert str(lin) == "linear:0:1:10" and L.WeightSchedule.parse(str(step)) == step
    assert L.WeightSchedule.parse("0").always_zero and not lin.always_zero


@pytest.mark.parametrize(
    "spec",
    ["-1", -0.5, "nan", float("inf"), "linear:0:-1:5", "step:1:2", "cosine:0:1:5", "x", True],
)
def test_bad_weights_raise_config_error(spec):
    with pytest.raises(ConfigError):
        L.WeightSchedule.parse(spec)
    with pytest.raises(ConfigError):
        L.LossTerm("rank", "rank_l2", spec)


def test_loss_term_errors_name_the_valid_choices():
    with pytest.raises(ConfigError, match="rank_pairwise_ce") as err:
        L.LossTerm("rank", "rank_kl", 1.0)
    assert "rank_kl" in str(err.value) and isinstance(err.value, FedrankError)
    with pytest.raises(ConfigError, match="score_l2, score_sigmoid_ce"):
        L.LossTerm("score", "rank_l2", 1.0)
    with pytest.raises(ConfigError, match="label, score, rank_label, rank"):
        L.LossTerm("distill", "rank_l2", 1.0)
    with pytest.raises(ConfigError, match="temperature"):
        L.LossTerm("rank", "rank_pairwise_ce", 1.0, {"temprature": 2.0})
    with pytest.raises(ConfigError, match="form"):
        L.LossTerm("rank", "rank_l2", 1.0, {"form": "matrix"})
    with pytest.raises(ConfigError):
        L.CompositeLoss([])
    with pytest.raises(ConfigError):
        L.CompositeLoss([L.LossTerm("rank", "rank_l2", 1.0)], reduction="max")


def _batch32(seed=5):
    s, t, y, mask = ragged_batch([6, 4, 1, 5], 1, seed=seed, dtype=torch.float32)
    return s, t, y, mask


def test_composite_weights_and_values():
    s, t, y, mask = _batch32()
    loss = L.CompositeLoss(
        [
            L.LossTerm("label", "label_sigmoid_ce", 0.5),
            L.LossTerm("score", "score_l2", "0.25"),
            L.LossTerm("rank_label", "label_softmax", 2.0),
            L.LossTerm("rank", "rank_pairwise_ce", 1.5, {"temperature": 2.0}),
        ]
    )
    scores = s.clone().requires_grad_(True)
    total, values = loss(scores, y, t, mask)
    assert set(values) == {"label", "score", "rank_label", "rank", "total"}
    parts = {
        "label": L.label_sigmoid_ce(s, y, mask),
        "score": L.score_l2(s, t, mask),
        "rank_label": L.label_softmax(s, y, mask),
        "rank": L.rank_pairwise_ce(s, t, mask, temperature=2.0),
    }
    expected = 0.0
    for key, w in zip(parts, (0.5, 0.25, 2.0, 1.5), strict=True):
        reduced = L.reduce_sets(parts[key], mask).item()
        assert values[key] == pytest.approx(reduced, rel=1e-5)
        expected += w * reduced
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert values["total"] == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert torch.isfinite(scores.grad).all() and torch.all(scores.grad[~mask] == 0)
    assert loss.needs_teacher
    assert loss.weights(0) == {"label": 0.5, "score": 0.25, "rank_label": 2.0, "rank": 1.5}


def test_composite_schedules_follow_the_step():
    s, t, y, mask = _batch32()
    loss = L.CompositeLoss(
        [
            L.LossTerm("label", "label_sigmoid_ce", "linear:1:0:10"),
            L.LossTerm("rank", "rank_l2", "step:0:2:4"),
        ]
    )
    schedule = {0: (1.0, 0.0), 3: (0.7, 0.0), 4: (0.6, 2.0), 5: (0.5, 2.0), 20: (0.0, 2.0)}
    for step, (wl, wr) in schedule.items():
        total, values = loss(s, y, t, mask, step=step)
        expected = wl * values["label"] + wr * values["rank"]
        assert total.item() == pytest.approx(expected, rel=1e-5), step
    assert values["label"] > 0 and values["rank"] > 0  # a 0 weight still logs its value


def test_composite_zero_weight_term_has_no_gradient():
    s, t, y, mask = _batch32()
    scores = s.clone().requires_grad_(True)
    loss = L.CompositeLoss(
        [L.LossTerm("label", "label_softmax", 1.0), L.LossTerm("rank", "rank_l2", 0.0)]
    )
    total, _ = loss(scores, y, t, mask)
    (g,) = torch.autograd.grad(total, scores)
    alone = scores.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(L.reduce_sets(L.label_softmax(alone, y, mask), mask), alone)
    torch.testing.assert_close(g, g2)


def test_composite_teacher_requirements():
    s, t, y, mask = _batch32()
    labels_only = L.CompositeLoss(
        [L.LossTerm("label", "label_sigmoid_ce", 1.0), L.LossTerm("rank", "rank_l2", 0)]
    )
    assert not labels_only.needs_teacher
    total, values = labels_only(s, y, None, mask)
    assert values["rank"] == 0.0 and math.isfinite(total.item())
    ramped = L.CompositeLoss(
        [L.LossTerm("label", "label_sigmoid_ce", 1.0), L.LossTerm("rank", "rank_l2", "step:0:1:3")]
    )
    assert ramped.needs_teacher
    ramped(s, y, None, mask, step=2)  # weight still 0
    with pytest.raises(ScoreTableError, match="rank"):
        ramped(s, y, None, mask, step=3)
    weighted = L.CompositeLoss(
        [L.LossTerm("rank_label", "label_pairwise_logistic", 1.0, {"pair_weight": "log_discount"})]
    )
    assert weighted.needs_teacher  # teacher ranks weight the label pairs
    _, values = weighted(s, y, t, mask)
    direct = L.label_pairwise_logistic(s, y, mask, pair_weight="log_discount", teacher=t)
    assert values["rank_label"] == pytest.approx(L.reduce_sets(direct, mask).item(), rel=1e-5)
    student_ranked = L.CompositeLoss(
        [
            L.LossTerm(
                "rank_label",
                "label_pairwise_logistic",
                1.0,
                {"pair_weight": "log_discount", "weight_ranks": "student"},
            )
        ]
    )
    assert not student_ranked.needs_teacher


def test_composite_label_mask_hides_labels_of_unlabelled_sets():
    s, t, y, mask = _batch32()
    label_mask = torch.tensor([True, False, True, False])
    loss = L.CompositeLoss(
        [
            L.LossTerm("rank_label", "label_pairwise_logistic", 1.0),
            L.LossTerm("score", "score_l2", 1.0),
        ]
    )
    scores = s.clone().requires_grad_(True)
    total, values = loss(scores, y, t, mask, label_mask=label_mask)
    keep = label_mask.nonzero().flatten()
    sub = L.label_pairwise_logistic(s[keep], y[keep], mask[keep])
    assert values["rank_label"] == pytest.approx(L.reduce_sets(sub, mask[keep]).item(), rel=1e-5)
    assert values["score"] == pytest.approx(
        L.reduce_sets(L.score_l2(s, t, mask), mask).item(), rel=1e-5
    )
    # garbage labels of unlabelled sets change nothing
    y_bad = y.clone()
    y_bad[~label_mask] = float("nan")
    total2, values2 = loss(s, y_bad, t, mask, label_mask=label_mask)
    assert total2.item() == pytest.approx(total.item()) and values2 == pytest.approx(values)
    # no labelled set at all: the label term is 0, never NaN
    _, values3 = loss(s, y, t, mask, label_mask=torch.zeros(4, dtype=torch.bool))
    assert values3["rank_label"] == 0.0


def test_composite_keys_for_repeated_families():
    s, t, y, mask = _batch32()
    loss = L.CompositeLoss(
        [
            L.LossTerm("rank", "rank_l2", 1.0),
            L.LossTerm("rank", "rank_softmax_ce", 1.0),
            L.LossTerm("rank", "rank_softmax_ce", 1.0, {"temperature": 3.0}),
            {"family": "label", "loss": "label_softmax", "weight": 1.0},
        ]
    )
    _, values = loss(s, y, t, mask)
    assert set(values) == {
        "rank.rank_l2",
        "rank.rank_softmax_ce",
        "rank.rank_softmax_ce#2",
        "label",
        "total",
    }
    assert values["rank.rank_softmax_ce"] != values["rank.rank_softmax_ce#2"]


def test_composite_sum_reduction():
    s, t, y, mask = _batch32()
    mean_loss = L.CompositeLoss([L.LossTerm("rank", "rank_l2", 1.0)])
    sum_loss = L.CompositeLoss([L.LossTerm("rank", "rank_l2", 1.0)], reduction="sum")
    n_sets = int(mask.any(-1).sum())
    assert sum_loss(s, y, t, mask)[0].item() == pytest.approx(
        n_sets * mean_loss(s, y, t, mask)[0].item(), rel=1e-5
    )
