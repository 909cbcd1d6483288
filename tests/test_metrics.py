"""Top-1/top-5 accuracy and per-class recall, one definition for every output, and the
warning when every prediction is one class."""

from __future__ import annotations

import json

import pytest
import torch

from fma_fast.cli import main
from fma_fast.core.metrics import ClassificationCounts, warn_if_collapsed
from fma_fast.io.features import read_features


def _by_loops(topk: torch.Tensor, labels: torch.Tensor) -> dict:
    rows = labels.tolist()
    top1 = sum(int(topk[i, 0]) == y for i, y in enumerate(rows))
    top5 = sum(y in topk[i, :5].tolist() for i, y in enumerate(rows))
    recall = {}
    for c in sorted(set(rows)):
        members = [i for i, y in enumerate(rows) if y == c]
        recall[str(c)] = sum(int(topk[i, 0]) == c for i in members) / len(members)
    return {"accuracy": top1 / len(rows), "top5_accuracy": top5 / len(rows),
            "mean_per_class_recall": sum(recall.values()) / len(recall),
            "per_class_recall": recall}


def _assert_same(got: dict, expected: dict) -> None:
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for key, value in expected.items():
        if isinstance(value, dict):
            assert got[key] == pytest.approx(value), key
        else:
            assert got[key] == pytest.approx(value), key


@pytest.mark.parametrize("rows,classes,k", [(1, 1, 1), (37, 7, 5), (50, 3, 3), (64, 11, 6)])
def test_counts_equal_a_loop_and_add_up_over_parts(rows, classes, k):
    generator = torch.Generator().manual_seed(rows * 31 + classes)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    topk = torch.stack([torch.randperm(classes, generator=generator)[:k] for _ in range(rows)])
    whole = ClassificationCounts.of(topk, labels)
    _assert_same(whole.summary(), _by_loops(topk, labels))
    cut = rows // 3
    parts = ClassificationCounts.of(topk[:cut], labels[:cut]) + ClassificationCounts.of(
        topk[cut:], labels[cut:])
    assert parts == whole
    assert ClassificationCounts.from_record(json.loads(json.dumps(whole.record()))) == whole


def test_collapsed_predictions_warn_and_varied_ones_do_not():
    with pytest.warns(UserWarning, match="all 5 predictions are class 2 of 4"):
        assert warn_if_collapsed(torch.full((5,), 2), 4, "eval x")
    assert warn_if_collapsed(torch.tensor([0, 1, 1]), 4, "eval x") is None
    assert warn_if_collapsed(torch.tensor([3]), 4, "eval x") is None  # one row says nothing


def test_eval_reports_top5_and_per_class_recall_by_name(tmp_path, capsys):
    task = tmp_path / "task"
    assert main(["synth", "--out", str(task), "--classes", "7", "--dim", "16",
                 "--shots", "2", "--difficulty", "0.95"]) == 0
    assert main(["train", str(task / "train.safetensors"), "--out", str(tmp_path / "m"),
                 "--blocks", "1", "--epochs", "1", "--max-steps", "1", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "p.json"
    assert main(["eval", str(task / "test.safetensors"), "--model", str(tmp_path / "m"),
                 "--steps", "1", "--topk", "5", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    data, _ = read_features(task / "test.safetensors", normalize=False)
    labels, names = data.labels, data.class_names
    expected = _by_loops(torch.tensor(written["topk_indices"]), labels)
    if names:
        expected["per_class_recall"] = {names[int(c)]: r
                                        for c, r in expected["per_class_recall"].items()}
    _assert_same({key: summary[key] for key in expected}, expected)
    assert summary["top5_accuracy"] >= summary["accuracy"]
    assert 0 <= summary["accuracy"] <= 1  # fractions, like every accuracy in a file
    # the top-k asked for is what the file holds, whatever eval computed for top-5
    assert main(["eval", str(task / "test.safetensors"), "--model", str(tmp_path / "m"),
                 "--steps", "1", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["topk_indices"][0]) == 1

