"""Local training and evaluation of the student on a client's example sets.

:func:`train_student` takes :func:`planned_steps` optimiser steps (passes over the sets in a
fresh shuffled order each, as many as the budget needs) with the composite loss: label terms on
the sets whose labels may be used (``label_mask``), teacher terms on every set, and FedProx's
proximal term when ``proximal_mu > 0``. Held-out sets are measured by
:func:`fedrank.common.evaluation.evaluate_model`.

The local budget works from a dozen sets to thousands per client: ``epochs`` passes, but never
fewer than ``min_steps`` steps (a client with 12 sets and batches of 16 would otherwise take one
step per epoch and leave the model where it started); ``steps`` > 0 sets the count exactly.
A device may cap it (``max_steps``, ``max_seconds``). A round whose training was too short to
move the model is flagged in the metrics (``too_short`` = 1, see :data:`MIN_RELATIVE_UPDATE`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedrank.common.config import FedrankConfig
from fedrank.common.example_sets import ExampleSets

__all__ = [
    "MIN_RELATIVE_UPDATE",
    "TrainSettings",
    "planned_steps",
    "train_student",
]

# A round's training is "too short to move the model" when it took fewer than ``min_steps``
# steps (a device cap or time budget cut it) or changed the trainable weights by less than this
# fraction of their norm (||w_after - w_before|| / ||w_before||). One Adam step at the default
# learning rate moves a 16-unit student by about 1e-2 of its norm, so 1e-3 means: no real step.
MIN_RELATIVE_UPDATE = 1e-3


@dataclass(frozen=True)
class TrainSettings:
    """How a client trains in one round."""

    epochs: int = 1
    min_steps: int = 0  # floor of the step count from ``epochs`` (0: no floor)
    steps: int = 0  # > 0: exactly this many steps per round (overrides epochs and min_steps)
    max_steps: int = 0  # > 0: a cap on the steps (a device's budget); 0: no cap
    learning_rate: float = 0.01
    optimizer: str = "adam"
    weight_decay: float = 0.0
    batch_size: int = 16
    proximal_mu: float = 0.0
    seed: int = 0
    step_offset: int = 0  # global step of the first local step (for loss-weight schedules)
    max_seconds: float = 0.0  # 0: no time budget; else stop after the step that exceeds it

    @classmethod
    def from_config(
        cls, config: FedrankConfig, *, proximal_mu: float = 0.0, seed: int, step_offset: int = 0
    ) -> TrainSettings:
        """A round's training from the run's configuration (validated there): the
        ``local-*``, ``min-local-steps`` and optimiser keys; the device adds its caps."""
        return cls(
            epochs=config.local_epochs,
            min_steps=config.min_local_steps,
            steps=config.local_steps,
            learning_rate=config.learning_rate,
            optimizer=config.optimizer,
            weight_decay=config.weight_decay,
            batch_size=config.batch_size,
            proximal_mu=proximal_mu,
            seed=seed,
            step_offset=step_offset,
        )


def planned_steps(settings: TrainSettings, num_sets: int, capped: bool = True) -> int:
    """Optimiser steps of one round on ``num_sets`` sets: ``steps`` if set, else
    ``max(epochs * ceil(num_sets / batch_size), min_steps)``; with ``capped``, at most
    ``max_steps`` (when set). 0 for a client without sets."""
    if num_sets < 1:
        return 0
    if settings.steps > 0:
        wanted = settings.steps
    else:
        per_epoch = -(-int(num_sets) // max(int(settings.batch_size), 1))
        wanted = max(settings.epochs * per_epoch, settings.min_steps)
    if capped and settings.max_steps > 0:
        wanted = min(wanted, settings.max_steps)
    return int(wanted)


def _relative_change(before: list[torch.Tensor], model: torch.nn.Module) -> float:
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    moved = sum(float((a - b).pow(2).sum()) for a, b in zip(after, before, strict=True))
    size = sum(float(b.pow(2).sum()) for b in before)
    return (moved**0.5) / max(size**0.5, 1e-12)


def _optimizer(model: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    try:
        # the fused kernel updates every tensor in one call: a student's few small tensors
        # cost ~3x less per step than Adam's per-tensor loop (the same update)
        return torch.optim.Adam(params, lr=s.learning_rate, weight_decay=s.weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
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
    """Train ``model`` in place for :func:`planned_steps` steps; returns the mean of each loss
    term (``loss_<family>``, ``loss_total``), ``steps`` (taken), ``steps_planned`` (before a
    device cap), ``relative_update`` (``||w_after - w_before|| / ||w_before||``),
    ``too_short`` (1 when the round could not move the model, see
    :data:`MIN_RELATIVE_UPDATE`), ``stopped_by_time``, ``num_examples`` (sets),
    ``num_items`` and ``train_seconds``.

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
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    target = planned_steps(settings, sets.num_sets)
    sums: dict[str, float] = {}
    weight_total = 0
    step = 0
    timed_out = False
    model.train()
    epoch = 0
    while step < target and not timed_out:
        batches = sets.batch_positions(
            settings.batch_size, shuffle=True, seed=settings.seed * 7919 + epoch
        )
        epoch += 1
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
            if step >= target:
                break
            if settings.max_seconds > 0 and time.perf_counter() - start >= settings.max_seconds:
                timed_out = True
                break
    torch.random.set_rng_state(generator_state)
    out = {f"loss_{k}": v / max(weight_total, 1) for k, v in sums.items()}
    relative = _relative_change(before, model) if before else 0.0
    short = step < min(settings.min_steps, planned_steps(settings, sets.num_sets, capped=False))
    out.update(
        {
            "steps": float(step),
            "steps_planned": int(planned_steps(settings, sets.num_sets, capped=False)),
            "relative_update": relative,
            "too_short": int(short or relative < MIN_RELATIVE_UPDATE),
            "stopped_by_time": int(timed_out),
            "num_examples": int(sets.num_sets),
            "num_items": int(sets.num_items),
            "train_seconds": time.perf_counter() - start,
        }
    )
    return out
