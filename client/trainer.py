"""Local training and evaluation of the student on a client's example sets.

:func:`train_student` runs ``epochs`` passes over the sets (or at most ``max_steps`` optimiser
steps, or until ``max_seconds`` have passed, checked after each step) with the composite loss:
label terms on the sets whose labels may be used (``label_mask``), teacher terms on every set,
and FedProx's proximal term when ``proximal_mu > 0``. :func:`evaluate_student` scores held-out
sets and returns ranking metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.example_sets import ExampleSets

__all__ = ["TrainSettings", "train_student", "evaluate_student", "settings_from_config"]


@dataclass(frozen=True)
class TrainSettings:
    """How a client trains in one round."""

    epochs: int = 1
    max_steps: int = 0  # 0: no step budget, run ``epochs`` passes
    learning_rate: float = 0.01
    optimizer: str = "adam"
    weight_decay: float = 0.0
    batch_size: int = 16
    proximal_mu: float = 0.0
    seed: int = 0
    step_offset: int = 0  # global step of the first local step (for loss-weight schedules)
    max_seconds: float = 0.0  # 0: no time budget; else stop after the step that exceeds it


def settings_from_config(
    config: Any, *, proximal_mu: float, seed: int, step_offset: int
) -> TrainSettings:
    """TrainSettings from a :class:`~common.config.FedrankConfig`."""
    return TrainSettings(
        epochs=config.local_epochs,
        max_steps=config.local_steps,
        learning_rate=config.learning_rate,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        proximal_mu=proximal_mu,
        seed=seed,
        step_offset=step_offset,
    )


def _optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    return torch.optim.Adam(params, lr=s.learning_rate, weight_decay=s.weight_decay)


def train_student(
    model: torch.nn.Module,
    sets: ExampleSets,
    loss: Any,
    settings: TrainSettings,
    *,
    teacher: np.ndarray | None = None,
    label_mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Train ``model`` in place; returns the mean of each loss term (``loss-<family>``,
    ``loss-total``), ``steps``, ``num-examples`` (sets), ``num-items`` and ``train-seconds``.

    ``teacher`` is the flat teacher logits aligned with ``sets`` (``ScoreTable.align``);
    ``label_mask`` ``[sets.num_sets]`` bool marks the sets whose labels may be used.
    """
    start = time.perf_counter()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)
    if label_mask is not None and label_mask.shape != (sets.num_sets,):
        raise ValueError(f"label_mask has {label_mask.shape} entries for {sets.num_sets} sets")
    anchor = None
    if settings.proximal_mu > 0:
        anchor = [p.detach().clone() for p in model.parameters()]
    optimizer = _optimizer(model, settings)
    extra = {"teacher": teacher} if teacher is not None else None
    sums: dict[str, float] = {}
    weight_total = 0
    step = 0
    model.train()
    epochs = settings.epochs if settings.epochs > 0 else 10**9
    done = timed_out = False
    for epoch in range(epochs):
        batches = sets.batch_positions(
            settings.batch_size, shuffle=True, seed=settings.seed * 7919 + epoch
        )
        for positions in batches:
            batch = sets.pad(positions, extra=extra)
            scores = model(batch.features, batch.mask)
            lm = None if label_mask is None else torch.from_numpy(label_mask[positions])
            total, values = loss(
                scores,
                batch.labels,
                batch.extra.get("teacher"),
                batch.mask,
                step=settings.step_offset + step,
                label_mask=lm,
            )
            if anchor is not None:
                prox = sum(
                    (p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                total = total + 0.5 * settings.proximal_mu * prox
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            n = len(positions)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value * n
            weight_total += n
            step += 1
            if settings.max_steps and step >= settings.max_steps:
                done = True
                break
            if settings.max_seconds > 0 and time.perf_counter() - start >= settings.max_seconds:
                done = timed_out = True
                break
        if done or (settings.epochs == 0 and not batches):
            break
    torch.random.set_rng_state(generator_state)
    out = {f"loss-{k.replace('_', '-')}": v / max(weight_total, 1) for k, v in sums.items()}
    out.update(
        {
            "steps": float(step),
            "stopped-by-time": int(timed_out),
            "num-examples": int(sets.num_sets),
            "num-items": int(sets.num_items),
            "train-seconds": time.perf_counter() - start,
        }
    )
    return out


def evaluate_student(
    model: torch.nn.Module,
    sets: ExampleSets,
    *,
    teacher: np.ndarray | None = None,
    loss: Any = None,
) -> dict[str, float]:
    """Ranking metrics of ``model`` on ``sets`` (``ranking_summary`` keys), plus the loss
    terms (``loss-<family>``) when ``loss`` is given and ``num-examples``."""
    from common.metrics import ndcg, ranking_summary
    from common.models import score_sets

    scores = score_sets(model, sets)
    extra = {"s": scores} if teacher is None else {"s": scores, "t": teacher}
    if sets.relevance is not None:
        extra["r"] = sets.relevance
    batch = sets.pad(extra=extra)
    t = batch.extra.get("t")
    summary = ranking_summary(batch.extra["s"], batch.labels, batch.mask, teacher=t)
    out = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
    if "r" in batch.extra:
        # synthetic data keeps the true relevance behind the clicks: rank quality against it
        # is what a user cares about (clicks are a noisy, position-biased view of it)
        true = ndcg(batch.extra["s"], batch.extra["r"], batch.mask, k=10)
        out["true-ndcg@10"] = float(torch.nanmean(true))
    if loss is not None and (teacher is not None or not loss.needs_teacher):
        with torch.no_grad():
            _, values = loss(batch.extra["s"], batch.labels, t, batch.mask)
        out.update({f"loss-{k.replace('_', '-')}": float(v) for k, v in values.items()})
    out["num-examples"] = int(sets.num_sets)
    return out
