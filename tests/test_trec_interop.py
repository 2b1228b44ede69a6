"""TREC interop: ``fedrank data qrels`` matches the runs ``fedrank score`` writes, and
ir-measures (trec_eval's definitions) computes the same NDCG@10 as fedrank's metric set to the
same conventions."""

from __future__ import annotations

from pathlib import Path

import ir_measures
import numpy as np
import pytest
import torch
from ir_measures import nDCG

from fedrank.cli import main as fedrank
from fedrank.client.score_cli import rank_sets
from fedrank.client.trainer import TrainSettings, train_student
from fedrank.common.config import FedrankConfig
from fedrank.common.datasets import load_dataset
from fedrank.common.errors import DataFormatError
from fedrank.common.example_sets import ExampleSets
from fedrank.common.metrics import ndcg
from fedrank.common.models import StudentModel, score_sets
from fedrank.common.trec import qrels_lines, run_lines


def test_qrels_command(tmp_path: Path, mq2008_dir: Path, capsys):
    fold = mq2008_dir / "Fold1"
    out = tmp_path / "qrels.txt"
    assert fedrank(["data", "qrels", str(fold), "--out", str(out)]) == 0
    test = load_dataset(str(fold)).test
    lines = out.read_text().splitlines()
    assert len(lines) == test.num_items
    first = lines[0].split()
    assert first == [test.set_ids[0], "0", test.item_ids[0], str(int(test.labels[0]))]
    assert fedrank(["data", "qrels", str(fold), "--split", "all"]) == 0
    assert capsys.readouterr().out.count("\n") == 15211
    # data without item ids: positions, as `fedrank score` writes them
    letor = tmp_path / "plain.txt"
    letor.write_text("2 qid:7 1:0.5\n0 qid:7 1:0.1\n1 qid:8 1:0.3\n")
    assert fedrank(["data", "qrels", str(letor)]) == 0
    assert capsys.readouterr().out == "7 0 0 2\n7 0 1 0\n8 0 0 1\n"
    assert fedrank(["data", "qrels", str(tmp_path / "missing")]) == 2


def test_qrels_refuse_graded_fractions_and_repeated_ids():
    sets = ExampleSets(np.zeros((2, 1)), [0.5, 1.0], [0, 2], ["q"], item_ids=["a", "b"])
    with pytest.raises(DataFormatError, match="set 'q' has label 0.5"):
        list(qrels_lines(sets))
    sets = ExampleSets(np.zeros((2, 1)), [0.0, 1.0], [0, 2], ["q"], item_ids=["a", "a"])
    with pytest.raises(DataFormatError, match="set 'q' repeats an item id"):
        list(qrels_lines(sets))


def _trained_student(train: ExampleSets) -> torch.nn.Module:
    torch.manual_seed(0)
    model = StudentModel(train.num_features, hidden=(16,))
    loss = FedrankConfig.from_run_config({"rank-weight": 0.0}).composite_loss()  # labels only
    train_student(model, train, loss, TrainSettings(epochs=2, batch_size=16))
    return model.eval()


def _trec_eval_order(test: ExampleSets, run: Path) -> np.ndarray:
    """Scores that rank each set as trec_eval does: by the run's written score, descending,
    ties broken by docid, descending (trec_eval ignores the rank column)."""
    written = {}
    for line in run.read_text().splitlines():
        qid, _, doc, _, score, _ = line.split()
        written[(qid, doc)] = float(score)
    out = np.empty(test.num_items, np.float32)
    for k in range(test.num_sets):
        lo, hi = int(test.offsets[k]), int(test.offsets[k + 1])
        docs = test.item_ids[lo:hi].tolist()
        order = sorted(range(hi - lo), key=lambda i: (written[(test.set_ids[k], docs[i])], docs[i]))
        out[lo + np.array(order[::-1])] = -np.arange(hi - lo, dtype=np.float32)
    return out


def test_ir_measures_ndcg10_equals_fedrank_with_the_same_conventions(
    tmp_path: Path, mq2008_dir: Path, one_torch_thread
):
    """trec_eval's nDCG (ir-measures ``nDCG@10``) differs from fedrank's default in two ways,
    and fedrank's metric is set to the same for the comparison:

    - gain ``label`` instead of ``2^label - 1``: ``ndcg(..., gain="linear")``;
    - trec_eval sorts by the score written in the run and breaks ties by docid (descending);
      the run's scores carry 6 significant digits, so fedrank ranks by that order too.

    A set without a relevant item counts 0 in both (fedrank's default ``empty="zero"``; it is in
    the qrels, so trec_eval averages over it too).
    """
    fold = mq2008_dir / "Fold1"
    data = load_dataset(str(fold))
    test = data.test
    student = _trained_student(data.train)
    run = tmp_path / "student.run"
    run.write_text("".join(run_lines(rank_sets(test, score_sets(student, test)), 0)))
    qrels = tmp_path / "qrels.txt"
    assert fedrank(["data", "qrels", str(fold), "--out", str(qrels)]) == 0

    measured = ir_measures.calc_aggregate(
        [nDCG @ 10], ir_measures.read_trec_qrels(str(qrels)), ir_measures.read_trec_run(str(run))
    )[nDCG @ 10]
    per_query = {
        m.query_id: m.value
        for m in ir_measures.iter_calc(
            [nDCG @ 10],
            ir_measures.read_trec_qrels(str(qrels)),
            ir_measures.read_trec_run(str(run)),
        )
    }
    batch = test.pad(extra={"s": _trec_eval_order(test, run)})
    ours = ndcg(batch.extra["s"], batch.labels, batch.mask, k=10, gain="linear", empty="zero")
    assert len(per_query) == test.num_sets
    np.testing.assert_allclose(
        ours.numpy(), [per_query[s] for s in test.set_ids.tolist()], rtol=0, atol=1e-12
    )
    assert float(ours.mean()) == pytest.approx(measured, abs=1e-12)
    assert 0.3 < measured < 0.6
    # fedrank's default (exponential gain) is a different number on graded labels
    default = ndcg(batch.extra["s"], batch.labels, batch.mask, k=10)
    assert abs(float(default.mean()) - measured) > 1e-4
