"""Ranking and distillation losses, one function per loss, and the composite training loss.

Every loss has the same signature ``fn(scores, target, mask, **options) -> Tensor[B]``:

- ``scores``: student logits ``s`` ``[B, N]`` (float);
- ``target``: labels ``y`` or teacher logits ``t`` ``[B, N]`` (``LOSSES[name].target``);
- ``mask``: bool ``[B, N]``, True for real items. Whatever is stored at masked positions
  (including ``inf`` or ``NaN``) changes neither the value nor the gradient;
- the result is one value per set (``[B]``); combine sets with ``reduce_sets``.

Pairwise sums run over ordered pairs ``(i, j)``, ``i != j``, both valid. For the pairwise and
listwise losses a set with fewer than two valid items gives 0, and so does a set whose labels
are all equal for those whose target is labels. The three pointwise losses
(``label_sigmoid_ce``, ``score_l2``, ``score_sigmoid_ce``) sum over every valid item of every
set, one-item sets and sets whose labels are all equal included: those items carry calibration
signal (most sets of click data have no click). Nothing is cached between calls.

Pair weights (LambdaRank style) are available for the pairwise losses
(``label_pairwise_logistic``, ``rank_l2``, ``rank_pairwise_ce``, ``rank_conditional``)
through the options ``pair_weight``, ``weight_ranks``, ``alpha`` and ``weight_combine``
(:data:`PAIR_OPTIONS`; see ``pair_weights``). Each pairwise loss is a thin function over one
helper, :func:`_pairwise`, which takes the pair weighting as one argument.

Losses register themselves (:func:`register`): :data:`LOSSES` maps each name to a
:class:`LossInfo` (the function, its target ``labels`` or ``teacher``, the composite-loss
families it serves, its options). Every option means the same in every loss that takes it
(:data:`OPTIONS`); the temperature of every teacher loss is ``temperature``. Each public loss
has a runnable example in its docstring (the tests run them).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedrank.common.errors import ConfigError, ScoreTableError

__all__ = [
    "FAMILIES",
    "LOSSES",
    "LossInfo",
    "OPTIONS",
    "PAIR_OPTIONS",
    "PairWeighting",
    "PAIR_WEIGHTS",
    "CompositeLoss",
    "LossTerm",
    "WeightSchedule",
    "label_pairwise_logistic",
    "label_sigmoid_ce",
    "label_softmax",
    "losses_of",
    "needs_teacher_ranks",
    "pair_weights",
    "rank_conditional",
    "rank_l2",
    "rank_pairwise_ce",
    "rank_softmax_ce",
    "rank_spearman",
    "ranks",
    "reduce_sets",
    "register",
    "score_l2",
    "score_sigmoid_ce",
]

PAIR_WEIGHTS = ("none", "inverse_rank", "log_discount", "rank_gap")
WEIGHT_RANKS = ("teacher", "student", "both")
WEIGHT_COMBINE = ("max", "mean")
#: every loss option and what it accepts: a tuple of choices, or ``">0"`` / ``">=0"`` for a
#: finite number (``None`` allowed where it is the default). One meaning per option name.
OPTIONS: dict[str, tuple[Any, ...] | str] = {
    "graded": ("binarize", "scale", "raw"),
    "uniform_sets": ("zero", "keep"),
    "max_grade": ">0",
    "ties": ("zero", "half"),
    "variant": ("standard", "disjoint"),
    "form": (None, "list", "pair"),
    "temperature": ">0",
    "pair_weight": (None, *PAIR_WEIGHTS),
    "weight_ranks": WEIGHT_RANKS,
    "weight_combine": WEIGHT_COMBINE,
    "alpha": ">=0",
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _check_inputs(name: str, scores: Tensor, target: Tensor, mask: Tensor) -> None:
    if scores.dim() != 2 or scores.shape != target.shape or scores.shape != mask.shape:
        raise ValueError(
            f"{name}: scores, target and mask must share one [B, N] shape, got "
            f"{tuple(scores.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}: mask must be a bool tensor, got {mask.dtype}")


def _choice(loss: str, key: str, value: Any, valid: Sequence[Any]) -> Any:
    if value not in valid:
        raise ConfigError(
            f"loss {loss}: option {key}={value!r} is not valid; expected one of "
            + ", ".join(repr(v) for v in valid)
        )
    return value


def _option(loss: str, key: str, value: Any) -> Any:
    """``value`` of option ``key`` checked against :data:`OPTIONS` (ConfigError naming the loss
    and the option otherwise)."""
    valid = OPTIONS[key]
    if isinstance(valid, str):
        if value is None and key == "max_grade":
            return value
        return _positive(loss, key, value, allow_zero=valid == ">=0")
    return _choice(loss, key, value, valid)


def _positive(loss: str, key: str, value: Any, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"loss {loss}: option {key}={value!r} must be a finite number {bound}")
    return v


def _clean(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with masked positions replaced by 0 (no value or gradient flows from them)."""
    return torch.where(mask, x, 0.0)


def _count(mask: Tensor) -> Tensor:
    return mask.sum(dim=-1)


