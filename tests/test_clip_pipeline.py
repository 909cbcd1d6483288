"""Real-input pipeline on a tiny random open_clip model: extract -> cache -> fit -> results.

The model (1 layer per tower, 32-px input) and the dataset (3 classes of generated PNGs) are
built in a temporary folder, so the whole file runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import one_line_error

open_clip = pytest.importorskip(
    "open_clip", reason="SKIPPED, not passed: open_clip missing (pip install fma_fast[clip])"
)
np = pytest.importorskip("numpy")
Image = pytest.importorskip("PIL.Image")

from safetensors import safe_open  # noqa: E402

from fma_fast.cli import main  # noqa: E402
from fma_fast.clip import (  # noqa: E402
    FewShotClassifier,
    extract_split,
    few_shot,
    load_dataset,
    load_encoder,
    load_split,
    register_model_config,
)
from fma_fast.clip.transforms import Preprocess, view_generator  # noqa: E402
from fma_fast.io.features import load_features  # noqa: E402

MODEL = "fma-fast-tiny-test"
CLASSES = ["abyssinian", "great_pyrenees", "pug"]
COUNTS = {"train": 4, "val": 2, "test": 3}
# Enough training for the field to learn the colour-coded classes (about 3 s per seed).
TRAIN_OPTIONS = [
    *("--blocks", "1", "--epochs", "40", "--lr", "2e-3", "--batch-size", "16"),
    *("--max-steps", "10", "--quiet"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A registered tiny architecture, its random weights saved as a checkpoint, a dataset."""
    folder = tmp_path_factory.mktemp("tiny")
    config = folder / f"{MODEL}.json"
    config.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": 1,
                    "width": 32,
                    "head_width": 16,
                    "patch_size": 8,
                },
                "text_cfg": {
                    "context_length": 16,
                    "vocab_size": 49408,
                    "width": 32,
                    "heads": 2,
                    "layers": 1,
                },
            }
        )
    )
    register_model_config(config)
    torch.manual_seed(0)
    checkpoint = folder / "tiny.pt"
    torch.save(open_clip.create_model(MODEL).state_dict(), checkpoint)
    root = folder / "data"
    write_pets(root)
    return {"config": config, "checkpoint": checkpoint, "root": root}


def write_pets(root: Path) -> None:
    """oxford_pets in CoOp's layout: images/ and split_zhou_OxfordPets.json."""
    rng = np.random.default_rng(0)
    images = root / "oxford_pets" / "images"
    images.mkdir(parents=True)
    split = {}
    for name, count in COUNTS.items():
        split[name] = []
        for label, cls in enumerate(CLASSES):
            for i in range(count):
                height, width = (40, 36) if i % 2 else (36, 44)
                colour = np.array([60 + 80 * label, 200 - 70 * label, 120], dtype=float)
                pixels = np.clip(colour + rng.normal(0, 40, (height, width, 3)), 0, 255)
                relpath = f"{cls}_{name}_{i}.png"
                Image.fromarray(pixels.astype(np.uint8)).save(images / relpath)
                split[name].append([relpath, label, cls])
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(split))


def model_args(tiny: dict) -> list[str]:
    return [
        "--model",
        MODEL,
        "--model-config",
        str(tiny["config"]),
        "--checkpoint",
        str(tiny["checkpoint"]),
    ]


def data_args(tiny: dict, root=None) -> list[str]:
    return [
        "--root",
        str(root or tiny["root"]),
        "--dataset",
        "oxford_pets",
        "--shots",
        "4",
        "--views",
        "4",
        *model_args(tiny),
    ]


@pytest.fixture(scope="module")
def encoder(tiny):
    return load_encoder(MODEL, tiny["checkpoint"], device="cpu")


@pytest.fixture(scope="module")
def single_run(tiny, tmp_path_factory) -> tuple[Path, str]:
    """``fma-fast run`` over seeds 1 2 3 in this process: its output folder and its stdout."""
    out = tmp_path_factory.mktemp("run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", *data_args(tiny), "--out", str(out), *TRAIN_OPTIONS]) == 0
    return out, printed.getvalue()


