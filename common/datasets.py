"""One entry point for data: ``load_dataset("synthetic")`` or a LETOR fold folder / file.

Spec forms:

* ``synthetic`` - the default generated data (:mod:`fedrank.common.synthetic`), or
  ``synthetic:key=value,key=value`` to change :class:`~fedrank.common.synthetic.SyntheticConfig`
  knobs, e.g. ``synthetic:num_sets=400,max_items=20``;
* a LETOR fold folder holding ``train`` / ``vali`` / ``test`` (``.txt`` or ``.txt.gz``);
* a LETOR data root holding ``Fold1`` ... (``Fold1`` is used; name another fold folder to pick
  it);
* a single LETOR file: it becomes ``train``, and ``vali`` / ``test`` are split off by set.

When ``vali`` or ``test`` is missing it is split off ``train`` by set (10% each, seeded by
``seed``) and :attr:`Dataset.notes` records it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedrank.common.errors import DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.letor import SPLIT_NAMES, find_split_file, read_letor, read_letor_folder
from fedrank.common.synthetic import SyntheticConfig, generate_synthetic, split_synthetic

__all__ = ["Dataset", "load_dataset", "resolve_letor", "split_off"]

HOLDOUT_FRACTION = 0.1  # share of train sets split off for a missing vali or test


@dataclass(frozen=True, eq=False)
class Dataset:
    """Named train / vali / test example sets plus which columns a device may see."""

    name: str
    splits: dict[str, ExampleSets]
    student_columns: np.ndarray  # columns a device may see (all columns for LETOR)
    privileged_columns: np.ndarray  # columns only the teacher sees (none for LETOR)
    source: str = ""  # the spec or path it came from
    notes: tuple[str, ...] = field(default_factory=tuple)  # e.g. how missing splits were made

    @property
    def num_features(self) -> int:
        return self.splits["train"].num_features

    @property
    def train(self) -> ExampleSets:
        return self.splits["train"]

    @property
    def vali(self) -> ExampleSets:
        return self.splits["vali"]

    @property
    def test(self) -> ExampleSets:
        return self.splits["test"]

    def fingerprint(self) -> str:
        """Content hash of all splits (features, labels, ids): a cache key for derived work."""
        h = hashlib.sha256(self.name.encode())
        for name in sorted(self.splits):
            part = self.splits[name]
            h.update(name.encode())
            for arr in (part.features, part.labels, part.offsets):
                h.update(np.ascontiguousarray(arr).tobytes())
            h.update("\x00".join(part.set_ids.tolist()).encode())
        h.update(self.student_columns.tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        parts = ", ".join(
            f"{k} {v.num_sets} sets/{v.num_items} items" for k, v in self.splits.items()
        )
        return f"{self.name}: {self.num_features} features; {parts}"


def load_dataset(spec: str, seed: int = 0) -> Dataset:
    """Load ``spec`` (see the module docstring) with ``train``, ``vali`` and ``test`` splits."""
    spec = str(spec).strip()
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _synthetic(spec, seed)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataFormatError(
            f"data {spec!r}: no such file or folder (expected 'synthetic', a LETOR fold folder "
            f"or a LETOR file)"
        )
    kind, splits = resolve_letor(path)
    notes: list[str] = []
    if kind != str(path):
        notes.append(f"using {kind}")
    splits, made = _complete(splits, seed)
    notes += made
    width = splits["train"].num_features
    return Dataset(
        name=_letor_name(Path(kind)),
        splits=splits,
        student_columns=np.arange(width, dtype=np.int64),
        privileged_columns=np.zeros(0, dtype=np.int64),
        source=str(path),
        notes=tuple(notes),
    )


def resolve_letor(path: Path) -> tuple[str, dict[str, ExampleSets]]:
    """Read a LETOR file, fold folder or data root; returns (what was read, splits found)."""
    if path.is_file():
        return str(path), {"train": read_letor(path)}
    if find_split_file(path, "train") is not None:
        return str(path), read_letor_folder(path)
    fold = path / "Fold1"
    if fold.is_dir() and find_split_file(fold, "train") is not None:
        return str(fold), read_letor_folder(fold)
    raise DataFormatError(
        f"{path}: expected a LETOR file, a fold folder with train.txt[.gz] "
        f"(and vali/test), or a data root with Fold1/"
    )


def split_off(sets: ExampleSets, fraction: float, seed: int) -> tuple[ExampleSets, ExampleSets]:
    """Split ``sets`` by set (seeded): (rest, held out ``fraction``, at least one set each)."""
    if sets.num_sets < 2:
        raise DataFormatError(
            f"cannot split a held-out part off {sets.num_sets} set(s); provide vali/test files"
        )
    perm = np.random.default_rng(seed).permutation(sets.num_sets)
    k = min(max(1, int(round(sets.num_sets * fraction))), sets.num_sets - 1)
    held, rest = np.sort(perm[:k]), np.sort(perm[k:])
    return sets.take(rest), sets.take(held)


def _complete(
    splits: dict[str, ExampleSets], seed: int
) -> tuple[dict[str, ExampleSets], list[str]]:
    out = dict(splits)
    notes = []
    for offset, name in enumerate(s for s in SPLIT_NAMES if s != "train"):
        if name in out:
            continue
        train = out["train"]
        out["train"], out[name] = split_off(train, HOLDOUT_FRACTION, seed + 1000 * (offset + 1))
        notes.append(
            f"{name} split off train: {out[name].num_sets} of {train.num_sets} sets (seed {seed})"
        )
    return {name: out[name] for name in SPLIT_NAMES}, notes


def _synthetic(spec: str, seed: int) -> Dataset:
    overrides: dict[str, str] = {}
    if ":" in spec:
        for item in filter(None, (s.strip() for s in spec.split(":", 1)[1].split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise DataFormatError(
                    f"data {spec!r}: expected 'synthetic:key=value,...', got {item!r}"
                )
            overrides[key.strip()] = value.strip()
    config = SyntheticConfig.from_overrides(overrides) if overrides else SyntheticConfig()
    data = generate_synthetic(config, seed=seed)
    splits, made = _complete(split_synthetic(data), seed)
    return Dataset(
        name="synthetic",
        splits=splits,
        student_columns=data.student_columns,
        privileged_columns=data.privileged_columns,
        source=spec,
        notes=(f"generated with seed {seed}", *made),
    )


def _letor_name(path: Path) -> str:
    resolved = path.resolve()
    parts = [p for p in (resolved.parent.name, resolved.name) if p]
    name = "/".join(parts)
    for suffix in (".gz", ".txt"):
        name = name.removesuffix(suffix)
    return name
