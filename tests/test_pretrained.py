"""Pretrained tags and hf-hub: names through open_clip's own resolution, never the network.

A tiny architecture is registered and given pretrained entries (as open_clip's registry holds
them: an OpenAI-style URL, a Hugging Face repo); their weights are placed in a temporary cache
laid out as open_clip's URL cache and huggingface_hub's cache lay them out. Every socket is
blocked and Hugging Face's offline mode is on, and each test checks how many connections were
attempted.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

open_clip = pytest.importorskip(
    "open_clip", reason="SKIPPED, not passed: open_clip missing (pip install fma_fast[clip])"
)
pytest.importorskip("huggingface_hub")
pytest.importorskip("PIL.Image")

from clip_support import (  # noqa: E402
    block_network,
    hf_cache_file,
    save_random_weights,
    tiny_architecture,
    write_architecture,
    write_class_folders,
)

from fma_fast.cli import main  # noqa: E402
from fma_fast.clip import load_encoder, register_model_config, resolve_pretrained  # noqa: E402
from fma_fast.io.files import file_sha256  # noqa: E402

MODEL = "fma-fast-tiny-tag-test"
HUB_REPO = "fma-fast-test/tiny-weights"
TAG_MEAN, TAG_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The registered architecture, its weights as a safetensors file, a class-folder set."""
    folder = tmp_path_factory.mktemp("tags")
    config = write_architecture(folder, MODEL, tiny_architecture())
    register_model_config(config)
    weights = save_random_weights(open_clip, MODEL, folder / "weights.safetensors", seed=3)
    data = write_class_folders(folder / "shapes", ["circle", "square", "star"], per_class=4)
    return {"config": config, "weights": weights, "data": data}


@pytest.fixture
def cache(files, tmp_path, monkeypatch):
    """A cache folder holding the weights of tags "tinyhub" (a Hugging Face entry) and
    "tinyurl" (an OpenAI-style URL entry whose path carries the file's sha256); "gonehub" and
    "goneurl" name files that are not cached. Sockets are blocked: ``attempts`` lists tries."""
    data = files["weights"].read_bytes()
    hf_cache_file(tmp_path, HUB_REPO, "open_clip_model.safetensors", data)
    digest = file_sha256(files["weights"])
    (tmp_path / "tiny-weights.safetensors").write_bytes(data)
    preprocess = {"mean": TAG_MEAN, "std": TAG_STD, "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    entries = {
        "tinyhub": {"url": "", "hf_hub": f"{HUB_REPO}/", **preprocess},
        "tinyurl": {"url": f"https://openaipublic.azureedge.net/clip/models/{digest}/"
                           "tiny-weights.safetensors", "hf_hub": "", **preprocess},
        "gonehub": {"url": "", "hf_hub": "fma-fast-test/not-cached/", **preprocess},
        "goneurl": {"url": "https://example.com/clip/not-cached.pt", "hf_hub": "",
                    **preprocess},
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, MODEL, entries)
    return {"folder": tmp_path, "attempts": block_network(monkeypatch), "sha256": digest}


def image_features(encoder) -> torch.Tensor:
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return encoder.encode_images(pixels)


@pytest.mark.parametrize("tag", ["tinyhub", "tinyurl", "TinyHub"])
def test_a_cached_tag_loads_the_file_open_clip_resolves_without_the_network(files, cache, tag):
    encoder = load_encoder(MODEL, pretrained=tag, cache_dir=cache["folder"], device="cpu")
    assert cache["attempts"] == []
    assert encoder.pretrained == tag.lower()  # as open_clip lists it
    assert encoder.checkpoint == f"sha256:{cache['sha256']}"
    assert encoder.model_id["pretrained"] == tag.lower()
    # the same network and preprocessing as open_clip's own create_model with that tag
    reference = open_clip.create_model(MODEL, pretrained=tag, cache_dir=str(cache["folder"]))
    reference.eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.encode_image(pixels, normalize=True)
    torch.testing.assert_close(image_features(encoder), expected, rtol=0, atol=0)
    assert encoder.preprocessing["mean"] == list(TAG_MEAN)
    assert encoder.preprocessing["std"] == list(TAG_STD)
    name, path = resolve_pretrained(MODEL, tag, cache["folder"])
    assert name == tag.lower() and file_sha256(path) == cache["sha256"]


def test_a_tag_whose_weights_are_not_cached_says_what_open_clip_would_download(files, cache):
    with pytest.raises(ValueError) as caught:
        load_encoder(MODEL, pretrained="gonehub", cache_dir=cache["folder"], device="cpu")
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert "pretrained 'gonehub'" in message and "could not be downloaded" in message
    assert "https://huggingface.co/fma-fast-test/not-cached" in message
    assert "--checkpoint FILE" in message and "--cache-dir" in message
    assert cache["attempts"] == []  # Hugging Face's offline mode: not even tried
    with pytest.raises(ValueError) as caught:
        load_encoder(MODEL, pretrained="goneurl", cache_dir=cache["folder"], device="cpu")
    message = str(caught.value)
    assert "https://example.com/clip/not-cached.pt" in message and "--checkpoint FILE" in message
    assert len(cache["attempts"]) >= 1  # a URL entry is fetched (blocked here) when missing