def test_run_end_to_end(single_run):
    out, printed = single_run
    assert "(%, mean ± sample std over seeds)" in printed
    assert ("oxford_pets, 4 shots, seeds 1 2 3 (mean ± sample std, %): test accuracy M=0 "
            "(zero-shot)") in printed
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [1, 2, 3] and len(results["runs"]) == 3
    assert results["preprocessing"]["size"] == [32, 32]  # from the model config, not 224
    assert results["templates"] == ["a photo of a {}, a type of pet."]
    assert results["crop_scale"] == [0.08, 1.0]  # the released crops by default
    for run in results["runs"]:
        assert run["train_rows"] == 4 * 3 * 4  # K shots x classes x views
        assert run["train_images"] == 4 * 3 and run["views"] == 4
        assert run["val_rows"] == 2 * 3 and run["test_rows"] == 9
        assert len(run["test_accuracy"]) == 11
    for run in results["runs"]:  # M on val by select_steps' rule: accuracy, then cross-entropy
        val, loss = run["val_accuracy"], run["val_cross_entropy"]
        rule = max(range(len(val)), key=lambda m: (val[m], -loss[m], -m))
        assert run["chosen_steps"] == rule, f"seed {run['seed']}: chose {run['chosen_steps']}"
        assert run["solve_path"].startswith("folded-fp32"), run["solve_path"]
        at_m = run["test_at_chosen_m"]  # top-1 equals the curve's point at the chosen M
        assert at_m["accuracy"] == pytest.approx(run["test_accuracy"][run["chosen_steps"]])
        assert at_m["accuracy"] <= at_m["top5_accuracy"] == 1.0  # 3 classes: top-5 is all
        assert len(at_m["per_class_recall"]) == 3 and 0 <= at_m["mean_per_class_recall"] <= 1
    (summary,) = results["summary"]
    assert summary["shots"] == 4
    chosen = [r["test_accuracy"][r["chosen_steps"]] for r in results["runs"]]
    # One unit: the summary's accuracies are fractions, like the runs' own.
    assert summary["test_at_chosen_m"]["mean"] == pytest.approx(sum(chosen) / 3)
    # Random towers put M=0 at chance; the field learns the colour-coded classes from pixels.
    assert summary["test_at_chosen_m"]["mean"] > summary["test_at_m0"]["mean"] + 0.2
    predictions = safe_open(str(out / "predictions.safetensors"), "pt")
    assert set(predictions.keys()) == {"labels", "k4-seed1", "k4-seed2", "k4-seed3"}
    plot = out / "accuracy_by_steps-k4.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot skipped: matplotlib is not installed" in printed and not plot.exists()
    else:
        assert f"plot: {plot}" in printed and plot.read_bytes()[:4] == b"\x89PNG"


def test_run_takes_the_released_number_of_optimizer_steps(single_run):
    """Guards counting the cached views as epoch rows: 4 shots x 3 classes = 12 images, batch
    16, 40 epochs -> 40 steps (the released loop's epochs · ceil(images / batch)), though
    each image has 4 cached views."""
    results = json.loads((single_run[0] / "results.json").read_text())
    epochs, batch = results["training"]["epochs"], results["training"]["batch_size"]
    for run in results["runs"]:
        assert run["optimizer_steps"] == epochs * math.ceil(run["train_images"] / batch) == 40
        assert run["warmup_steps"] == 1


