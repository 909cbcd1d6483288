"""CLIP-LoRA's two ViT-L/14 vision tables (before and since its 2024-09-12 change) on a tiny
model with a 24-block vision tower, and "a photo of a {}." as --peft lora's default prompt.

The expected features are computed independently of fma_fast.clip.peft: LoRA is added on the
fly (x A^T B^T on each projection) inside a hand-written attention run through forward hooks,
never merged; the block lists are written out here from CLIP-LoRA's loralib/utils.py.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip(
    "open_clip", reason="SKIPPED, not passed: open_clip missing (pip install fma_fast[clip])"
)

from clip_support import (  # noqa: E402
    save_random_weights,
    tiny_architecture,
    write_architecture,
    write_pets,
)

from fma_fast.clip import load_encoder, peft, register_model_config  # noqa: E402
from fma_fast.clip.peft import PeftError, load_peft  # noqa: E402

MODEL = "fma-fast-tiny-l14-test"
CLASSES = ["abyssinian", "great_pyrenees", "pug"]
TEXT_WIDTH, VISION_WIDTH = 16, 32  # different, so a layer put on the wrong tower fails

TEXT_ALL = list(range(12))
# CLIP-LoRA's ViT-L/14 vision lists, per version (loralib/utils.py before and after e6bf706)
BEFORE = {"all": list(range(21)), "half-up": [6, 7, 8, 9, 10, 11],
          "half-bottom": [0, 1, 2, 3, 4, 5], "bottom": [0, 1, 2, 3], "mid": [4, 5, 6, 7],
          "up": [8, 9, 10, 11]}
SINCE = {"all": list(range(24)), "half-up": list(range(12, 24)),
         "half-bottom": list(range(12))}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("l14")
    architecture = tiny_architecture(vision_layers=24, vision_width=VISION_WIDTH,
                                     text_layers=12, text_width=TEXT_WIDTH, image_size=16)
    register_model_config(write_architecture(folder, MODEL, architecture))
    weights = save_random_weights(open_clip, MODEL, folder / "tiny.pt", seed=5)
    return load_encoder(MODEL, weights, device="cpu")


def lora_file(path, tower, position, text_blocks, vision_blocks, params=("q", "k", "v"),
              r=2, alpha=1, seed=0):
    """A CLIP-LoRA save_lora file: layer_i over the text blocks, then the vision blocks."""
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
    generator = torch.Generator().manual_seed(seed)
    widths = [TEXT_WIDTH] * len(text_blocks) + [VISION_WIDTH] * len(vision_blocks)
    weights = {
        f"layer_{i}": {
            names[p]: {"w_lora_A": 0.4 * torch.randn(r, width, generator=generator),
                       "w_lora_B": 0.4 * torch.randn(width, r, generator=generator)}
            for p in params
        }
        for i, width in enumerate(widths)
    }
    metadata = {"r": r, "alpha": alpha, "encoder": tower, "params": list(params),
                "position": position}
    torch.save({"weights": weights, "metadata": metadata}, path)
    return {"weights": weights, "metadata": metadata}


def hand_attention(x, attn, mask, lora, scale):
    """Self-attention from the packed weights (sequence-first or batch-first alike: it works on
    the last two dims as (tokens, width) per batch row), LoRA added on the fly."""
    d, heads = attn.embed_dim, attn.num_heads
    batch_first = getattr(attn, "batch_first", False)
    x = x if batch_first else x.transpose(0, 1)  # (B, L, d)

    def project(inputs, weight, bias, name):
        out = inputs @ weight.T + bias
        if name in lora:
            a, b = lora[name]
            out = out + scale * (inputs @ a.T) @ b.T
        return out

    q, k, v = (project(x, attn.in_proj_weight[i * d:(i + 1) * d],
                       attn.in_proj_bias[i * d:(i + 1) * d], name)
               for i, name in enumerate("qkv"))

    def heads_of(t):
        return t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2)

    scores = heads_of(q) @ heads_of(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    mixed = (scores.softmax(-1) @ heads_of(v)).transpose(1, 2).reshape(x.shape)
    out = project(mixed, attn.out_proj.weight, attn.out_proj.bias, "o")
    return out if batch_first else out.transpose(0, 1)


def reference(encoder, payload, text_blocks, vision_blocks):
    """A copy of the model whose selected attentions run hand_attention with LoRA on the fly."""
    model = copy.deepcopy(encoder.model)
    meta = payload["metadata"]
    scale = meta["alpha"] / math.sqrt(meta["r"])
    blocks = [model.transformer.resblocks[i] for i in text_blocks]
    blocks += [model.visual.transformer.resblocks[i] for i in vision_blocks]
    short = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "proj": "o"}
    for i, block in enumerate(blocks):
        lora = {short[k]: (v["w_lora_A"], v["w_lora_B"])
                for k, v in payload["weights"][f"layer_{i}"].items()}

        def hook(module, args, kwargs, output, lora=lora):
            return hand_attention(args[0], module, kwargs.get("attn_mask"), lora, scale), None

        block.attn.register_forward_hook(hook, with_kwargs=True)
    return model


def assert_matches(encoder, source, payload, text_blocks, vision_blocks):
    model = reference(encoder, payload, text_blocks, vision_blocks)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = [f"a photo of a {c.replace('_', ' ')}." for c in CLASSES]
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(encoder.tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(source.image_features(pixels), image, rtol=0, atol=2e-6)
    torch.testing.assert_close(source.class_features(["a photo of a {}."]), text, rtol=0,
                               atol=2e-6)
    # the update really moved the towers it names
    plain = encoder.encode_images(pixels)
    assert ((image - plain).abs().max() > 1e-2) == bool(vision_blocks)
    info = source.describe()
    assert info["text_blocks"] == text_blocks and info["vision_blocks"] == vision_blocks
    return info


def test_current_format_all_blocks_both_towers_rank_2(encoder, tmp_path):
    """Today's CLIP-LoRA default on ViT-L/14: both towers, all blocks, q/k/v, r = 2: 12 text
    and 24 vision layers (36), refused before as '36 LoRA layers in the file, ... selects 33'."""
    payload = lora_file(tmp_path / "lora.pt", "both", "all", TEXT_ALL, SINCE["all"])
    assert len(payload["weights"]) == 36
    source = load_peft("lora", tmp_path / "lora.pt", encoder, CLASSES)
    info = assert_matches(encoder, source, payload, TEXT_ALL, SINCE["all"])
    assert info["vision_table"] == "ViT-L/14 table since 2024-09-12" and info["r"] == 2


def test_old_format_all_blocks_still_loads(encoder, tmp_path):
    payload = lora_file(tmp_path / "lora.pt", "both", "all", TEXT_ALL, BEFORE["all"], seed=1)
    assert len(payload["weights"]) == 33
    source = load_peft("lora", tmp_path / "lora.pt", encoder, CLASSES)
    info = assert_matches(encoder, source, payload, TEXT_ALL, BEFORE["all"])
    assert info["vision_table"] == "ViT-L/14 table before 2024-09-12"


@pytest.mark.parametrize("position", ["half-up", "half-bottom"])
@pytest.mark.parametrize("version", ["before", "since"])
def test_vision_halves_of_either_version(encoder, tmp_path, position, version):
    blocks = (BEFORE if version == "before" else SINCE)[position]
    payload = lora_file(tmp_path / "lora.pt", "vision", position, [], blocks, params=("q", "o"),
                        seed=2)
    source = load_peft("lora", tmp_path / "lora.pt", encoder, CLASSES)
    assert_matches(encoder, source, payload, [], blocks)


def test_a_position_only_the_old_table_has(encoder, tmp_path):
    payload = lora_file(tmp_path / "lora.pt", "both", "bottom", [0, 1, 2, 3], BEFORE["bottom"],
                        seed=3)
    source = load_peft("lora", tmp_path / "lora.pt", encoder, CLASSES)
    assert_matches(encoder, source, payload, [0, 1, 2, 3], BEFORE["bottom"])


def test_a_count_that_fits_neither_version_names_both_readings(encoder, tmp_path):
    payload = lora_file(tmp_path / "lora.pt", "both", "all", TEXT_ALL, SINCE["all"])
    del payload["weights"]["layer_35"]
    torch.save(payload, tmp_path / "lora.pt")
    with pytest.raises(PeftError) as caught:
        load_peft("lora", tmp_path / "lora.pt", encoder, CLASSES)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "35 LoRA layers in the file" in message
    assert "33 with CLIP-LoRA's ViT-L/14 table before 2024-09-12" in message
    assert "36 with CLIP-LoRA's ViT-L/14 table since 2024-09-12" in message
    with pytest.raises(PeftError, match="position 'top3' is not in CLIP-LoRA's vision table"):
        lora_file(tmp_path / "top.pt", "both", "top3", [9, 10, 11], [])
        load_peft("lora", tmp_path / "top.pt", encoder, CLASSES)


def test_the_tables_are_clip_loras_and_their_counts_differ():
    """The tables fma_fast reads 24-block vision towers with are CLIP-LoRA's two versions (as
    listed above), and for every tower choice and position both know, their layer counts
    differ: the count in a file always tells the versions apart."""
    (before_name, before), (since_name, since) = peft.lora._LORA_VISION_TABLES[24]
    assert (before_name, before) == ("ViT-L/14 table before 2024-09-12", BEFORE)
    assert (since_name, since) == ("ViT-L/14 table since 2024-09-12", SINCE)
    for position in set(before) & set(since):  # the text tower adds the same to both
        assert len(before[position]) != len(since[position]), position


def test_lora_prompts_default_to_a_photo_of_a(encoder, tmp_path):
    """extract --peft lora without --template encodes "a photo of a {}." (CLIP-LoRA's and the
    released FMA's prompt), not the dataset's CoOp template; --template still wins, and other
    methods keep the dataset's."""
    from fma_fast.cli import main

    write_pets(tmp_path / "data", CLASSES, {"train": 2, "val": 1, "test": 1})
    lora_file(tmp_path / "lora.pt", "text", "top1", [11], [])
    weights = tmp_path / "weights.pt"
    save_random_weights(open_clip, MODEL, weights, seed=5)
    base = ["extract", "--root", str(tmp_path / "data"), "--dataset", "oxford_pets", "--model",
            MODEL, "--checkpoint", str(weights), "--shots", "1", "--views", "1", "--quiet"]
    cases = {
        "lora": (["--peft", "lora", "--peft-checkpoint", str(tmp_path / "lora.pt")],
                 ["a photo of a {}."]),
        "lora-template": (["--peft", "lora", "--peft-checkpoint", str(tmp_path / "lora.pt"),
                           "--template", "art of the {}."], ["art of the {}."]),
        "plain": ([], ["a photo of a {}, a type of pet."]),
    }
    for name, (extra, templates) in cases.items():
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*base, *extra, "--out", str(tmp_path / name)]) == 0, name
        source = json.loads((tmp_path / name / "source.json").read_text())["source"]
        assert source["templates"] == templates, name