def _neg_fill(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 4


def _gate(value: Tensor, keep: Tensor) -> Tensor:
    """0 for the sets where ``keep`` is False (never NaN)."""
    return torch.where(keep, value, 0.0)


def _differs(y: Tensor, mask: Tensor) -> Tensor:
    """True for sets with two valid items of different label."""
    if y.shape[-1] == 0:
        return mask.any(-1)
    hi = torch.where(mask, y, -math.inf).amax(-1)
    lo = torch.where(mask, y, math.inf).amin(-1)
    return hi > lo


def _pair_mask(mask: Tensor) -> Tensor:
    """bool ``[B, N, N]``: ordered pairs ``(i, j)``, ``i != j``, both valid."""
    n = mask.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)
    return mask[:, :, None] & mask[:, None, :] & ~eye


def _pair_diff(x: Tensor) -> Tensor:
    """``[B, N, N]`` with entry ``(i, j) = x_i - x_j``."""
    return x[:, :, None] - x[:, None, :]


def ranks(x: Tensor, mask: Tensor) -> Tensor:
    """1-based ranks of the valid items by descending ``x``, ties broken by item order.

    No gradient. Masked items get ranks after every valid item (they are never used).
    """
    with torch.no_grad():
        key = _clean(x.detach(), mask)
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        valid_sorted = mask.gather(-1, order).to(torch.int8)
        order = order.gather(
            -1, torch.sort(valid_sorted, dim=-1, descending=True, stable=True).indices
        )
        positions = torch.arange(1, x.shape[-1] + 1, device=x.device).expand_as(order)
        out = torch.empty_like(order)
        out.scatter_(-1, order, positions)
        return out.to(x.dtype if x.is_floating_point() else torch.float32)


def _weights_from_ranks(r: Tensor, pair_weight: str, alpha: float) -> Tensor:
    if pair_weight == "inverse_rank":
        inv = 1.0 / r
        return _pair_diff(inv).abs_()
    if pair_weight == "log_discount":
        inv = 1.0 / torch.log2(1.0 + r)
        return _pair_diff(inv).abs_()
    gap = _pair_diff(r).abs_()
    gap = torch.where(gap > 0, gap, torch.ones((), dtype=gap.dtype, device=gap.device))
    return gap.pow_(-alpha)


def pair_weights(
    mask: Tensor,
    *,
    pair_weight: str | None,
    student: Tensor | None = None,
    teacher: Tensor | None = None,
    weight_ranks: str = "teacher",
    alpha: float = 1.0,
    weight_combine: str = "max",
    loss: str = "pair_weights",
) -> Tensor | None:
    """LambdaRank-style pair weights ``[B, N, N]`` (eq. 17-18), or None when unweighted.

    ``pair_weight``:
      - ``"inverse_rank"``: ``w_ij = |1/r_i - 1/r_j|``  (``D(r) = r``);
      - ``"log_discount"``: ``w_ij = |1/log2(1 + r_i) - 1/log2(1 + r_j)|``;
      - ``"rank_gap"``: ``w_ij = 1 / |r_i - r_j|^alpha``;
      - ``None`` / ``"none"``: no weights.

    ``r`` are 1-based ranks among the valid items (descending score, ties by item order),
    computed without gradient from the teacher logits, the student logits or ``"both"``;
    with ``"both"`` the two weights are combined by ``weight_combine``: ``"max"`` (default,
    a pair matters if it matters for either ranking) or ``"mean"``. Entries outside valid
    ordered pairs are 0.
    """
    if pair_weight is None or pair_weight == "none":
        return None
    _option(loss, "pair_weight", pair_weight)
    _option(loss, "weight_ranks", weight_ranks)
    _option(loss, "weight_combine", weight_combine)
    alpha = _option(loss, "alpha", alpha)
    with torch.no_grad():
        sources = []
        if weight_ranks in ("teacher", "both"):
            if teacher is None:
                raise ConfigError(
                    f"loss {loss}: weight_ranks={weight_ranks!r} needs the teacher logits "
                    "(option teacher=...)"
                )
            sources.append(teacher)
        if weight_ranks in ("student", "both"):
            if student is None:
                raise ConfigError(f"loss {loss}: weight_ranks={weight_ranks!r} needs scores")
            sources.append(student)
        w = _weights_from_ranks(ranks(sources[0], mask), pair_weight, alpha)
        if len(sources) == 2:
            w2 = _weights_from_ranks(ranks(sources[1], mask), pair_weight, alpha)
            w = torch.maximum(w, w2) if weight_combine == "max" else w.add_(w2).mul_(0.5)
            del w2
        return torch.where(_pair_mask(mask), w, 0.0)


@dataclass(frozen=True)
class PairWeighting:
    """How the pairs of a pairwise loss are weighted (the options ``pair_weight``,
    ``weight_ranks``, ``alpha``, ``weight_combine`` of :func:`pair_weights`), plus the teacher
    logits a label loss ranks by. One argument of :func:`_pairwise`."""

    pair_weight: str | None = None
    weight_ranks: str = "teacher"
    alpha: float = 1.0
    weight_combine: str = "max"
    teacher: Tensor | None = None

    @property
    def weighted(self) -> bool:
        return self.pair_weight is not None and self.pair_weight != "none"

    def coefficients(self, loss: str, scores: Tensor, mask: Tensor) -> Tensor:
        """``[B, N, N]``: the pair weights, or 1, on valid ordered pairs; 0 elsewhere."""
        w = pair_weights(
            mask,
            pair_weight=self.pair_weight,
            student=scores,
            teacher=self.teacher,
            weight_ranks=self.weight_ranks,
            alpha=self.alpha,
            weight_combine=self.weight_combine,
            loss=loss,
        )
        if w is None:
            return _pair_mask(mask).to(scores.dtype)
        return w.to(scores.dtype)