def test_run_base_to_new_trains_on_base_and_reports_base_new_and_hm(tiny, tmp_path):
    """The released base-to-new protocol: of 3 classes the first ceil(3/2) = 2 are base; the
    field is fit on base shots only, M is chosen on base val, and base, new and their
    harmonic mean are reported next to zero-shot (numbers recomputed here from the runs)."""
    out = tmp_path / "b2n"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", *data_args(tiny), "--subsample", "base-to-new", "--seeds", "1", "2",
                     "--out", str(out), *TRAIN_OPTIONS]) == 0
    text = printed.getvalue()
    print(text)
    assert "oxford_pets base-to-new, 4 shots, seeds 1 2 (mean ± sample std, %):" in text
    results = json.loads((out / "results.json").read_text())
    assert results["subsample"] == "base-to-new"
    for run in results["runs"]:
        assert run["classes"] == {"base": [0, 1], "new": [2]}
        assert run["train_rows"] == 4 * 2 * 4 and run["val_rows"] == 2 * 2  # base classes only
        assert run["base_test_rows"] == 6 and run["new_test_rows"] == 3
        for m, (b, n, h) in enumerate(zip(run["base_test_accuracy"], run["new_test_accuracy"],
                                          run["hm_by_steps"])):
            assert h == pytest.approx(2 * b * n / (b + n) if b + n else 0.0), f"M={m}"
    (summary,) = results["summary"]
    for name, key in (("base", "base_test_accuracy"), ("new", "new_test_accuracy"),
                      ("hm", "hm_by_steps")):
        chosen = [r[key][r["chosen_steps"]] for r in results["runs"]]
        zero = [r[key][0] for r in results["runs"]]
        assert summary["fma"][name]["mean"] == pytest.approx(sum(chosen) / 2), name
        assert summary["fma"][name]["std"] == pytest.approx(abs(chosen[0] - chosen[1]) / 2**0.5)
        assert summary["zero_shot"][name]["mean"] == pytest.approx(sum(zero) / 2), name
    row = next(line for line in text.splitlines() if line.startswith("FMA (M on base val)"))
    assert f"{100 * summary['fma']['hm']['mean']:6.2f}" in row
    predictions = safe_open(str(out / "predictions.safetensors"), "pt")
    assert set(predictions.keys()) == {"labels-base", "labels-new", "k4-seed1-base",
                                       "k4-seed1-new", "k4-seed2-base", "k4-seed2-new"}
    assert predictions.get_tensor("k4-seed1-new").max() == 0  # one new class: index 0
    assert set(predictions.get_tensor("k4-seed1-base").tolist()) <= {0, 1}


def test_run_with_ten_views_takes_the_released_number_of_steps(tiny, tmp_path):
    """``run --views 10 --epochs 5``: 12 images, batch 16 -> 5 steps, not the 5·ceil(120/16) =
    40 of counting every cached view as a row."""
    out = tmp_path / "views"
    options = [*TRAIN_OPTIONS[TRAIN_OPTIONS.index("--batch-size"):]]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", *data_args(tiny), "--views", "10", "--epochs", "5", "--blocks", "1",
                     "--seeds", "1", "--out", str(out), *options]) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["views"] == 10 and run["train_rows"] == 120 and run["train_images"] == 12
    assert run["optimizer_steps"] == 5 * math.ceil(12 / 16) == 5


def test_run_refines_each_fit_at_its_m_and_records_it(tiny, tmp_path, single_run):
    """``run --refine-epochs 2``: each fit is refined at the M chosen on val (the same fit as
    without the option), M is chosen again, and the run records the refinement."""
    out = tmp_path / "refined"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", *data_args(tiny), "--seeds", "1", "--out", str(out),
                     *TRAIN_OPTIONS, "--refine-epochs", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    plain = json.loads((single_run[0] / "results.json").read_text())["runs"][0]
    assert results["training"]["refine_epochs"] == 2
    refinement = run["refinement"]
    assert refinement["steps_before"] == plain["chosen_steps"] > 0
    assert refinement["steps"] == plain["chosen_steps"] and refinement["epochs"] == 2
    assert len(refinement["history"]) == 2
    assert plain["refinement"] is None


def test_run_over_several_shot_counts_gives_a_table_for_each(tiny, tmp_path, single_run):
    """One run over --shots 2 4: one experiment per (shots, seed), one summary per shot
    count, and the 4-shot run equal to the single-shot-count run of the same seed."""
    out = tmp_path / "shots"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["run", *data_args(tiny), "--shots", "2", "4", "--seeds", "1", "--out",
                     str(out), *TRAIN_OPTIONS]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["shots"], r["seed"]) for r in results["runs"]] == [(2, 1), (4, 1)]
    assert [entry["shots"] for entry in results["summary"]] == [2, 4]
    assert results["runs"][0]["train_images"] == 2 * 3
    single = json.loads((single_run[0] / "results.json").read_text())["runs"][0]
    assert results["runs"][1]["test_accuracy"] == pytest.approx(single["test_accuracy"])
    text = printed.getvalue()
    assert "oxford_pets, 2 shots, seeds 1 (1 seed, %): test accuracy" in text
    assert "±" not in text, "one seed has no spread to print"
    assert all(entry["test_at_chosen_m"]["std"] is None for entry in results["summary"])
    predictions = safe_open(str(out / "predictions.safetensors"), "pt")
    assert {"k2-seed1", "k4-seed1", "labels"} == set(predictions.keys())


