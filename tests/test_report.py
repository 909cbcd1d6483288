"""The evaluation report end to end on a tiny grid: files written, numbers consistent with the
raw runs, feature files accepted, bad arguments refused with one line."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fma_fast
from fma_fast.cli import main
from fma_fast.core import protocol
from fma_fast.experiments import report

TINY = [
    "--classes", "3", "--dim", "16", "--test-per-class", "6",
    "--shots", "1", "2", "--seeds", "1", "2",
    "--blocks", "1", "--epochs", "2", "--min-updates", "3",
    "--max-steps", "2", "--step-size", "0.5", "--quiet",
]  # fmt: skip
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert (
        main(["report", "--out", str(out), "--name", "tiny", "--difficulties", "0.3", *TINY]) == 0
    )
    return out, json.loads((out / "tiny.json").read_text())


def test_report_writes_markdown_json_and_plots(synthetic_report):
    out, result = synthetic_report
    markdown = (out / "tiny.md").read_text()
    assert markdown.startswith("# FMA vs few-shot baselines: tiny")
    assert result["command"] in markdown and "fma-fast report" in result["command"]
    for method in report.METHODS:
        assert f"| {method} |" in markdown
    assert "| K=1 | K=2 |" in markdown and "Training budget check" in markdown
    pngs = sorted(p.name for p in out.glob("*.png"))
    if HAS_MATPLOTLIB:
        assert pngs == ["tiny_accuracy.png", "tiny_steps.png"]
        assert all((out / p).stat().st_size < 200_000 for p in pngs)
        assert "![tiny_steps](tiny_steps.png)" in markdown
    else:
        assert pngs == [] and "plots skipped" in markdown
    assert not list(out.glob(".*.tmp")), "no temporary files left behind"


def test_report_numbers_agree_with_the_raw_runs(synthetic_report):
    """Guards the aggregation: means and sample stds recomputed here with numpy."""
    _, result = synthetic_report
    runs = result["runs"]
    assert sorted((r["shots"], r["seed"]) for r in runs) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for run in runs:
        assert set(run["accuracy"]) == set(report.METHODS)
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"].values())
        assert len(run["fma"]["test_by_steps"]) == 3 and run["fma"]["fit"]["updates"] >= 3
    table = result["aggregate"]["synthetic d=0.3"]
    for shots in (1, 2):
        group = [r for r in runs if r["shots"] == shots]
        for method in report.METHODS:
            values = np.array([r["accuracy"][method] for r in group])
            mean, std = table[str(shots)]["methods"][method]
            assert mean == pytest.approx(float(values.mean()))
            assert std == pytest.approx(float(values.std(ddof=1)))
    check = result["convergence"][0]
    assert [fit["epochs"] for fit in check["fits"]] == [
        check["fits"][0]["epochs"],
        2 * check["fits"][0]["epochs"],
    ]


def test_report_accuracies_equal_an_independent_recomputation(synthetic_report):
    """Guards the runner: zero-shot accuracy from the test pool's cosines, and FMA's accuracy
    refit from the same draw and seed and solved by the reference loop at the M the report
    chose, both computed here."""
    _, result = synthetic_report
    settings = report.ReportSettings(**{
        key: tuple(value) if isinstance(value, list) else value
        for key, value in result["settings"].items() if key != "features"})
    pools = report.synthetic_pools(settings, 0.3)
    z = torch.nn.functional.normalize(pools.class_features, dim=-1)
    test_x, test_y = pools.test.features, pools.test.labels
    zero_shot = float(((torch.nn.functional.normalize(test_x, dim=-1) @ z.T).argmax(1)
                       == test_y).double().mean())
    for run in result["runs"]:
        assert run["accuracy"]["zero-shot"] == pytest.approx(zero_shot)
        assert run["fma"]["test_by_steps"][0] == pytest.approx(zero_shot)
        train_rows, _, _ = protocol.draw_split(pools.train.labels, pools.val.labels,
                                               run["shots"], run["seed"])
        x, y = pools.train.features[train_rows], pools.train.labels[train_rows]
        fitted = fma_fast.fit(x, y, pools.class_features, blocks=settings.blocks,
                              epochs=settings.fma_epochs(len(y)), gamma=settings.gamma,
                              seed=run["seed"], lr=settings.lr, batch_size=settings.batch_size,
                              device="cpu", progress=False)
        steps = run["fma"]["fit"]["steps"]
        pred = fma_fast.solve(test_x, fitted.model, steps, step_size=settings.step_size,
                              class_features=pools.class_features, backend="reference").pred
        accuracy = float((pred == test_y).double().mean())
        assert run["accuracy"]["FMA"] == pytest.approx(accuracy, abs=1.01 / len(test_y))


def test_plots_are_skipped_with_a_note_without_matplotlib(synthetic_report, tmp_path, monkeypatch):
    _, result = synthetic_report
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    paths, note = report.write_plots(result, tmp_path, "x")
    assert paths == [] and "matplotlib is not installed" in note
    assert "_plots skipped" in report.render_markdown({**result, "plots": [], "plot_note": note})


def test_render_only_rewrites_the_same_report_from_the_json(synthetic_report, tmp_path, capsys):
    out, _ = synthetic_report
    before = (out / "tiny.md").read_text()
    (out / "tiny.md").unlink()
    assert main(["report", "--out", str(out), "--name", "tiny", "--render-only", "--quiet"]) == 0
    assert (out / "tiny.md").read_text() == before
    assert main(["report", "--out", str(tmp_path), "--render-only"]) == 2
    assert "no report results" in capsys.readouterr().err


def test_report_on_feature_files(tmp_path):
    data = tmp_path / "my_features"
    assert main(["synth", "--out", str(data), "--classes", "3", "--dim", "16", "--shots", "4"]) == 0
    files = ["--train", str(data / "train.safetensors"), "--val", str(data / "val.safetensors")]
    files += ["--test", str(data / "test.safetensors")]
    out = tmp_path / "out"
    argv = ["report", "--out", str(out), *files, *TINY, "--skip-convergence-check"]
    assert main(argv) == 0
    result = json.loads((out / "report.json").read_text())
    assert list(result["aggregate"]) == ["my_features"]
    assert result["convergence"] == []
    assert "--train" in result["command"] and "--difficulties" not in result["command"]


def test_report_adds_peft_plus_fma_rows_for_each_source(tmp_path):
    """A PEFT source's files of the same images give the rows NAME (its own prediction, M=0)
    and NAME + FMA, with the paired difference; NAME's accuracy is recomputed here. Its
    splits' class tables differ in the last bit (each split computes its own, as another
    machine or memory alignment would): one table within fp32 rounding, accepted. A source
    whose files list other images is refused."""
    from fma_fast.io.features import load_features, save_features

    data = tmp_path / "my_features"
    assert main(["synth", "--out", str(data), "--classes", "3", "--dim", "16", "--shots", "4"]) == 0
    peft = tmp_path / "peft"
    generator = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0]
    rotation = rotation * (0.2 + 2 * torch.rand(16, generator=generator))  # not a rotation
    tables = {}
    for split in ("train", "val", "test"):
        d = load_features(data / f"{split}.safetensors")
        tables[split] = d.class_features @ rotation
        if split == "test":  # recomputed elsewhere: one ulp off in half the elements, on any CPU
            up = torch.nextafter(tables[split], torch.full_like(tables[split], torch.inf))
            tables[split] = torch.where(torch.rand(up.shape, generator=generator) < 0.5, up,
                                        tables[split])
        save_features(peft / f"{split}.safetensors", d.features @ rotation, tables[split],
                      d.labels, d.class_names)
    assert not torch.equal(tables["train"], tables["test"])
    files = ["--train", str(data / "train.safetensors"), "--val", str(data / "val.safetensors")]
    files += ["--test", str(data / "test.safetensors")]
    source = ["--peft-features", "rotated", *(str(peft / f"{s}.safetensors")
                                              for s in ("train", "val", "test"))]
    out = tmp_path / "out"
    argv = ["report", "--out", str(out), *files, *source, *TINY, "--skip-convergence-check"]
    assert main(argv) == 0
    result = json.loads((out / "report.json").read_text())
    test = load_features(peft / "test.safetensors")
    cosine = F.normalize(test.features, dim=-1) @ F.normalize(test.class_features, dim=-1).T
    own = float((cosine.argmax(dim=1) == test.labels).double().mean())
    for run in result["runs"]:
        assert run["accuracy"]["rotated"] == pytest.approx(own)
        assert run["accuracy"]["rotated"] != run["accuracy"]["zero-shot"]  # other features
        assert 0 <= run["accuracy"]["rotated + FMA"] <= 1
    markdown = (out / "report.md").read_text()
    assert "| rotated + FMA |" in markdown and "| rotated + FMA - rotated |" in markdown
    assert "--peft-features rotated" in result["command"]
    shuffled = tmp_path / "shuffled.safetensors"
    d = load_features(peft / "test.safetensors")
    save_features(shuffled, d.features, d.class_features, d.labels.roll(1), d.class_names)
    bad = ["--peft-features", "rotated", str(peft / "train.safetensors"),
           str(peft / "val.safetensors"), str(shuffled)]
    assert main(["report", "--out", str(tmp_path / "o2"), *files, *bad, *TINY,
                 "--skip-convergence-check"]) == 2


def test_few_shot_indices_draws_k_per_class_from_the_seed():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    first = protocol.few_shot_indices(labels, 2, torch.Generator().manual_seed(1))
    again = protocol.few_shot_indices(labels, 2, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert torch.bincount(labels[first]).tolist() == [2, 2, 2]
    assert len(set(first.tolist())) == 6
    with pytest.raises(ValueError, match="class 0 has 3 rows"):
        protocol.few_shot_indices(labels, 4, torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train", "a.safetensors"], "--train, --val and --test"),
        (["--shots", "0"], "shots[0] must be >= 1"),
        (["--difficulties", "1.5"], "difficulties must lie in [0, 1]"),
        (["--max-steps", "11"], "max_steps * step_size must be <= 1"),
        (["--name", "../x"], "plain file stem"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert main(["report", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