def test_unknown_tags_and_misplaced_names_are_one_line(files, cache):
    cases = {
        "nope": ("unknown pretrained tag 'nope'", "tinyhub", "--checkpoint FILE"),
        "hf-hub:org/repo": ("hf-hub: names are open_clip model names", "--model hf-hub:org/repo"),
    }
    for tag, fragments in cases.items():
        with pytest.raises(ValueError) as caught:
            load_encoder(MODEL, pretrained=tag, cache_dir=cache["folder"], device="cpu")
        message = str(caught.value)
        assert len(message.splitlines()) == 1 and all(f in message for f in fragments), message
    with pytest.raises(ValueError, match="not both"):
        load_encoder(MODEL, files["weights"], pretrained="tinyhub")
    assert cache["attempts"] == []


def test_a_file_path_as_pretrained_is_a_checkpoint(files, cache):
    """open_clip's pretrained= also takes a file; it is then recorded as a checkpoint."""
    by_path = load_encoder(MODEL, pretrained=str(files["weights"]), device="cpu")
    by_checkpoint = load_encoder(MODEL, files["weights"], device="cpu")
    assert by_path.model_id == by_checkpoint.model_id and by_path.pretrained is None
    torch.testing.assert_close(image_features(by_path), image_features(by_checkpoint))


def test_hf_hub_model_names_come_from_the_hub_cache(files, cache):
    repo = "fma-fast-test/tiny-model"
    folder = cache["folder"]
    hub_config = {"model_cfg": tiny_architecture(),
                  "preprocess_cfg": {"mean": list(TAG_MEAN), "std": list(TAG_STD)}}
    hf_cache_file(folder, repo, "open_clip_config.json", json.dumps(hub_config).encode())
    hf_cache_file(folder, repo, "open_clip_model.safetensors", files["weights"].read_bytes())
    encoder = load_encoder(f"hf-hub:{repo}", cache_dir=folder, device="cpu")
    assert cache["attempts"] == []
    assert encoder.name == f"hf-hub:{repo}" and encoder.checkpoint == f"sha256:{cache['sha256']}"
    assert encoder.preprocessing["mean"] == list(TAG_MEAN)
    local = load_encoder(MODEL, files["weights"], device="cpu")
    torch.testing.assert_close(image_features(encoder), image_features(local), rtol=0, atol=0)
    with pytest.raises(ValueError, match="drop checkpoint/pretrained"):
        load_encoder(f"hf-hub:{repo}", pretrained="tinyhub", cache_dir=folder)


def _cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_extract_with_a_tag_records_the_tag_and_the_file_digest(files, cache, tmp_path):
    common = ["extract", "--dataset", str(files["data"]), "--model", MODEL, "--shots", "1",
              "--views", "1", "--quiet"]
    code, printed, err = _cli([*common, "--pretrained", "tinyurl", "--cache-dir",
                               str(cache["folder"]), "--out", str(tmp_path / "a")])
    assert code == 0, err
    assert "tinyurl sha256:" in printed
    source = json.loads((tmp_path / "a" / "source.json").read_text())["source"]
    assert source["pretrained"] == "tinyurl"
    assert source["checkpoint"] == f"sha256:{cache['sha256']}"
    assert source["preprocessing"]["mean"] == list(TAG_MEAN)
    code, _, err = _cli([*common, "--pretrained", "nope", "--cache-dir", str(cache["folder"]),
                         "--out", str(tmp_path / "b")])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "unknown pretrained tag 'nope'" in err and "--checkpoint FILE" in err
    code, _, err = _cli([*common, "--pretrained", "gonehub", "--cache-dir", str(cache["folder"]),
                         "--out", str(tmp_path / "c")])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "huggingface.co/fma-fast-test/not-cached" in err
    with pytest.raises(SystemExit) as caught, contextlib.redirect_stderr(io.StringIO()) as text:
        main([*common, "--pretrained", "tinyurl", "--checkpoint", str(files["weights"]),
              "--out", str(tmp_path / "d")])
    assert caught.value.code == 2 and "not allowed with argument" in text.getvalue()
    assert cache["attempts"] == []


def test_a_classifier_on_a_tag_rebuilds_its_encoder_from_the_tag(files, cache, tmp_path):
    from fma_fast import VelocityNet
    from fma_fast.clip import FewShotClassifier

    encoder = load_encoder(MODEL, pretrained="tinyhub", cache_dir=cache["folder"], device="cpu")
    torch.manual_seed(0)
    table = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    classifier = FewShotClassifier(encoder=encoder, field=VelocityNet(16, blocks=1),
                                   class_features=table, class_names=["a", "b", "c"],
                                   templates=["a {}."], steps=2)
    folder = classifier.save(tmp_path / "clf")
    description = json.loads((folder / "classifier.json").read_text())
    assert description["encoder"]["pretrained"] == "tinyhub"
    loaded = FewShotClassifier.load(folder, cache_dir=cache["folder"])
    assert loaded.encoder.pretrained == "tinyhub"
    assert loaded.encoder.preprocessing == encoder.preprocessing
    images = sorted((files["data"] / "star").glob("*.png"))
    expected = classifier.predict(images, topk=3)
    found = loaded.predict(images, topk=3)
    assert torch.equal(found.indices, expected.indices)
    torch.testing.assert_close(found.cosines, expected.cosines, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pretrained 'tinyhub'.*could not be downloaded"):
        FewShotClassifier.load(folder, cache_dir=tmp_path / "empty")
    assert cache["attempts"] == []