def test_run_saves_a_classifier_per_seed_that_gives_its_test_predictions(tiny, single_run):
    """Each (shots, seed) fit is a classifier folder; loaded back, it predicts the test images
    (from their files, and from the cached features) exactly as the run did at its M."""
    out = single_run[0]
    results = json.loads((out / "results.json").read_text())
    assert results["classifiers"] == [f"classifiers/k4-seed{s}" for s in (1, 2, 3)]
    test = load_split(out / "cache" / "test")
    dataset = load_dataset("oxford_pets", tiny["root"])
    paths = [str(dataset.image_root / item.path) for item in dataset.test]
    predictions = safe_open(str(out / "predictions.safetensors"), "pt")
    for run in results["runs"]:
        classifier = FewShotClassifier.load(out / results["classifiers"][run["seed"] - 1])
        assert classifier.steps == run["chosen_steps"] and classifier.class_names == CLASSES
        assert classifier.templates == ["a photo of a {}, a type of pet."]
        assert classifier.record["seed"] == run["seed"] and classifier.record["shots"] == 4
        expected = predictions.get_tensor(f"k4-seed{run['seed']}")
        assert torch.equal(classifier.predict_features(test.features).pred, expected)
        assert torch.equal(classifier.predict(paths).pred, expected)


def test_cached_features_equal_direct_encoding(tiny, encoder, single_run):
    out = single_run[0]
    dataset = load_dataset("oxford_pets", tiny["root"])
    test = load_split(out / "cache" / "test")
    reference, _, preprocess_val = open_clip.create_model_and_transforms(
        MODEL, pretrained=str(tiny["checkpoint"])
    )
    pixels = torch.stack(
        [preprocess_val(Image.open(dataset.image_root / item.path)) for item in dataset.test]
    )
    with torch.no_grad():
        direct = reference.eval().encode_image(pixels, normalize=True)
    torch.testing.assert_close(test.features, direct, rtol=0, atol=1e-6)
    assert test.labels.tolist() == [item.label for item in dataset.test]

    train_items, _ = few_shot(dataset, shots=4, seed=2)
    train = load_split(out / "cache" / "train-seed2-k4-v4")
    preprocess = Preprocess.from_encoder(encoder)
    views = torch.cat(
        [
            preprocess.views(
                Image.open(dataset.image_root / item.path).convert("RGB"),
                4,
                view_generator(2, item.path),
            )
            for item in train_items
        ]
    )
    torch.testing.assert_close(train.features, encoder.encode_images(views), rtol=0, atol=1e-6)
    assert train.labels.tolist() == [item.label for item in train_items for _ in range(4)]

    text = safe_open(str(out / "cache" / "text.safetensors"), "pt")
    tokens = open_clip.get_tokenizer(MODEL)(
        [f"a photo of a {c.replace('_', ' ')}, a type of pet." for c in CLASSES]
    )
    with torch.no_grad():
        expected = reference.encode_text(tokens, normalize=True)
    torch.testing.assert_close(text.get_tensor("class_features"), expected, rtol=0, atol=1e-6)


def test_prompt_ensemble_is_renormalised_mean(encoder):
    names = ["sea_lion", "pug"]
    table = encoder.class_features(names, ["a {}.", "art of the {}."])
    single = [
        encoder.encode_text([t.replace("{}", n.replace("_", " ")) for n in names])
        for t in ("a {}.", "art of the {}.")
    ]
    torch.testing.assert_close(table, F.normalize(single[0] + single[1], dim=-1))
    torch.testing.assert_close(table.norm(dim=-1), torch.ones(2))