#: the options every pairwise loss takes (through :func:`_pair_weighted`), with defaults
PAIR_OPTIONS: dict[str, Any] = {
    "pair_weight": None,
    "weight_ranks": "teacher",
    "alpha": 1.0,
    "weight_combine": "max",
}


def _pairwise(
    loss: str,
    scores: Tensor,
    mask: Tensor,
    weighting: PairWeighting,
    pair_loss: Callable[[Tensor], Tensor],
    pair_target: Tensor | None = None,
) -> Tensor:
    """The one pairwise sum: ``sum_(i,j) w_ij * c_ij * pair_loss(s)_ij`` over the valid
    ordered pairs of each set, ``w`` from ``weighting`` (1 when unweighted), ``c`` the
    ``pair_target`` coefficients (no gradient; 1 when None) and ``pair_loss`` the ``[B, N, N]``
    loss of each pair from the clean scores. Returns ``[B]``."""
    coef = weighting.coefficients(loss, scores, mask)
    if pair_target is not None:
        coef = coef * pair_target
    return (coef * pair_loss(_clean(scores, mask))).sum((-2, -1))


def _pair_weighted(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A pairwise loss ``fn(scores, target, mask, *, weighting, **options)`` with the pair
    options of :data:`PAIR_OPTIONS` (and ``teacher=`` for label losses ranked by the teacher)
    in place of ``weighting``: the options are defined once for every pairwise loss."""

    @functools.wraps(fn)
    def loss(
        scores: Tensor,
        target: Tensor,
        mask: Tensor,
        *,
        pair_weight: str | None = None,
        weight_ranks: str = "teacher",
        alpha: float = 1.0,
        weight_combine: str = "max",
        teacher: Tensor | None = None,
        **options: Any,
    ) -> Tensor:
        weighting = PairWeighting(pair_weight, weight_ranks, alpha, weight_combine, teacher)
        return fn(scores, target, mask, weighting=weighting, **options)

    own = [p for p in inspect.signature(fn).parameters.values() if p.name != "weighting"]
    pair = [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
        for k, v in PAIR_OPTIONS.items()
    ]
    loss.__signature__ = inspect.Signature(own + pair)  # type: ignore[attr-defined]
    del loss.__wrapped__  # the signature above is the loss's own
    return loss


@dataclass(frozen=True)
class LossInfo:
    """A registered loss: its function and what :func:`register` recorded about it."""

    name: str
    fn: Callable[..., Tensor]
    target: str  # "labels" or "teacher"
    families: tuple[str, ...]  # the composite-loss families it may serve in
    options: tuple[str, ...]  # its keyword options (PAIR_OPTIONS included for pairwise ones)
    aliases: Mapping[str, str] = field(default_factory=dict)  # old option name -> new one

    def __call__(self, scores: Tensor, target: Tensor, mask: Tensor, **options: Any) -> Tensor:
        return self.fn(scores, target, mask, **options)

    @property
    def pairwise(self) -> bool:
        """Takes pair weights."""
        return "pair_weight" in self.options

    def takes(self, option: str) -> bool:
        return option in self.options


#: every loss, by name, in definition order (filled by :func:`register`)
LOSSES: dict[str, LossInfo] = {}


def register(
    target: str, *families: str, aliases: Mapping[str, str] | None = None
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a loss whose ``target`` is ``"labels"`` or ``"teacher"``, usable in the
    composite-loss ``families``; its options are read from its signature once, here."""

    def wrap(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        params = list(inspect.signature(fn).parameters.values())[3:]
        options = tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "teacher")
        info = LossInfo(fn.__name__, fn, target, tuple(families), options, dict(aliases or {}))
        LOSSES[info.name] = info
        return fn

    return wrap


def losses_of(family: str) -> tuple[str, ...]:
    """The names of the losses a family may use, in definition order."""
    return tuple(name for name, info in LOSSES.items() if family in info.families)


# ---------------------------------------------------------------------------------------------
# label losses
# ---------------------------------------------------------------------------------------------


@register("labels", "label")
def label_sigmoid_ce(
    scores: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    graded: str = "binarize",
    max_grade: float | None = None,
    uniform_sets: str = "keep",
) -> Tensor:
    """Pointwise sigmoid cross entropy with labels (eq. 2, 3).

    ``L = sum_i BCEWithLogits(s_i, y'_i) = sum_i softplus(s_i) - y'_i s_i`` where ``y'`` is
    ``graded="binarize"``: ``1[y > 0]`` (default); ``"scale"``: ``clip(y / max_grade, 0, 1)``
    (``max_grade`` default: the largest valid label of the batch, at least 1); ``"raw"``:
    ``y`` as given (must be in [0, 1]).
    Every valid item of every set counts (``uniform_sets="keep"``, the default): a one-item set
    and a set whose labels are all equal (a page view without a click) carry calibration
    signal. ``uniform_sets="zero"`` gives 0 for sets whose ``y'`` are all equal (one-item sets
    included), like the pairwise and listwise label losses.

    >>> s = torch.tensor([[0.0, 2.0]]); y = torch.tensor([[0.0, 0.0]])
    >>> round(float(label_sigmoid_ce(s, y, y == 0)[0]), 4)  # log 2 + softplus(2)
    2.8201
    """
    name = "label_sigmoid_ce"
    _check_inputs(name, scores, target, mask)
    _option(name, "graded", graded)
    _option(name, "uniform_sets", uniform_sets)
    n = _count(mask)
    if graded == "binarize":
        y = ((target > 0) & mask).to(scores.dtype)
        pos = y.sum(-1)
        differs = (pos > 0) & (pos < n)
    else:
        y = _clean(target.to(scores.dtype), mask)
        if graded == "scale":
            if max_grade is None:
                top = float(y.max()) if y.numel() else 1.0
                max_grade = max(top, 1.0)
            max_grade = _option(name, "max_grade", max_grade)
            y = (y / max_grade).clamp(0.0, 1.0)
        differs = _differs(y, mask)
    # masked items: s = -huge, y = 0 -> softplus(s) - y s = 0 exactly, with zero gradient
    # (one fused kernel forward and backward: this term runs in every training step)
    s = torch.where(mask, scores, _neg_fill(scores.dtype))
    value = F.binary_cross_entropy_with_logits(s, y, reduction="none").sum(-1)
    if uniform_sets == "zero":
        return _gate(value, differs)
    return value


@register("labels", "rank_label")
@_pair_weighted
def label_pairwise_logistic(
    scores: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    ties: str = "zero",
    weighting: PairWeighting,
) -> Tensor:
    """Pairwise logistic loss with labels (eq. 8).

    ``L = sum_(i,j) w_ij * -y_ij log sigmoid(s_i - s_j)``, ``y_ij = 1`` if ``y_i > y_j`` else
    0; ``ties="half"`` sets ``y_ij = 0.5`` for equal labels. ``w_ij`` = 1 or the pair weights
    (see ``pair_weights``; teacher ranks need ``teacher=`` logits).

    >>> s = torch.tensor([[0.2, 0.1, -0.4, 1.0]], dtype=torch.float64)
    >>> y = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    >>> round(float(label_pairwise_logistic(s, y, y > -1)[0]), 6)
    1.643456
    """
    name = "label_pairwise_logistic"
    _check_inputs(name, scores, target, mask)
    _option(name, "ties", ties)
    y = _clean(target.to(scores.dtype), mask)
    with torch.no_grad():
        dy = _pair_diff(y)
        y_pair = (dy > 0).to(scores.dtype)
        if ties == "half":
            y_pair = y_pair.add_((dy == 0).to(scores.dtype), alpha=0.5)
    value = _pairwise(
        name, scores, mask, weighting, lambda s: -F.logsigmoid(_pair_diff(s)), pair_target=y_pair
    )
    return _gate(value, _differs(y, mask))


@register("labels", "label", "rank_label")
def label_softmax(
    scores: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    variant: str = "standard",
) -> Tensor:
    """Softmax cross entropy with labels (eq. 9, 10).

    ``"standard"``: ``L = -sum_i yhat_i log softmax(s)_i``, ``yhat_i = y_i / sum_j y_j``
    (``1/P`` for the ``P`` positives of binary labels; negative labels count as 0).
    ``"disjoint"`` (eq. 10): ``L = -sum_i yhat_i log sum_(j: y_j = y_i) softmax(s)_j``, the
    softmax mass of all items with the same label as ``i`` (computed with log-sum-exp).
    Sets without a positive label give 0.

    >>> s = torch.tensor([[0.2, 0.1, -0.4, 1.0]], dtype=torch.float64)
    >>> y = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    >>> round(float(label_softmax(s, y, y > -1)[0]), 6)
    1.143125
    """
    name = "label_softmax"
    _check_inputs(name, scores, target, mask)
    _option(name, "variant", variant)
    pos = _clean(target.to(scores.dtype).clamp(min=0.0), mask)
    total = pos.sum(-1, keepdim=True)
    # labels differ <=> not every valid item has the largest label (masked items are 0 <= it)
    top = (pos == pos.amax(-1, keepdim=True)) & mask if pos.shape[-1] else mask
    keep = (top.sum(-1) < _count(mask)) & (total.squeeze(-1) > 0)
    yhat = pos / total.clamp(min=torch.finfo(pos.dtype).tiny)
    fill = _neg_fill(scores.dtype)
    s = torch.where(mask, scores, fill)
    if variant == "standard":
        log_p = torch.log_softmax(s, dim=-1)
    else:
        same = (pos[:, :, None] == pos[:, None, :]) & mask[:, :, None] & mask[:, None, :]
        log_group = torch.logsumexp(torch.where(same, s[:, None, :], fill), dim=-1)
        log_p = log_group - torch.logsumexp(s, dim=-1, keepdim=True)
    # yhat = 0 on masked items and log_p is finite there (finite fill), so they add exactly 0
    value = -(yhat * log_p).sum(-1)
    return _gate(value, keep)


# ---------------------------------------------------------------------------------------------
# score (pointwise distillation) losses
# ---------------------------------------------------------------------------------------------


@register("teacher", "score")
def score_l2(scores: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Squared error to the teacher logits (eq. 4): ``L = sum_i (t_i - s_i)^2`` over every
    valid item (a one-item set included).

    >>> s, t = torch.tensor([[1.0]]), torch.tensor([[3.0]])
    >>> float(score_l2(s, t, torch.tensor([[True]]))[0])  # a one-item set counts
    4.0
    """
    _check_inputs("score_l2", scores, target, mask)
    d = _clean(target.to(scores.dtype) - scores, mask)
    return d.square().sum(-1)


@register("teacher", "score")
def score_sigmoid_ce(scores: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Sigmoid cross entropy to the teacher's probabilities (eq. 5-7).

    ``L = sum_i -q_i log p_i - (1 - q_i) log(1 - p_i)``, ``q = sigmoid(t)``, ``p = sigmoid(s)``,
    computed from logits as ``softplus(s_i) - q_i s_i``, over every valid item (a one-item set
    included).

    >>> z = torch.tensor([[0.0]])
    >>> round(float(score_sigmoid_ce(z, z, z == 0)[0]), 4)  # log 2
    0.6931
    """
    _check_inputs("score_sigmoid_ce", scores, target, mask)
    s = _clean(scores, mask)
    q = torch.sigmoid(_clean(target.to(scores.dtype), mask))
    per_item = F.binary_cross_entropy_with_logits(s, q, reduction="none")
    return _clean(per_item, mask).sum(-1)


# ---------------------------------------------------------------------------------------------
# rank distillation losses
# ---------------------------------------------------------------------------------------------


@register("teacher", "rank")
@_pair_weighted
def rank_l2(
    scores: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    form: str | None = None,
    weighting: PairWeighting,
) -> Tensor:
    """Pairwise squared error of score differences (eq. 12, 15, 16).

    ``L = sum_(i,j) w_ij ((t_i - t_j) - (s_i - s_j))^2``; unweighted it equals
    ``2 N sum_i d_i^2 - 2 (sum_i d_i)^2 = 2 N sum_i (d_i - mean(d))^2``, ``d = t - s``.
    ``form="list"`` (default when unweighted) computes the O(N) identity (in the centred,
    cancellation-free form); ``form="pair"`` the O(N^2) sum. Both are equal. With pair weights
    the pair form is used (``form="list"`` is then an error).
    Gradient: ``dL/ds_k = -(4 N d_k - 4 sum_i d_i)``.

    >>> s = torch.tensor([[0.2, 0.1, -0.4, 1.0]], dtype=torch.float64)
    >>> t = torch.tensor([[1.5, -0.5, 0.3, 2.0]], dtype=torch.float64)
    >>> round(float(rank_l2(s, t, t > -9)[0]), 6), round(float(rank_l2(s, t, t < 2)[0]), 6)
    (16.8, 11.32)
    """
    name = "rank_l2"
    _check_inputs(name, scores, target, mask)
    if form is None:
        form = "pair" if weighting.weighted else "list"
    _option(name, "form", form)
    if weighting.weighted and form == "list":
        raise ConfigError(f"loss {name}: pair weights need form='pair' (got form='list')")
    n = _count(mask)
    t = _clean(target.to(scores.dtype), mask)
    if form == "list":
        d = _clean(target.to(scores.dtype) - scores, mask)
        nf = n.to(scores.dtype)
        mean = d.sum(-1, keepdim=True) / nf.clamp(min=1.0).unsqueeze(-1)
        dev = (d - mean) * mask.to(scores.dtype)  # d is clean (finite): a product is safe
        value = 2.0 * nf * dev.square().sum(-1)
    else:
        weighting = dataclasses.replace(weighting, teacher=target)
        dt = _pair_diff(t)
        value = _pairwise(name, scores, mask, weighting, lambda s: (dt - _pair_diff(s)).square())
    return _gate(value, n >= 2)


@register("teacher", "rank")
@_pair_weighted
def rank_pairwise_ce(
    scores: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    weighting: PairWeighting,
) -> Tensor:
    """Pairwise cross entropy to the teacher's pair probabilities (eq. 19, 24).

    ``L = g^2 * sum_(i,j) w_ij * -sigmoid((t_i - t_j)/g) log sigmoid((s_i - s_j)/g)`` with
    temperature ``g`` (default 1). For ``g -> inf``, ``L(s) - L(t)`` tends to ``rank_l2 / 16``.

    >>> s = torch.tensor([[0.2, 0.1, -0.4, 1.0]], dtype=torch.float64)
    >>> t = torch.tensor([[1.5, -0.5, 0.3, 2.0]], dtype=torch.float64)
    >>> round(float(rank_pairwise_ce(s, t, t > -9)[0]), 6)
    3.570982
    """
    name = "rank_pairwise_ce"
    _check_inputs(name, scores, target, mask)
    g = _option(name, "temperature", temperature)
    t = _clean(target.to(scores.dtype), mask)
    weighting = dataclasses.replace(weighting, teacher=target)
    value = _pairwise(
        name,
        scores,
        mask,
        weighting,
        lambda s: -(g * g) * F.logsigmoid(_pair_diff(s / g)),
        pair_target=torch.sigmoid(_pair_diff(t / g)),
    )
    return _gate(value, _count(mask) >= 2)


@register("teacher", "rank")
@_pair_weighted
def rank_conditional(
    scores: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    weighting: PairWeighting,
) -> Tensor:
    """Conditional pairwise loss (eq. 20, 21, as reconstructed).

    With ``q = sigmoid(t)``: ``L = sum_(i,j: q_i > q_j) w_ij (q_i - q_j) softplus(-(s_i - s_j))``
    (the pair's expected label difference times its logistic loss).

    >>> s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    >>> t = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    >>> round(float(rank_conditional(s, t, t > -9)[0]), 6)  # (q_1 - q_2) log 2
    0.320315
    """
    name = "rank_conditional"
    _check_inputs(name, scores, target, mask)
    q = torch.sigmoid(_clean(target.to(scores.dtype), mask))
    weighting = dataclasses.replace(weighting, teacher=target)
    value = _pairwise(
        name,
        scores,
        mask,
        weighting,
        lambda s: F.softplus(-_pair_diff(s)),
        pair_target=_pair_diff(q).clamp(min=0.0),
    )
    return _gate(value, _count(mask) >= 2)


@register("teacher", "rank")
def rank_softmax_ce(
    scores: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Listwise softmax cross entropy to the teacher (eq. 22, 23, 25).

    ``L = g^2 * (-sum_i softmax(t/g)_i log softmax(s/g)_i)`` over the valid items, temperature
    ``g`` (default 1).

    >>> s = torch.tensor([[0.2, 0.1, -0.4, 1.0]], dtype=torch.float64)
    >>> t = torch.tensor([[1.5, -0.5, 0.3, 2.0]], dtype=torch.float64)
    >>> [round(float(rank_softmax_ce(s, t, t > -9, temperature=g)[0]), 6) for g in (1.0, 2.0)]
    [1.178575, 5.311825]
    """
    name = "rank_softmax_ce"
    _check_inputs(name, scores, target, mask)
    g = _option(name, "temperature", temperature)
    fill = _neg_fill(scores.dtype)
    t = torch.where(mask, target.to(scores.dtype) / g, fill)
    s = torch.where(mask, scores / g, fill)
    p = torch.softmax(t, dim=-1)
    log_q = torch.log_softmax(s, dim=-1)
    value = -(g * g) * _clean(p * log_q, mask).sum(-1)
    return _gate(value, _count(mask) >= 2)


@register("teacher", "rank", aliases={"tau": "temperature"})
def rank_spearman(
    scores: Tensor,
    target: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Squared error between the teacher's ranks and the student's soft ranks (eq. 26).

    ``L = sum_i (u_i - r_i)^2``, ``u`` the teacher's 1-based ranks (descending, ties by item
    order, no gradient), ``r_i = 1 + sum_(j != i) sigmoid((s_j - s_i) / g)`` the student's
    differentiable soft ranks, temperature ``g`` (default 1; the option was called ``tau``,
    which a :class:`LossTerm` still accepts).

    >>> s = torch.tensor([[2.0, -2.0]], dtype=torch.float64)
    >>> t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    >>> round(float(rank_spearman(s, t, t > -9)[0]), 6)  # soft ranks 1.018, 1.982
    0.000647
    """
    name = "rank_spearman"
    _check_inputs(name, scores, target, mask)
    g = _option(name, "temperature", temperature)
    u = ranks(target.to(scores.dtype), mask)
    s = _clean(scores, mask)
    soft = torch.sigmoid(_pair_diff(s / g).transpose(-2, -1))  # (i, j) -> sigmoid(s_j - s_i)
    r = 1.0 + torch.where(_pair_mask(mask), soft, 0.0).sum(-1)
    value = _clean(u - r, mask).square().sum(-1)
    return _gate(value, _count(mask) >= 2)


def reduce_sets(per_set: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Combine per-set values ``[B]`` into a scalar.

    ``"mean"``: mean over the sets with at least one valid item (0 if there is none);
    ``"sum"``: their sum.
    """
    _choice("reduce_sets", "reduction", reduction, ("mean", "sum"))
    return _reduce(per_set, mask.any(-1), reduction)


def _reduce(per_set: Tensor, present: Tensor, reduction: str) -> Tensor:
    total = _clean(per_set, present).sum()
    if reduction == "sum":
        return total
    return total / present.sum().clamp(min=1).to(per_set.dtype)


# ---------------------------------------------------------------------------------------------
# composite loss
# ---------------------------------------------------------------------------------------------

FAMILIES = ("label", "score", "rank_label", "rank")


def _weight_number(spec: Any, text: str, context: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{context}: weight {spec!r}: {text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{context}: weight {spec!r} must be finite and >= 0, got {text}")
    return v


def _step_number(spec: Any, text: str, context: str) -> int:
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{context}: weight {spec!r}: {text!r} is not a whole number of steps"
        ) from None
    if v < 0:
        raise ConfigError(f"{context}: weight {spec!r}: steps must be >= 0, got {v}")
    return v


@dataclass(frozen=True)
class WeightSchedule:
    """A loss weight as a function of the training step (or round).

    - ``constant``: ``start`` at every step;
    - ``linear``: ``start`` at step 0 to ``end`` at step ``steps``, linearly, then ``end``;
    - ``step``: ``start`` before step ``steps``, ``end`` from it on.
    """

    kind: str = "constant"
    start: float = 1.0
    end: float = 1.0
    steps: int = 0

    def __post_init__(self) -> None:
        _choice("weight schedule", "kind", self.kind, ("constant", "linear", "step"))
        for key in ("start", "end"):
            _weight_number(self, str(getattr(self, key)), "weight schedule")
        if self.steps < 0:
            raise ConfigError(f"weight schedule: steps must be >= 0, got {self.steps}")

    @classmethod
    def constant(cls, value: float) -> WeightSchedule:
        return cls("constant", float(value), float(value), 0)

    @classmethod
    def parse(cls, spec: str | float | WeightSchedule, context: str = "loss") -> WeightSchedule:
        """``0.5`` / ``"0.5"`` constant; ``"linear:START:END:STEPS"``; ``"step:V0:V1:AT_STEP"``."""
        if isinstance(spec, WeightSchedule):
            return spec
        if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
            raise ConfigError(
                f"{context}: weight {spec!r} must be a number or a schedule string "
                "('0.5', 'linear:START:END:STEPS', 'step:V0:V1:AT_STEP')"
            )
        if not isinstance(spec, str):
            return cls.constant(_weight_number(spec, str(spec), context))
        parts = [p.strip() for p in spec.strip().split(":")]
        if len(parts) == 1:
            return cls.constant(_weight_number(spec, parts[0], context))
        kind = parts[0].lower()
        if kind not in ("linear", "step") or len(parts) != 4:
            raise ConfigError(
                f"{context}: weight {spec!r} is not understood; expected a number, "
                "'linear:START:END:STEPS' or 'step:V0:V1:AT_STEP'"
            )
        start = _weight_number(spec, parts[1], context)
        end = _weight_number(spec, parts[2], context)
        steps = _step_number(spec, parts[3], context)
        return cls(kind, start, end, steps)

    def value(self, step: int) -> float:
        """The weight at ``step`` (>= 0)."""
        if self.kind == "constant":
            return self.start
        if self.kind == "step":
            return self.start if step < self.steps else self.end
        if self.steps == 0 or step >= self.steps:
            return self.end
        frac = max(step, 0) / self.steps
        return self.start + (self.end - self.start) * frac

    @property
    def always_zero(self) -> bool:
        return self.start == 0 and (self.kind == "constant" or self.end == 0)

    def __str__(self) -> str:
        if self.kind == "constant":
            return f"{self.start:g}"
        return f"{self.kind}:{self.start:g}:{self.end:g}:{self.steps}"


def needs_teacher_ranks(loss: str, options: Mapping[str, Any]) -> bool:
    """A label loss whose pair weights rank items by the teacher (it needs ``teacher=``)."""
    info = LOSSES[loss]
    if info.target != "labels" or not info.pairwise:
        return False
    pw = options.get("pair_weight")
    return pw not in (None, "none") and options.get("weight_ranks", "teacher") != "student"


@dataclass
class LossTerm:
    """One term of the composite loss: ``family`` (see ``FAMILIES``), ``loss`` (a name in
    ``losses_of(family)``), ``weight`` (number, schedule string or ``WeightSchedule``) and
    ``options`` passed to the loss function, each checked here against :data:`OPTIONS`."""

    family: str
    loss: str
    weight: float | WeightSchedule | str = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(
                f"loss family {self.family!r} is unknown; valid families: {', '.join(FAMILIES)}"
            )
        if self.loss not in LOSSES:
            raise ConfigError(
                f"loss {self.loss!r} (family {self.family}) is unknown; valid losses: "
                + ", ".join(LOSSES)
            )
        info = LOSSES[self.loss]
        if self.family not in info.families:
            raise ConfigError(
                f"loss {self.loss!r} is not allowed in family {self.family!r}; valid for "
                f"{self.family}: {', '.join(losses_of(self.family))}"
            )
        self.schedule = WeightSchedule.parse(self.weight, context=f"loss term {self.family}")
        self.options = {info.aliases.get(k, k): v for k, v in dict(self.options or {}).items()}
        unknown = sorted(k for k in self.options if not info.takes(k))
        if unknown:
            raise ConfigError(
                f"loss {self.loss}: unknown option(s) {', '.join(unknown)}; valid options: "
                + (", ".join(info.options) or "none")
            )
        # bad option values fail now, not in the middle of training
        for key, value in self.options.items():
            _option(self.loss, key, value)
        weighted = self.options.get("pair_weight") not in (None, "none")
        if weighted and self.options.get("form") == "list":
            raise ConfigError(f"loss {self.loss}: pair weights need form='pair' (got form='list')")

    @property
    def target(self) -> str:
        """``"labels"`` or ``"teacher"``."""
        return LOSSES[self.loss].target

    @property
    def needs_teacher_ranks(self) -> bool:
        """A label loss whose pair weights rank items by the teacher."""
        return needs_teacher_ranks(self.loss, self.options)

    @property
    def uses_teacher(self) -> bool:
        return self.target == "teacher" or self.needs_teacher_ranks


class CompositeLoss:
    """``L = sum_terms weight(step) * reduce_sets(loss(scores, target, mask))``.

    Calling it returns ``(total, values)``: ``total`` a scalar tensor to back-propagate and
    ``values`` a dict of each term's unweighted reduced value keyed by family (``family.loss``
    when a family has several terms, with ``#k`` appended for exact repeats) plus ``"total"``.
    Label terms only see the sets marked in ``label_mask`` (label-scarce clients); a term whose
    weight is 0 at ``step`` is still evaluated (without gradient) for logging, or reported as
    0.0 when it needs the teacher and ``teacher`` is None.
    """

    def __init__(self, terms: Sequence[LossTerm | Mapping[str, Any]], reduction: str = "mean"):
        self.terms: list[LossTerm] = [
            t if isinstance(t, LossTerm) else LossTerm(**dict(t)) for t in terms
        ]
        if not self.terms:
            raise ConfigError("composite loss: at least one loss term is needed")
        _choice("composite loss", "reduction", reduction, ("mean", "sum"))
        self.reduction = reduction
        self.keys = self._make_keys()

    def _make_keys(self) -> list[str]:
        fams = [t.family for t in self.terms]
        keys: list[str] = []
        for t in self.terms:
            key = t.family if fams.count(t.family) == 1 else f"{t.family}.{t.loss}"
            base, k = key, 2
            while key in keys:
                key, k = f"{base}#{k}", k + 1
            keys.append(key)
        return keys

    @property
    def needs_teacher(self) -> bool:
        """True if some term with a weight that is not always 0 uses the teacher logits."""
        return any(t.uses_teacher and not t.schedule.always_zero for t in self.terms)

    def weights(self, step: int = 0) -> dict[str, float]:
        """Each term's weight at ``step``, keyed like the values."""
        return {k: t.schedule.value(step) for k, t in zip(self.keys, self.terms, strict=True)}

    def __call__(
        self,
        scores: Tensor,
        labels: Tensor | None,
        teacher: Tensor | None,
        mask: Tensor,
        step: int = 0,
        label_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        values: dict[str, float] = {}
        label_item_mask = mask
        present = _count(mask) > 0  # (a sum is about twice as fast as any() on CPU)
        label_present = present
        if label_mask is not None:
            label_mask = label_mask.to(device=mask.device, dtype=torch.bool).reshape(-1)
            if label_mask.shape[0] != mask.shape[0]:
                raise ValueError(
                    f"label_mask has {label_mask.shape[0]} sets, the batch has {mask.shape[0]}"
                )
            label_item_mask = mask & label_mask[:, None]
            label_present = present & label_mask
        # Every loss gives exactly 0 for a set without valid items (and label terms see no item
        # of a set outside ``label_mask``), so the reduction is a plain sum over sets divided by
        # the number of present sets. The weighted per-set values are summed first and reduced
        # once: one small backward graph instead of a reduction per term.
        denominators: dict[int, float] = {}

        def denominator(present_sets: Tensor) -> float:
            if self.reduction == "sum":
                return 1.0
            if id(present_sets) not in denominators:
                denominators[id(present_sets)] = float(max(int(present_sets.sum()), 1))
            return denominators[id(present_sets)]

        weighted: Tensor | None = None
        for key, term in zip(self.keys, self.terms, strict=True):
            w = term.schedule.value(step)
            if term.uses_teacher and teacher is None:
                if w != 0:
                    raise ScoreTableError(
                        f"loss term {key} ({term.loss}, weight {w:g} at step {step}) needs "
                        "teacher scores, but none were given"
                    )
                values[key] = 0.0
                continue
            if term.target == "labels":
                if labels is None:
                    if w != 0:
                        raise ValueError(f"loss term {key} ({term.loss}) needs labels")
                    values[key] = 0.0
                    continue
                target, term_mask, term_present = labels, label_item_mask, label_present
            else:
                target, term_mask, term_present = teacher, mask, present
            options = dict(term.options)
            if term.needs_teacher_ranks:
                options["teacher"] = teacher
            with torch.set_grad_enabled(torch.is_grad_enabled() and w != 0):
                per_set = LOSSES[term.loss].fn(scores, target, term_mask, **options)
            scale = 1.0 / denominator(term_present)
            values[key] = float(per_set.detach().sum()) * scale
            if w != 0:
                contribution = per_set * (w * scale)
                weighted = contribution if weighted is None else weighted + contribution
        # every weight 0: a zero that still back-propagates
        total = weighted.sum() if weighted is not None else _clean(scores, mask).sum() * 0.0
        values["total"] = float(total.detach())
        return total, values

    def __repr__(self) -> str:
        parts = [f"{t.family}:{t.loss}*{t.schedule}" for t in self.terms]
        return f"CompositeLoss({', '.join(parts)}, reduction={self.reduction!r})"
