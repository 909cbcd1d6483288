"""Dataset layouts, K-shot sampling, prompts, preprocessing and row sharding (a tiny random
encoder for the base-to-new split of a dataset with an empty class)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fma_fast.cli import main
from fma_fast.clip import datasets, load_encoder, prompts
from fma_fast.core.distributed import Context


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _zhou(root, name="oxford_pets", folder="oxford_pets", images="images", split_file=None):
    split_file = split_file or "split_zhou_OxfordPets.json"
    entries = {
        split: [
            [f"{c}_{split}_{i}.jpg", label, c]
            for label, c in enumerate(["a_b", "cc"])
            for i in range(count)
        ]
        for split, count in (("train", 6), ("val", 5), ("test", 3))
    }
    (root / folder / images).mkdir(parents=True)
    (root / folder / split_file).write_text(json.dumps(entries))
    return entries


def test_split_zhou_layout_and_names(tmp_path):
    _zhou(tmp_path)
    for name in ("oxford_pets", "OxfordPets", "oxford-pets"):
        data = datasets.load_dataset(name, tmp_path)
        assert data.name == "oxford_pets"
        assert data.class_names == ["a_b", "cc"]
        assert data.template == "a photo of a {}, a type of pet."
        assert len(data.train) == 12 and len(data.val) == 10 and len(data.test) == 6
        assert data.image_root == tmp_path / "oxford_pets" / "images"


def test_eurosat_names_are_coop_phrases(tmp_path):
    entries = {
        s: [["Forest/1.jpg", 0, "Forest"], ["SeaLake/1.jpg", 1, "SeaLake"]]
        for s in ("train", "val", "test")
    }
    (tmp_path / "eurosat" / "2750").mkdir(parents=True)
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(entries))
    assert datasets.load_dataset("eurosat", tmp_path).class_names == ["Forest", "Sea or Lake"]


def test_fgvc_aircraft_layout(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("707-320\nA300B4\nDC-3\n")
    for split in ("train", "val", "test"):
        (folder / f"images_variant_{split}.txt").write_text(
            f"0001 A300B4\n0002 707-320\n0003 DC-3\n{split}9 DC-3\n"
        )
    data = datasets.load_dataset("fgvc_aircraft", tmp_path)
    assert data.class_names == ["707-320", "A300B4", "DC-3"]
    assert data.train[0] == datasets.Item("0001.jpg", 1)
    assert data.test[-1] == datasets.Item("test9.jpg", 2)


def test_imagenet_layout_draws_val_from_train(tmp_path):
    folder = tmp_path / "imagenet"
    (folder / "classnames.txt").parent.mkdir(parents=True)
    (folder / "classnames.txt").write_text("n02 goldfish\nn01 great white shark\n")
    for split, count in (("train", 7), ("val", 2)):
        for wnid in ("n01", "n02"):
            for i in range(count):
                _touch(folder / "images" / split / wnid / f"{i}.JPEG")
    data = datasets.load_dataset("ImageNet", tmp_path)
    assert data.class_names == ["great white shark", "goldfish"]  # sorted by wnid
    assert data.val is None and len(data.train) == 14 and len(data.test) == 4
    train, val = datasets.few_shot(data, shots=3, seed=1)
    assert len(train) == 6 and len(val) == 6 and not set(train) & set(val)


def test_class_folder_layouts(tmp_path):
    flat = tmp_path / "flat"
    for cls in ("cat", "dog"):
        for i in range(10):
            _touch(flat / cls / f"{i}.png")
    _touch(flat / "cat" / "notes.txt")
    data = datasets.load_dataset(flat)
    assert data.class_names == ["cat", "dog"]
    assert (len(data.train), len(data.val), len(data.test)) == (10, 4, 6)
    assert not set(data.train) & set(data.test)
    assert datasets.load_dataset(flat).test == data.test  # the split never depends on a seed

    split = tmp_path / "split"
    for part in ("train", "test"):
        for cls in ("cat", "dog"):
            _touch(split / part / cls / "1.jpg")
    data = datasets.load_dataset("split", root=tmp_path)
    assert data.val is None and data.test[1] == datasets.Item("test/dog/1.jpg", 1)


def test_csv_lists(tmp_path):
    (tmp_path / "list.csv").write_text(
        "path,label,classname\n"
        + "".join(f"img/{i}.png,{i % 2},{'ab'[i % 2]}\n" for i in range(20))
    )
    data = datasets.load_dataset(tmp_path / "list.csv")
    assert data.class_names == ["a", "b"] and len(data.train) == 10
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "train.csv").write_text("x/1.png,0\nx/2.png,1\n")
    (folder / "test.csv").write_text("y/1.png,1\n")
    with pytest.raises(ValueError, match="train.csv:1: no class name"):
        datasets.load_dataset(folder)  # "a photo of a 0." would be the prompt
    data = datasets.load_dataset(folder, allow_unnamed=True)
    assert data.class_names == ["0", "1"] and data.val is None
    (folder / "test.csv").write_text("y/1.png,1\ny/2.png,one\n")
    with pytest.raises(ValueError, match="is not an integer"):
        datasets.load_dataset(folder, allow_unnamed=True)


def test_an_empty_class_folder_is_refused_unless_asked(tmp_path):
    for cls, count in (("cat", 10), ("dog", 10), ("emu", 0)):
        (tmp_path / "flat" / cls).mkdir(parents=True)
        for i in range(count):
            _touch(tmp_path / "flat" / cls / f"{i}.png")
    with pytest.raises(ValueError, match="class folder.s. without images: emu"):
        datasets.load_dataset(tmp_path / "flat")
    data = datasets.load_dataset(tmp_path / "flat", allow_empty_classes=True)
    assert data.class_names == ["cat", "dog", "emu"] and {i.label for i in data.train} == {0, 1}


def _tiny_encoder(folder):
    """A registered 1-layer open_clip architecture and its random weights as a checkpoint."""
    open_clip = pytest.importorskip(
        "open_clip", reason="SKIPPED, not passed: open_clip missing (pip install fma_fast[clip])"
    )
    from fma_fast.clip import register_model_config

    name = "fma-fast-tiny-data-test"
    config = folder / f"{name}.json"
    config.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                       "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1},
    }))
    register_model_config(config)
    torch.manual_seed(0)
    checkpoint = folder / "tiny.pt"
    torch.save(open_clip.create_model(name).state_dict(), checkpoint)
    return ["--model", name, "--model-config", str(config), "--checkpoint", str(checkpoint)]


def _base_to_new_run(tmp_path, train_counts, test_counts):
    """``run --subsample base-to-new --allow-empty-classes`` on classes a, b, c, d in train/ and
    test/ folders with these image counts (0: an empty class folder); its exit status."""
    image_module = pytest.importorskip("PIL.Image")
    for split, per_class in (("train", train_counts), ("test", test_counts)):
        for label, (name, count) in enumerate(zip("abcd", per_class)):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                colour = (40 + 50 * label, 200 - 40 * label, 30 * i)
                image_module.new("RGB", (36, 36), colour).save(folder / f"{i}.png")
    return main(["run", "--dataset", str(tmp_path / "data"), *_tiny_encoder(tmp_path),
                 "--allow-empty-classes", "--subsample", "base-to-new", "--shots", "1",
                 "--views", "1", "--seeds", "1", "--blocks", "1", "--epochs", "2",
                 "--max-steps", "2", "--quiet", "--out", str(tmp_path / "out")])


def test_base_to_new_keeps_the_first_half_of_all_classes_with_an_empty_class(tmp_path):
    """README: base-to-new takes the first ceil(C/2) classes of the C in the class table as
    base and the rest as new, also when --allow-empty-classes keeps a class with no training
    images (it used to be dropped from both halves, and its test images with it: 9 of 12
    scored). Class 1 here has test images but no training ones: it is base, never trained."""
    assert _base_to_new_run(tmp_path, (2, 0, 2, 2), (3, 3, 3, 3)) == 0
    (run,) = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run["classes"] == {"base": [0, 1], "new": [2, 3], "base_without_shots": [1]}
    assert run["base_test_rows"] + run["new_test_rows"] == 12  # every test image scored
    assert run["base_test_rows"] == 6 and run["train_rows"] == 1  # class 0: 1 shot, 1 view


@pytest.mark.parametrize("train_counts, test_counts, message", [
    ((0, 0, 2, 2), (3, 3, 3, 3), "none of the 2 base classes (the first ceil(C/2)) has training"),
    ((2, 2, 2, 2), (3, 3, 0, 0), "none of the 2 new classes has test images"),
])
def test_base_to_new_refuses_a_half_it_cannot_train_or_test(tmp_path, capsys, train_counts,
                                                            test_counts, message):
    """Empty classes that leave the base half without training images, or a half without
    test images, are one line and exit 2 before any fit (the base half used to become the
    first of the classes that had images)."""
    assert _base_to_new_run(tmp_path, train_counts, test_counts) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out" / "results.json").exists()


def test_few_shot_is_seeded_and_per_class(tmp_path):
    _zhou(tmp_path)
    data = datasets.load_dataset("oxford_pets", tmp_path)
    train, val = datasets.few_shot(data, shots=4, seed=1)
    assert [item.label for item in train] == [0] * 4 + [1] * 4
    assert [item.label for item in val] == [0] * 4 + [1] * 4
    assert datasets.few_shot(data, 4, 1) == (train, val)
    assert datasets.few_shot(data, 4, 2)[0] != train
    train, val = datasets.few_shot(data, shots=16, seed=1)  # fewer images than K: take all
    assert len(train) == 12 and len(val) == 8  # val: min(K, 4) per class
    with pytest.raises(ValueError, match="shots"):
        datasets.few_shot(data, 0, 1)


def test_dataset_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder for oxford_pets not found"):
        datasets.load_dataset("oxford_pets", tmp_path)
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="split_zhou_DescribableTextures.json"):
        datasets.load_dataset("dtd", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'no_such_set'"):
        datasets.load_dataset("no_such_set", tmp_path)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text('{"train": []}')
    with pytest.raises(ValueError, match="must hold"):
        datasets.load_dataset("dtd", tmp_path)


def test_prompts():
    assert prompts.resolve_templates(None, "dtd") == ["{} texture."]
    assert prompts.resolve_templates([], "unknown") == ["a photo of a {}."]
    assert len(prompts.resolve_templates(["imagenet7", "a {}."])) == 8
    assert prompts.build_prompts(["sea_lion ", "x"], ["a {}, {0}."]) == [
        ["a sea lion, {0}.", "a x, {0}."]
    ]
    with pytest.raises(ValueError, match="exactly one"):
        prompts.resolve_templates(["a photo"])


def test_row_shares_partition_in_rank_order():
    for count in (0, 1, 5, 8):
        for world in (1, 2, 3):
            shares = [Context(rank, world).rows(count) for rank in range(world)]
            assert [i for s in shares for i in range(count)[s]] == list(range(count))


def test_augmented_views_are_seeded(tmp_path):
    pytest.importorskip("torchvision")
    image_module = pytest.importorskip("PIL.Image")
    from fma_fast.clip.transforms import Preprocess, view_generator

    pre = Preprocess(size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3)
    image = image_module.fromarray(
        (torch.rand(30, 22, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    )
    first = pre.views(image, 3, view_generator(1, "a.png"))
    assert first.shape == (3, 3, 16, 16)
    assert torch.equal(first, pre.views(image, 3, view_generator(1, "a.png")))
    assert not torch.equal(first, pre.views(image, 3, view_generator(2, "a.png")))
    assert not torch.equal(first[0], first[1])
    assert pre.centre(image).shape == (3, 16, 16)
    assert Preprocess(size=(8, 12), mean=(0.5,) * 3, std=(0.25,) * 3).centre(image).shape == (
        3,
        8,
        12,
    )


def test_training_crops_cover_the_released_area_range_by_default():
    """Guards the crop range drifting from the released (0.08, 1) RandomResizedCrop: the
    boxes' areas, drawn by our own sampler, span that range (many far below the 0.5 floor
    Tip-Adapter uses), and ``scale`` changes it and the cache description."""
    from fma_fast.clip.transforms import Preprocess, check_crop_scale

    def areas(pre):
        generator = torch.Generator().manual_seed(0)
        boxes = [pre._crop_box(400, 300, generator) for _ in range(2000)]
        return torch.tensor([h * w / (400 * 300) for _, _, h, w in boxes])

    released = Preprocess(size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert released.scale == (0.08, 1.0)
    drawn = areas(released)
    assert drawn.min() < 0.1 and drawn.max() > 0.95 and (drawn < 0.5).float().mean() > 0.4
    assert drawn.min() >= 0.075  # rounding of h and w only
    narrow = Preprocess(size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, scale=(0.5, 1.0))
    assert areas(narrow).min() >= 0.49
    assert narrow.describe()["train"]["scale"] == [0.5, 1.0]
    assert "train" not in narrow.describe(train=False)  # what every split shares
    for bad in ((0.0, 1.0), (0.6, 0.5), (0.5, 1.2), ("a", 1), (0.5,)):
        with pytest.raises(ValueError, match="crop_scale"):
            check_crop_scale(bad)


def test_missing_open_clip_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install fma_fast\[clip\]"):
        load_encoder("ViT-B-16")
    _zhou(tmp_path)
    argv = ["extract", "--root", str(tmp_path), "--dataset", "oxford_pets", "--model", "ViT-B-16"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "pip install fma_fast[clip]" in capsys.readouterr().err


def test_deep_or_special_json_files_are_refused_in_one_line(tmp_path):
    """Guards RecursionError tracebacks from a deeply nested split file or model config, and
    a classifier folder's classes.safetensors with a deep stamp or a FIFO in its place (the
    open blocked): each is refused naming the file (io.files.read_json / loads_json)."""
    from fma_fast.clip import classifier, register_model_config
    from fma_fast.io.files import save_safetensors

    deep = "[" * 100_000 + "]" * 100_000
    _zhou(tmp_path)
    split = tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"
    split.write_text(deep)
    with pytest.raises(ValueError, match=f"oxford_pets split file {split} nests JSON 100000"):
        datasets.load_dataset("oxford_pets", tmp_path)
    config = tmp_path / "deep-config.json"
    config.write_text(deep)
    with pytest.raises(ValueError, match=f"model config {config} nests JSON 100000"):
        register_model_config(config)
    folder = tmp_path / "classifier"
    folder.mkdir()
    classes = folder / classifier.CLASSES_NAME
    save_safetensors(classes, {"class_features": torch.eye(2)}, {classifier._CLASSES_STAMP: deep})
    with pytest.raises(ValueError, match="classes.safetensors there is not an fma_fast"):
        classifier.check_classifier_folder(folder)
    classes.unlink()
    os.mkfifo(classes)
    # in a subprocess: safetensors' open of a FIFO blocks holding the GIL (every thread stops)
    script = ("import sys\nfrom pathlib import Path\nfrom fma_fast.clip import classifier\n"
              "classifier.check_classifier_folder(Path(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True,
                          text=True, timeout=120)
    assert "classes.safetensors there is not an fma_fast classifier's" in done.stderr, \
        done.stderr[-2000:]