def test_interrupted_extraction_resumes_without_redoing_shards(tiny, encoder, tmp_path):
    dataset = load_dataset("oxford_pets", tiny["root"])
    calls = []
    original = encoder.encode_images

    def counting(pixels, stop_after=None):
        calls.append(pixels.shape[0])
        if stop_after is not None and len(calls) > stop_after:
            raise KeyboardInterrupt
        return original(pixels)

    options = dict(seed=1, shots=4, views=2, shard_size=2, batch_size=4, progress=False)
    items = dataset.train  # 12 images: 6 shards of 2 images, one encoder call per shard
    encoder.encode_images = lambda pixels: counting(pixels, stop_after=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            extract_split(encoder, dataset, items, "train", tmp_path, **options)
        assert len(list(tmp_path.glob("shard-*.safetensors"))) == 2
        assert not list(tmp_path.glob(".*tmp"))  # no half-written shard left behind
        calls.clear()
        encoder.encode_images = counting
        resumed = extract_split(encoder, dataset, items, "train", tmp_path, **options)
        assert len(calls) == 4  # only the 4 unfinished shards
        calls.clear()
        again = extract_split(encoder, dataset, items, "train", tmp_path, **options)
        assert calls == []
        fresh = extract_split(
            encoder, dataset, items, "train", tmp_path / "fresh", **options, workers=2
        )
        torch.testing.assert_close(resumed.features, fresh.features, rtol=0, atol=0)
        assert torch.equal(again.labels, fresh.labels)
        # other settings (here the seed of the augmentations) never reuse a shard
        calls.clear()
        extract_split(encoder, dataset, items, "train", tmp_path, **{**options, "seed": 2})
        assert len(calls) == 6
    finally:
        encoder.encode_images = original


def test_torchrun_matches_single_process(tiny, single_run, tmp_path):
    """Two gloo processes on the CPU: shards dealt to both ranks, the two fits dealt one to
    each rank (not all on rank 0), test rows split in two; the results equal one process's."""
    single_run, out = single_run[0], tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fma_fast.cli",
        "run",
        *data_args(tiny),
        "--seeds",
        "1",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--shard-size",
        "4",
        *TRAIN_OPTIONS,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[done.stderr.find("Traceback") :][:4000]
    assert done.stdout.count("shots, seed 1:") == 1  # rank 0 reports, rank 1 stays quiet
    assert len(list((out / "cache" / "train-seed1-k4-v4").glob("shard-*"))) == 3  # ranks 0, 1, 0
    for split in ("train-seed1-k4-v4", "val-seed1-k4", "train-seed2-k4-v4", "test"):
        ours, theirs = load_split(single_run / "cache" / split), load_split(out / "cache" / split)
        torch.testing.assert_close(theirs.features, ours.features, rtol=0, atol=1e-5)
        assert torch.equal(theirs.labels, ours.labels)
    singles = json.loads((single_run / "results.json").read_text())["runs"][:2]
    ranks = json.loads((out / "results.json").read_text())["runs"]
    assert [run["fitted_on_rank"] for run in ranks] == [0, 1]
    assert [run["fitted_on_rank"] for run in singles] == [0, 0]
    for seed, (single, ddp) in enumerate(zip(singles, ranks), start=1):
        two = safe_open(str(out / "predictions.safetensors"), "pt").get_tensor(f"k4-seed{seed}")
        one = safe_open(str(single_run / "predictions.safetensors"), "pt").get_tensor(
            f"k4-seed{seed}")
        assert torch.equal(two, one), f"seed {seed}: predictions differ"
        assert ddp["chosen_steps"] == single["chosen_steps"], f"seed {seed}"
        assert ddp["optimizer_steps"] == single["optimizer_steps"]
        for key in ("test_accuracy", "val_accuracy", "val_cross_entropy", "loss_first_last"):
            assert ddp[key] == pytest.approx(single[key], rel=1e-4), f"seed {seed}: {key}"


def test_clear_errors(tiny, tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "out"), "--quiet"]
    err = one_line_error(capsys, ["extract", *data_args(tiny, root=tmp_path), *out])
    assert "dataset folder for oxford_pets not found" in err
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    err = one_line_error(capsys, ["extract", *data_args(tiny, root=tmp_path), *out])
    assert "split_zhou_OxfordPets.json" in err and "not found" in err
    err = one_line_error(capsys, ["extract", "--dataset", "petz", *model_args(tiny), *out])
    assert "unknown dataset 'petz'" in err
    base = ["extract", "--root", str(tiny["root"]), "--dataset", "oxford_pets", *out]
    err = one_line_error(capsys, [*base, "--model", MODEL, "--checkpoint",
                                  str(tmp_path / "nope.pt")])
    assert "checkpoint file not found" in err
    torch.save({"visual.proj": torch.zeros(2)}, tmp_path / "wrong.pt")
    err = one_line_error(capsys, [*base, "--model", MODEL, "--checkpoint",
                                  str(tmp_path / "wrong.pt")])
    assert "is not a loadable checkpoint for open_clip model" in err
    err = one_line_error(capsys, [*base, "--model", "ViT-Q-99"])
    assert "unknown open_clip model 'ViT-Q-99'" in err
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here
    err = one_line_error(capsys, [*base, "--model", "hf-hub:org/repo", "--cache-dir",
                                  str(tmp_path)])
    assert "model 'hf-hub:org/repo'" in err and "could not be downloaded" in err, err
    assert "https://huggingface.co/org/repo" in err and "--checkpoint FILE" in err, err
    err = one_line_error(capsys, [*base, *model_args(tiny), "--crop-scale", "0.6", "0.5"])
    assert "crop_scale must satisfy 0 < low <= high <= 1, got (0.6, 0.5)" in err
    err = one_line_error(capsys, ["run", *data_args(tiny), "--shots", "4", "4", *out])
    assert "shots must differ: 4 given twice" in err


