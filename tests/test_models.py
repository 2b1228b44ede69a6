"""Teacher and student models: shapes, masking, equivariance, specs, scoring and learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrank.common.errors import ConfigError, DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.letor import read_letor
from fedrank.common.metrics import nanmean, ndcg
from fedrank.common.models import (
    StudentModel,
    TeacherModel,
    build_model,
    count_parameters,
    score_sets,
)

F = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_sets(num_sets: int = 12, num_features: int = F, seed: int = 0) -> ExampleSets:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, size=num_sets)
    n = int(sizes.sum())
    return ExampleSets(
        features=rng.normal(size=(n, num_features)),
        labels=rng.integers(0, 3, size=n),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        set_ids=[f"q{i}" for i in range(num_sets)],
    )


def models() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        TeacherModel(F, d_model=16, num_heads=2, num_layers=2).eval(),
        StudentModel(F, hidden=(8,), feature_indices=[0, 2, 5]).eval(),
        StudentModel(F, hidden=()).eval(),
    ]


@pytest.mark.parametrize("model", models(), ids=["teacher", "student_mlp", "student_linear"])
def test_shapes_padding_and_empty_rows(model):
    batch = random_sets().pad()
    out = model(batch.features, batch.mask)
    assert out.shape == batch.mask.shape and out.dtype == torch.float32
    assert torch.all(out[~batch.mask] == 0)
    # garbage in the padded cells changes nothing for real items
    noisy = batch.features.clone()
    noisy[~batch.mask] = torch.randn(int((~batch.mask).sum()), F) * 1e3
    torch.testing.assert_close(model(noisy, batch.mask), out)
    # a fully padded row gives zeros and finite gradients, in train mode too
    mask = batch.mask.clone()
    mask[0] = False
    model.train()
    x = batch.features.clone().requires_grad_(True)
    scores = model(x, mask)
    assert torch.all(scores[0] == 0) and torch.all(torch.isfinite(scores))
    scores[mask].sum().backward()
    assert torch.all(torch.isfinite(x.grad))
    assert all(torch.all(torch.isfinite(p.grad)) for p in model.parameters() if p.grad is not None)
    model.eval()


def test_teacher_is_permutation_equivariant_and_set_aware():
    teacher = models()[0]
    batch = random_sets(seed=1).pad()
    out = teacher(batch.features, batch.mask)
    perm = torch.randperm(batch.mask.shape[1], generator=torch.Generator().manual_seed(3))
    permuted = teacher(batch.features[:, perm], batch.mask[:, perm])
    torch.testing.assert_close(permuted, out[:, perm], rtol=1e-5, atol=1e-5)
    # set-aware: changing another real item of the set changes an item's score
    row = int(torch.nonzero(batch.mask.sum(1) >= 2)[0])
    changed = batch.features.clone()
    changed[row, 1] += 5.0
    assert not torch.allclose(teacher(changed, batch.mask)[row, 0], out[row, 0])


def test_student_reads_only_its_columns():
    student = models()[1]
    batch = random_sets(seed=2).pad()
    out = student(batch.features, batch.mask)
    other = batch.features.clone()
    other[..., [1, 3, 4]] = torch.randn_like(other[..., [1, 3, 4]]) * 100
    torch.testing.assert_close(student(other, batch.mask), out)
    other[..., 2] += 1.0
    assert not torch.allclose(student(other, batch.mask), out)
    assert student.num_inputs == 3
    assert count_parameters(student) == 3 * 8 + 8 + 8 + 1
    assert "feature_indices" in student.state_dict()  # the columns travel with the weights


def test_teacher_is_much_larger_than_student():
    teacher, student = TeacherModel(46), StudentModel(46)
    assert count_parameters(teacher) > 50_000
    assert count_parameters(student) < 1_000
    assert count_parameters(teacher) > 100 * count_parameters(student)


@pytest.mark.parametrize("model", models(), ids=["teacher", "student_mlp", "student_linear"])
def test_spec_round_trip(model):
    spec = json.loads(json.dumps(model.spec))
    assert spec["kind"] in ("teacher", "student") and spec["num_features"] == F
    rebuilt = build_model(spec).eval()
    assert rebuilt.spec == model.spec
    rebuilt.load_state_dict(model.state_dict())
    batch = random_sets(seed=4).pad()
    torch.testing.assert_close(
        rebuilt(batch.features, batch.mask), model(batch.features, batch.mask)
    )


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"kind": "oracle", "num_features": 3}, "kind"),
        ({"kind": "teacher"}, "num_features"),
        ({"kind": "teacher", "num_features": 3, "d_model": 10, "num_heads": 4}, "divisible"),
        ({"kind": "teacher", "num_features": 3, "dropout": 1.5}, "dropout"),
        ({"kind": "teacher", "num_features": 3, "feature_indices": [0]}, "feature_indices"),
        ({"kind": "student", "num_features": 3, "hidden": [0]}, "hidden"),
        ({"kind": "student", "num_features": 3, "hidden": "16"}, "hidden"),
        ({"kind": "student", "num_features": 3, "feature_indices": [0, 3]}, "0..2"),
        ({"kind": "student", "num_features": 3, "feature_indices": [1, 1]}, "repeats"),
        ({"kind": "student", "num_features": 3, "feature_indices": []}, "feature_indices"),
        ({"kind": "student", "num_features": 3, "width": 4}, "unknown keys.*width"),
        ({"kind": "student", "num_features": 0}, "num_features"),
        (["student"], "mapping"),
    ],
)
def test_bad_specs_raise_config_error(spec, match):
    with pytest.raises(ConfigError, match=match):
        build_model(spec)


def test_wrong_input_width_is_reported():
    with pytest.raises(DataFormatError, match="built for 6 features, input has 5"):
        StudentModel(F)(torch.zeros(1, 2, 5))


@pytest.mark.parametrize("model", models()[:2], ids=["teacher", "student"])
def test_score_sets_matches_per_set_forward(model):
    sets = random_sets(num_sets=30, seed=5)
    model.train()  # score_sets must switch to eval (no dropout) and restore the mode
    flat = score_sets(model, sets, batch_size=7)
    assert model.training
    model.eval()
    assert flat.dtype == np.float32 and flat.shape == (sets.num_items,)
    for k in range(sets.num_sets):
        lo, hi = sets.offsets[k], sets.offsets[k + 1]
        x = torch.from_numpy(sets.features[lo:hi])[None]
        with torch.no_grad():
            want = model(x, torch.ones(1, hi - lo, dtype=torch.bool))[0].numpy()
        np.testing.assert_allclose(flat[lo:hi], want, rtol=1e-5, atol=1e-5)


def train(model, sets: ExampleSets, epochs: int, lr: float = 3e-3, seed: int = 0) -> None:
    """A few epochs of listwise softmax cross-entropy on the labels."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for batch in sets.batches(32, shuffle=True, seed=seed + epoch):
            logits = model(batch.features, batch.mask).masked_fill(~batch.mask, -1e9)
            target = batch.labels / batch.labels.sum(1, keepdim=True).clamp(min=1e-9)
            loss = -(target * torch.log_softmax(logits, 1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def mean_ndcg(model, sets: ExampleSets, k: int = 10) -> float:
    batch = sets.pad()
    scores = torch.from_numpy(score_sets(model, sets))
    padded = torch.zeros(batch.mask.shape)
    padded[batch.mask] = scores
    return nanmean(ndcg(padded, batch.labels, batch.mask, k))


def contextual_sets(num_sets: int, seed: int) -> ExampleSets:
    """Relevance depends on the set: the items closest to the set's mean of feature 0 are
    relevant, and set means differ widely, so no per-item scorer can rank them."""
    rng = np.random.default_rng(seed)
    sizes = np.full(num_sets, 8)
    x = rng.normal(size=(num_sets, 8, 4)).astype(np.float32)
    x[:, :, 0] += rng.normal(scale=3.0, size=(num_sets, 1))
    dist = np.abs(x[:, :, 0] - x[:, :, 0].mean(1, keepdims=True))
    labels = (dist <= np.sort(dist, 1)[:, [1]]).astype(np.float32)  # the 2 closest
    return ExampleSets(
        features=x.reshape(-1, 4),
        labels=labels.reshape(-1),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        set_ids=[f"s{seed}-{i}" for i in range(num_sets)],
    )


def test_teacher_learns_what_a_per_item_student_cannot():
    train_sets, test_sets = contextual_sets(200, seed=0), contextual_sets(100, seed=1)
    torch.manual_seed(0)
    teacher = TeacherModel(4, d_model=32, num_heads=4, num_layers=2, dropout=0.0)
    student = StudentModel(4, hidden=(16,))
    before = mean_ndcg(teacher, test_sets)
    train(teacher, train_sets, epochs=10)
    train(student, train_sets, epochs=10)
    t_after, s_after = mean_ndcg(teacher, test_sets), mean_ndcg(student, test_sets)
    assert t_after > before + 0.15
    assert t_after > s_after + 0.1


def test_both_models_learn_on_mq2008(mq2008_fold1: Path) -> None:
    data = read_letor(mq2008_fold1 / "vali.txt.gz", cache=False)
    order = np.random.default_rng(0).permutation(data.num_sets)
    train_sets, test_sets = data.take(order[:110]), data.take(order[110:])
    for model in (
        TeacherModel(data.num_features, d_model=32, num_heads=4, num_layers=1),
        StudentModel(data.num_features, hidden=(16,)),
    ):
        torch.manual_seed(1)
        before = mean_ndcg(model, test_sets)
        train(model, train_sets, epochs=6)
        assert mean_ndcg(model, test_sets) > before + 0.05, type(model).__name__