def test_unreadable_image_skip_or_fail(tiny, tmp_path, capsys):
    root = tmp_path / "data"
    write_pets(root)
    (root / "oxford_pets" / "images" / "pug_test_1.png").write_bytes(b"not a png")
    args = ["extract", *data_args(tiny, root=root), "--quiet"]
    err = one_line_error(capsys, [*args, "--out", str(tmp_path / "a"), "--on-error", "fail"])
    assert "cannot read image" in err and "pug_test_1.png" in err
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "skipped 1 unreadable test image(s), e.g. pug_test_1.png" in capsys.readouterr().out
    test = load_split(tmp_path / "b" / "cache" / "test")
    assert test.features.shape[0] == 8 and test.skipped == ["pug_test_1.png"]
    # extract also writes fma_fast feature files that `fma-fast train` / `eval` read
    train = load_features(tmp_path / "b" / "seed1-k4" / "train.safetensors", require_labels=True)
    assert train.features.shape == (48, 16) and train.class_names == CLASSES
    assert load_features(tmp_path / "b" / "test.safetensors").features.shape == (8, 16)
    err = one_line_error(capsys, [*args, "--out", str(tmp_path / "b"), "--on-error", "fail"])
    assert "skipped as unreadable" in err  # a cache with skipped images is not reused silently


def test_an_output_folder_serves_one_source(tiny, tmp_path, capsys):
    """Features of another checkpoint (or preprocessing, dataset, templates) never land
    beside those already in a folder; exported files say where they came from, and files of
    two sources are never trained or scored together."""
    other = tmp_path / "other.pt"
    torch.manual_seed(7)
    torch.save(open_clip.create_model(MODEL).state_dict(), other)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    base = ["extract", *data_args(tiny), "--views", "1", "--quiet"]
    assert main([*base, "--out", str(out_a)]) == 0
    with_other = [*base, "--checkpoint", str(other)]  # argparse keeps the last --checkpoint
    assert main([*with_other, "--out", str(out_b)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in out_a.rglob("*") if p.is_file()}
    err = one_line_error(capsys, [*with_other, "--out", str(out_a)])
    assert "holds features from another source (checkpoint sha256:" in err, err
    err = one_line_error(capsys, [*base, "--template", "a blurry photo of a {}.", "--out",
                                  str(out_a)])
    assert "holds features from another source (templates" in err, err
    assert {p: p.read_bytes() for p in out_a.rglob("*") if p.is_file()} == before
    train = load_features(out_a / "seed1-k4" / "train.safetensors")
    assert train.provenance["split"] == "train" and train.provenance["seed"] == 1
    assert train.source["checkpoint"].startswith("sha256:") and train.source["dataset"]
    err = one_line_error(
        capsys,
        ["train", str(out_a / "seed1-k4" / "train.safetensors"),
         "--val", str(out_b / "seed1-k4" / "val.safetensors"),
         "--out", str(tmp_path / "m"), "--epochs", "1", "--blocks", "1", "--quiet"],
    )
    assert "come from different sources (checkpoint sha256:" in err, err
