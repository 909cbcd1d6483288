"""PEFT feature sources on a tiny random open_clip model, from files in each project's format.

Every expected value is computed here independently of fma_fast.clip.peft: a hand-written
CLIP text transformer on hand-laid prompt embeddings (CoOp/CoCoOp), the CLIP-Adapter formula
by hand, and LoRA applied on the fly through forward hooks (never merged) for CLIP-LoRA.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from support import quantized

open_clip = pytest.importorskip(
    "open_clip", reason="SKIPPED, not passed: open_clip missing (pip install fma_fast[clip])"
)

from fma_fast.clip import load_encoder, peft, register_model_config  # noqa: E402
from fma_fast.clip.peft import PEFT_METHODS, PeftError, load_peft  # noqa: E402
from fma_fast.io.files import file_sha256  # noqa: E402

MODEL = "fma-fast-tiny-peft-test"
CLASSES = ["abyssinian", "great_pyrenees", "pug"]
TEXT_WIDTH, VISION_WIDTH, DIM, CONTEXT, LAYERS = 32, 48, 16, 16, 12


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """Text width 32 and vision width 48 differ, so a LoRA layer put on the wrong tower fails;
    12 blocks per tower, so CLIP-LoRA's position tables select real subsets."""
    folder = tmp_path_factory.mktemp("tiny-peft")
    config = folder / f"{MODEL}.json"
    config.write_text(
        json.dumps(
            {
                "embed_dim": DIM,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": LAYERS,
                    "width": VISION_WIDTH,
                    "head_width": 16,
                    "patch_size": 8,
                },
                "text_cfg": {
                    "context_length": CONTEXT,
                    "vocab_size": 49408,
                    "width": TEXT_WIDTH,
                    "heads": 2,
                    "layers": LAYERS,
                },
            }
        )
    )
    register_model_config(config)
    torch.manual_seed(0)
    checkpoint = folder / "tiny.pt"
    torch.save(open_clip.create_model(MODEL).state_dict(), checkpoint)
    return {"config": config, "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def encoder(tiny_files):
    return load_encoder(MODEL, tiny_files["checkpoint"], device="cpu")


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def randn(*shape, seed, std=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


# --- a hand-written CLIP transformer ---------------------------------------------------------


def layer_norm(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def hand_attention(x, attn, mask=None, lora=None):
    """Multi-head self-attention from the packed weights; ``lora`` maps "q"/"k"/"v"/"o" to
    (A, B, scale), added on the fly as scale * (x A^T) B^T, never merged into W."""
    d, heads = attn.embed_dim, attn.num_heads
    lora = lora or {}

    def linear(inputs, weight, bias, name):
        out = inputs @ weight.T + bias
        if name in lora:
            a, b, scale = lora[name]
            out = out + scale * (inputs @ a.T) @ b.T
        return out

    q, k, v = (
        linear(
            x, attn.in_proj_weight[i * d : (i + 1) * d], attn.in_proj_bias[i * d : (i + 1) * d], n
        )
        for i, n in enumerate("qkv")
    )

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    mixed = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape)
    return linear(mixed, attn.out_proj.weight, attn.out_proj.bias, "o")


def hand_block(x, block, mask=None):
    x = x + hand_attention(layer_norm(x, block.ln_1), block.attn, mask)
    hidden = F.gelu(F.linear(layer_norm(x, block.ln_2), block.mlp.c_fc.weight, block.mlp.c_fc.bias))
    return x + F.linear(hidden, block.mlp.c_proj.weight, block.mlp.c_proj.bias)


def hand_text(model, embeddings, eot):
    """Unit text features of prompt embeddings (N, L, width), pooled at positions ``eot``."""
    length = embeddings.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = embeddings + model.positional_embedding
    for block in model.transformer.resblocks:
        x = hand_block(x, block, mask)
    x = layer_norm(x, model.ln_final)[torch.arange(x.shape[0]), eot]
    return F.normalize(x @ model.text_projection, dim=-1)


def ids(encoder, text):
    return list(encoder.tokenizer.encode(text))


def embed(encoder, token_ids):
    return encoder.model.token_embedding.weight[torch.tensor(token_ids, dtype=torch.long)]


def hand_prompt(encoder, name, ctx, position):
    """CoOp's prompt for one class laid out row by row: SOS, context and name in the
    position's order, ".", EOT, padding; returns (embeddings (L, width), EOT index)."""
    tok = encoder.tokenizer
    name_rows = embed(encoder, ids(encoder, name.replace("_", " ")))
    n = ctx.shape[0]
    if position == "end":
        body = [ctx, name_rows]
    elif position == "middle":
        body = [ctx[: n // 2], name_rows, ctx[n // 2 :]]
    else:
        body = [name_rows, ctx]
    rows = torch.cat(
        [
            embed(encoder, [tok.sot_token_id]),
            *body,
            embed(encoder, ids(encoder, ".") + [tok.eot_token_id]),
        ]
    )
    eot = rows.shape[0] - 1
    pad = embed(encoder, [0] * (CONTEXT - rows.shape[0]))
    return torch.cat([rows, pad]), eot


def coop_features_by_hand(encoder, ctx, position, names=CLASSES):
    """(C, D) CoOp class features; ctx (n, width) shared or (C, n, width) per class."""
    prompts, eots = zip(
        *(
            hand_prompt(encoder, name, ctx[c] if ctx.ndim == 3 else ctx, position)
            for c, name in enumerate(names)
        )
    )
    with torch.no_grad():
        return hand_text(encoder.model, torch.stack(prompts), torch.tensor(eots))


# --- files in each project's format ----------------------------------------------------------


class DasslConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Stand-in for Dassl's ConstantWarmupScheduler: it keeps the wrapped scheduler as
    ``successor``, and its state_dict (``__dict__`` less the optimizer) therefore holds a
    pickled CosineAnnealingLR with its SGD, as in the files CoOp's configs produce."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def get_lr(self):
        return [self.cons_lr for _ in self.base_lrs]


def save_dassl(path, state_dict, *, optimizer="sgd"):
    """Dassl's save_model container: state_dict, epoch, optimizer and scheduler state_dicts."""
    params = [torch.nn.Parameter(v.detach().float().clone()) for v in state_dict.values()]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=2e-3, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.Adam(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    scheduler = DasslConstantWarmup(
        opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50.0), 1, 1e-5
    )
    torch.save(
        {
            "state_dict": OrderedDict(state_dict),
            "epoch": 50,
            "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict(),
            "val_result": None,
        },
        path,
    )
    return path


def prompt_buffers(encoder, n_ctx, names=CLASSES, dtype=torch.float32):
    """token_prefix / token_suffix as CoOp's PromptLearner registers them."""
    placeholder = " ".join(["X"] * n_ctx)
    tokens = encoder.tokenizer([f"{placeholder} {n.replace('_', ' ')}." for n in names])
    with torch.no_grad():
        embedding = encoder.model.token_embedding(tokens).to(dtype)
    return {"token_prefix": embedding[:, :1], "token_suffix": embedding[:, 1 + n_ctx :]}


def coop_state(encoder, ctx, names=CLASSES, buffers=True):
    state = {"ctx": ctx}
    if buffers:
        state.update(prompt_buffers(encoder, ctx.shape[-2], names, ctx.dtype))
    return state


def cocoop_state(encoder, seed=5, hidden=4, dtype=torch.float16):
    state = {
        "ctx": randn(4, TEXT_WIDTH, seed=seed, std=0.5),
        "meta_net.linear1.weight": randn(hidden, DIM, seed=seed + 1, std=1.0),
        "meta_net.linear1.bias": randn(hidden, seed=seed + 2, std=0.3),
        "meta_net.linear2.weight": randn(TEXT_WIDTH, hidden, seed=seed + 3, std=0.5),
        "meta_net.linear2.bias": randn(TEXT_WIDTH, seed=seed + 4, std=0.3),
    }
    state = {k: v.to(dtype) for k, v in state.items()}
    state.update(prompt_buffers(encoder, 4, dtype=dtype))
    return state


def adapter_state(seed=11, hidden=4):
    return {
        "fc.0.weight": randn(hidden, DIM, seed=seed, std=0.5),
        "fc.2.weight": randn(DIM, hidden, seed=seed + 1, std=0.5),
    }


LORA_CASES = {
    # (metadata encoder, position, params): (text blocks, vision blocks) CLIP-LoRA selects
    ("both", "all", ("q", "k", "v")): (list(range(12)), list(range(12))),
    ("vision", "up", ("q", "o")): ([], [8, 9, 10, 11]),
    ("text", "half-bottom", ("k", "v", "o")): ([0, 1, 2, 3, 4, 5], []),
}


def lora_payload(case, r=2, alpha=1, seed=20):
    """CLIP-LoRA's save_lora dict, layer_i numbered text blocks first, then vision blocks."""
    (encoder_name, position, params), (text, vision) = case, LORA_CASES[case]
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
    weights = {}
    for i, width in enumerate([TEXT_WIDTH] * len(text) + [VISION_WIDTH] * len(vision)):
        weights[f"layer_{i}"] = {
            names[p]: {
                "w_lora_A": randn(r, width, seed=seed + 10 * i + j, std=0.4),
                "w_lora_B": randn(width, r, seed=seed + 10 * i + j + 5, std=0.4),
            }
            for j, p in enumerate(params)
        }
    metadata = {
        "r": r,
        "alpha": alpha,
        "encoder": encoder_name,
        "params": list(params),
        "position": position,
    }
    return {"weights": weights, "metadata": metadata}


# --- tests -----------------------------------------------------------------------------------


def test_hand_written_text_tower_equals_open_clip(encoder):
    """The reference itself: hand_text on token embeddings is open_clip's encode_text."""
    tokens = encoder.tokenizer(["a photo of a pug.", "great pyrenees"])
    with torch.no_grad():
        ours = hand_text(encoder.model, encoder.model.token_embedding(tokens), tokens.argmax(-1))
    torch.testing.assert_close(ours, encoder.encode_text(["a photo of a pug.", "great pyrenees"]))


@pytest.mark.parametrize(
    "position, text",
    [("end", "a photo of a {}."), ("middle", "a photo {} of a."), ("front", "{} a photo of a.")],
)
def test_coop_context_of_word_embeddings_is_the_written_prompt(encoder, tmp_path, position, text):
    """A context equal to the embeddings of "a photo of a" must give encode_text of the
    sentence with the class name where the position puts it."""
    ctx = embed(encoder, ids(encoder, "a photo of a")).detach().clone()
    path = save_dassl(tmp_path / "model.pth.tar-50", coop_state(encoder, ctx))
    source = load_peft("coop", path, encoder, CLASSES, class_token_position=position)
    expected = encoder.encode_text([text.format(c.replace("_", " ")) for c in CLASSES])
    torch.testing.assert_close(source.class_features(["ignored {}"]), expected, rtol=0, atol=2e-6)
    assert source.describe()["class_token_position"] == position


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_random_context_matches_hand_built_prompts(
    encoder, tmp_path, position, class_specific
):
    shape = (len(CLASSES), 5, TEXT_WIDTH) if class_specific else (5, TEXT_WIDTH)
    ctx = randn(*shape, seed=3, std=0.5).half()  # CoOp's PREC=fp16 files
    path = save_dassl(tmp_path / "model.pth.tar-50", coop_state(encoder, ctx))
    source = load_peft("coop", path, encoder, CLASSES, class_token_position=position)
    table = source.class_features([])
    expected = coop_features_by_hand(encoder, ctx.float(), position)
    torch.testing.assert_close(table, expected, rtol=0, atol=2e-6)
    assert table.dtype == torch.float32 and table.shape == (3, DIM)
    torch.testing.assert_close(table.norm(dim=-1), torch.ones(3))
    plain = encoder.encode_text([f"a photo of a {c.replace('_', ' ')}." for c in CLASSES])
    assert (table - plain).abs().max() > 1e-2
    torch.testing.assert_close(
        source.image_features(pixels := randn(2, 3, 32, 32, seed=4)), encoder.encode_images(pixels)
    )
    info = source.describe()
    json.dumps(info)
    assert info["method"] == "coop" and info["n_ctx"] == 5 and info["epoch"] == 50
    assert info["class_specific"] is class_specific and info["ctx_dtype"] == "float16"
    assert (
        info["checkpoint_sha256"] == source.checkpoint_sha256
        and len(source.checkpoint_sha256) == 64
    )
    with pytest.raises(PeftError):
        source.per_image_class_features(encoder.encode_images(pixels))


def test_dassl_scheduler_objects_need_the_stand_ins(encoder, tmp_path):
    """The Dassl container really holds objects that plain weights_only refuses."""
    ctx = randn(4, TEXT_WIDTH, seed=6)
    path = save_dassl(tmp_path / "model.pth.tar-1", coop_state(encoder, ctx))
    with pytest.raises(pickle.UnpicklingError, match="CosineAnnealingLR|SGD|defaultdict"):
        torch.load(path, map_location="cpu", weights_only=True)
    source = load_peft("coop", path, encoder, CLASSES)
    torch.testing.assert_close(
        source.class_features([]), coop_features_by_hand(encoder, ctx, "end"), rtol=0, atol=2e-6
    )
    # a bare state_dict (what a trusted re-save leaves) reads the same
    bare = tmp_path / "bare.pth"
    torch.save(coop_state(encoder, ctx, buffers=False), bare)
    torch.testing.assert_close(
        load_peft("coop", bare, encoder, CLASSES).class_features([]), source.class_features([])
    )


def test_coop_with_other_training_classes_only_when_not_strict(encoder, tmp_path):
    ctx = randn(4, TEXT_WIDTH, seed=7)
    trained = ["abyssinian", "beagle", "pug", "sphynx"]
    path = save_dassl(tmp_path / "base.pth.tar", coop_state(encoder, ctx, names=trained))
    with pytest.raises(PeftError, match="trained on 4 classes, 3 class names given"):
        load_peft("coop", path, encoder, CLASSES)
    table = load_peft("coop", path, encoder, CLASSES, strict_classes=False).class_features([])
    torch.testing.assert_close(table, coop_features_by_hand(encoder, ctx, "end"), rtol=0, atol=2e-6)


def test_cocoop_per_image_tables(encoder, tmp_path, pixels, monkeypatch):
    state = cocoop_state(encoder)
    path = save_dassl(tmp_path / "model.pth.tar-10", state)
    source = load_peft("cocoop", path, encoder, CLASSES)
    images = source.image_features(pixels)
    torch.testing.assert_close(images, encoder.encode_images(pixels))
    tables = source.per_image_class_features(images)
    assert tables.shape == (3, 3, DIM) and tables.dtype == torch.float32
    torch.testing.assert_close(tables.norm(dim=-1), torch.ones(3, 3))
    assert (tables[0] - tables[1]).abs().max() > 1e-3 and (tables[1] - tables[2]).abs().max() > 1e-3
    w1, b1, w2, b2 = (
        state[f"meta_net.linear{i}.{p}"].float() for i in (1, 2) for p in ("weight", "bias")
    )
    for b, x in enumerate(images):
        bias = F.relu(x @ w1.T + b1) @ w2.T + b2  # the meta-net on the unit image feature
        shifted = state["ctx"].float() + bias
        torch.testing.assert_close(
            tables[b], coop_features_by_hand(encoder, shifted, "end"), rtol=0, atol=2e-6
        )
        coop = save_dassl(tmp_path / f"coop{b}.pth.tar", coop_state(encoder, shifted))
        torch.testing.assert_close(
            tables[b],
            load_peft("coop", coop, encoder, CLASSES).class_features([]),
            rtol=0,
            atol=2e-6,
        )
    monkeypatch.setattr(peft.coop, "PROMPT_BATCH", 4)  # 9 prompts in chunks of 4, 4 and 1
    torch.testing.assert_close(source.per_image_class_features(images), tables, rtol=0, atol=1e-6)
    with pytest.raises(PeftError, match="per_image_class_features"):
        source.class_features(["a photo of a {}."])
    with pytest.raises(PeftError, match="unit-norm"):
        source.per_image_class_features(images * 3)
    info = source.describe()
    json.dumps(info)
    assert info["n_ctx"] == 4 and info["meta_net_hidden"] == 4 and info["ctx_dtype"] == "float16"


def test_adapter_residual_on_unnormalised_features(encoder, tmp_path, pixels):
    state = adapter_state()
    path = save_dassl(tmp_path / "model.pth.tar-200", state, optimizer="adam")
    source = load_peft("adapter", path, encoder, CLASSES)
    with torch.no_grad():
        f = encoder.model.encode_image(pixels)
    mlp = F.relu(F.relu(f @ state["fc.0.weight"].T) @ state["fc.2.weight"].T)
    expected = F.normalize(0.8 * f + 0.2 * mlp, dim=-1)
    features = source.image_features(pixels)
    torch.testing.assert_close(features, expected, rtol=0, atol=2e-6)
    assert (features - F.normalize(f, dim=-1)).abs().max() > 1e-2  # the adapter matters
    templates = ["a photo of a {}.", "a photo of a {}, a type of pet."]
    torch.testing.assert_close(
        source.class_features(templates), encoder.class_features(CLASSES, templates)
    )
    info = source.describe()
    assert info["ratio"] == 0.2 and info["hidden"] == 4 and info["reduction"] == 4
    with pytest.raises(PeftError):
        source.per_image_class_features(features)


def lora_reference(encoder, payload):
    """A copy of the model whose selected attentions run hand_attention with LoRA on the fly."""
    model = copy.deepcopy(encoder.model)
    meta = payload["metadata"]
    scale = meta["alpha"] / math.sqrt(meta["r"])
    text, vision = LORA_CASES[(meta["encoder"], meta["position"], tuple(meta["params"]))]
    blocks = [model.transformer.resblocks[i] for i in text]
    blocks += [model.visual.transformer.resblocks[i] for i in vision]
    names = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "proj": "o"}
    for i, block in enumerate(blocks):
        lora = {
            names[k]: (v["w_lora_A"], v["w_lora_B"], scale)
            for k, v in payload["weights"][f"layer_{i}"].items()
        }

        def hook(module, args, kwargs, output, lora=lora):
            return hand_attention(args[0], module, kwargs.get("attn_mask"), lora), None

        block.attn.register_forward_hook(hook, with_kwargs=True)
    return model


@pytest.mark.parametrize("case", list(LORA_CASES), ids=["-".join(c[:2]) for c in LORA_CASES])
def test_lora_merged_equals_lora_applied_on_the_fly(encoder, tmp_path, pixels, case):
    payload = lora_payload(case)
    path = tmp_path / "lora_weights.pt"
    torch.save(payload, path)
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    source = load_peft("lora", path, encoder, CLASSES)
    for key, value in encoder.model.state_dict().items():  # the caller's encoder is untouched
        assert torch.equal(value, before[key]), key
    reference = lora_reference(encoder, payload)
    template = "a photo of a {}."
    prompts = [template.format(c.replace("_", " ")) for c in CLASSES]
    with torch.no_grad():
        image = F.normalize(reference.encode_image(pixels), dim=-1)
        text = F.normalize(reference.encode_text(encoder.tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(source.image_features(pixels), image, rtol=0, atol=2e-6)
    torch.testing.assert_close(source.class_features([template]), text, rtol=0, atol=2e-6)
    _, (text_blocks, vision_blocks) = case, LORA_CASES[case]
    plain_image, plain_text = encoder.encode_images(pixels), encoder.encode_text(prompts)
    assert ((image - plain_image).abs().max() > 1e-2) == bool(vision_blocks)
    assert ((text - plain_text).abs().max() > 1e-2) == bool(text_blocks)
    info = source.describe()
    json.dumps(info)
    assert info["scale"] == pytest.approx(1 / math.sqrt(2))
    assert info["text_blocks"] == text_blocks and info["vision_blocks"] == vision_blocks


# --- mismatches ------------------------------------------------------------------------------


def _bad_files(encoder):
    """name -> (method, payload writer, class names, message fragment)."""
    ctx = randn(4, TEXT_WIDTH, seed=30)

    def dassl(state):
        return lambda path: save_dassl(path, state)

    def raw(obj):
        return lambda path: torch.save(obj, path)

    def swap(state, key, value):
        return {**state, key: value}

    coop = coop_state(encoder, ctx)
    cocoop = cocoop_state(encoder)
    lora = lora_payload(("both", "all", ("q", "k", "v")))
    fewer = copy.deepcopy(lora)
    del fewer["weights"]["layer_23"]
    wide = copy.deepcopy(lora)
    wide["weights"]["layer_2"]["q_proj"]["w_lora_A"] = torch.zeros(2, 40)
    no_k = copy.deepcopy(lora)
    del no_k["weights"]["layer_3"]["k_proj"]
    no_r = copy.deepcopy(lora)
    del no_r["metadata"]["r"]
    tensor_ctx = torch.nn.Parameter(ctx.clone())
    sgd = torch.optim.SGD([tensor_ctx], lr=0.1, momentum=0.9)
    tensor_ctx.sum().backward()
    sgd.step()
    long_names = [*CLASSES[:2], "a class name of far too many words for sixteen tokens"]
    return {
        "class count": (
            "coop",
            dassl(coop_state(encoder, ctx, names=[*CLASSES, "beagle"])),
            CLASSES,
            "trained on 4 classes, 3 class names given",
        ),
        "class-specific count": (
            "coop",
            dassl({"ctx": randn(2, 4, TEXT_WIDTH, seed=31)}),
            CLASSES,
            "class-specific ctx holds 2 classes",
        ),
        "ctx width": (
            "coop",
            dassl({"ctx": randn(4, 24, seed=32)}),
            CLASSES,
            "ctx_dim 24 does not match the text width 32",
        ),
        "context length": (
            "coop",
            dassl(swap(coop, "token_suffix", coop["token_suffix"][:, 1:])),
            CLASSES,
            "context length 1 + n_ctx (4) + token_suffix (10) = 15",
        ),
        "missing ctx": (
            "coop",
            dassl({k: v for k, v in coop.items() if k != "ctx"}),
            CLASSES,
            "missing key(s) ctx",
        ),
        "other backbone": (
            "coop",
            dassl(swap(coop, "token_prefix", torch.randn(3, 1, TEXT_WIDTH))),
            CLASSES,
            "SOS embedding",
        ),
        "class order": (
            "coop",
            dassl(coop_state(encoder, ctx, names=CLASSES[::-1])),
            CLASSES,
            "token_suffix of class 0 differs",
        ),
        "too long": ("coop", dassl({"ctx": ctx}), long_names, "is too long"),
        "cocoop meta width": (
            "cocoop",
            dassl(swap(cocoop, "meta_net.linear1.weight", torch.zeros(4, 32, dtype=torch.float16))),
            CLASSES,
            "meta_net.linear1.weight has shape [4, 32]",
        ),
        "cocoop missing": (
            "cocoop",
            dassl({k: v for k, v in cocoop.items() if k != "meta_net.linear2.bias"}),
            CLASSES,
            "missing key(s) meta_net.linear2.bias",
        ),
        "cocoop csc": (
            "cocoop",
            dassl(swap(cocoop, "ctx", torch.zeros(3, 4, TEXT_WIDTH))),
            CLASSES,
            "ctx has shape [3, 4, 32]",
        ),
        "coop file as cocoop": ("cocoop", dassl(coop), CLASSES, "missing key(s) meta_net"),
        "cocoop file as coop": ("coop", dassl(cocoop), CLASSES, "unexpected key(s) meta_net"),
        "adapter dim": (
            "adapter",
            dassl(swap(adapter_state(), "fc.0.weight", torch.zeros(4, 32))),
            CLASSES,
            "fc.0.weight has shape [4, 32], expected [hidden, 16]",
        ),
        "adapter missing": (
            "adapter",
            dassl({"fc.0.weight": torch.zeros(4, DIM)}),
            CLASSES,
            "missing key(s) fc.2.weight",
        ),
        "lora layers": ("lora", raw(fewer), CLASSES, "23 LoRA layers in the file"),
        "lora d": ("lora", raw(wide), CLASSES, "LoRA d = the text width 32"),
        "lora keys": ("lora", raw(no_k), CLASSES, "layer_3 holds"),
        "lora metadata": ("lora", raw(no_r), CLASSES, "metadata lacks r"),
        "lora container": ("lora", dassl(coop), CLASSES, "not a CLIP-LoRA file"),
        "refused global": (
            "coop",
            raw({"state_dict": coop, "cfg": argparse.Namespace(lr=1)}),
            CLASSES,
            "weights_only=True) refuses argparse.Namespace",
        ),
        "object in state_dict": (
            "coop",
            raw({"state_dict": {"ctx": sgd}, "epoch": 1}),
            CLASSES,
            "state_dict['ctx'] is a pickled optimizer/scheduler object",
        ),
        "not a checkpoint": (
            "coop",
            lambda path: path.write_bytes(b"not a checkpoint"),
            CLASSES,
            "not a torch checkpoint readable with weights_only=True",
        ),
    }


def test_mismatched_checkpoints_raise_one_line_errors(encoder, tmp_path):
    for name, (method, write, names, fragment) in _bad_files(encoder).items():
        path = tmp_path / f"{name.replace(' ', '-')}.pth"
        write(path)
        with pytest.raises(PeftError) as caught:
            load_peft(method, path, encoder, names)
            pytest.fail(f"{name}: no PeftError")
        message = str(caught.value)
        assert fragment in message, f"{name}: {message}"
        assert "\n" not in message and len(message) < 500, f"{name}: {message}"


def _with(state, key, value):
    return {**state, key: value}


def _lora_with(case, layer, key, value=None, alpha=None):
    """LoRA_CASES[case]'s file with one A/B tensor (or alpha) replaced."""
    payload = lora_payload(case)
    if value is not None:
        payload["weights"][layer][key[0]][key[1]] = value
    if alpha is not None:
        payload["metadata"]["alpha"] = alpha
    return payload


def _poisoned(tensor, value, index=0):
    bad = tensor.clone()
    bad.view(-1)[index] = value
    return bad


LORA_TEXT = ("text", "half-bottom", ("k", "v", "o"))


def _non_finite_files(encoder):
    """name -> (method, Dassl state_dict or LoRA payload, message fragment)."""
    nan, inf = float("nan"), float("inf")
    coop = coop_state(encoder, randn(4, TEXT_WIDTH, seed=40))
    cocoop, adapter = cocoop_state(encoder), adapter_state()
    b = lora_payload(LORA_TEXT)["weights"]["layer_1"]["v_proj"]["w_lora_B"]
    a = lora_payload(LORA_TEXT)["weights"]["layer_4"]["proj"]["w_lora_A"]
    return {
        "coop ctx NaN": ("coop", _with(coop, "ctx", _poisoned(coop["ctx"], nan, 37)),
                         "state_dict['ctx'] contains NaN or Inf (1 of 128 values)"),
        "coop ctx Inf": ("coop", _with(coop, "ctx", _poisoned(coop["ctx"], -inf)),
                         "state_dict['ctx'] contains NaN or Inf"),
        "cocoop meta_net NaN": (
            "cocoop",
            _with(cocoop, "meta_net.linear2.bias",
                  _poisoned(cocoop["meta_net.linear2.bias"], nan, 5)),
            "state_dict['meta_net.linear2.bias'] contains NaN or Inf",
        ),
        "cocoop meta_net Inf": (
            "cocoop",
            _with(cocoop, "meta_net.linear1.weight",
                  _poisoned(cocoop["meta_net.linear1.weight"], inf)),
            "state_dict['meta_net.linear1.weight'] contains NaN or Inf",
        ),
        "adapter fc.0 NaN": ("adapter", _with(adapter, "fc.0.weight",
                                              _poisoned(adapter["fc.0.weight"], nan)),
                             "state_dict['fc.0.weight'] contains NaN or Inf"),
        "adapter fc.2 Inf": ("adapter", _with(adapter, "fc.2.weight",
                                              _poisoned(adapter["fc.2.weight"], inf, 9)),
                             "state_dict['fc.2.weight'] contains NaN or Inf"),
        "lora B NaN": ("lora", _lora_with(LORA_TEXT, "layer_1", ("v_proj", "w_lora_B"),
                                          _poisoned(b, nan)),
                       "layer_1.v_proj.w_lora_B contains NaN or Inf"),
        "lora A Inf": ("lora", _lora_with(LORA_TEXT, "layer_4", ("proj", "w_lora_A"),
                                          _poisoned(a, inf, 3)),
                       "layer_4.proj.w_lora_A contains NaN or Inf"),
        "lora alpha NaN": ("lora", _lora_with(LORA_TEXT, None, None, alpha=nan),
                           "metadata alpha must be a finite number, got nan"),
        "lora alpha Inf": ("lora", _lora_with(LORA_TEXT, None, None, alpha=inf),
                           "metadata alpha must be a finite number, got inf"),
    }


def _write_peft(method, content, path):
    """A LoRA payload as saved, a state_dict in Dassl's container (without the optimizer
    objects, which cannot be built over meta or quantized tensors)."""
    torch.save(content if method == "lora" else {"state_dict": content, "epoch": 50}, path)
    return path


def _refused(method, path, encoder, fragment):
    with pytest.raises(PeftError) as caught:
        source = load_peft(method, path, encoder, CLASSES)
        pytest.fail(f"{path.name}: loaded, describe() = {source.describe()}")
    message = str(caught.value)
    assert fragment in message and str(path) in message, message
    assert "\n" not in message, message
    return message


NON_FINITE = ("coop ctx NaN", "coop ctx Inf", "cocoop meta_net NaN", "cocoop meta_net Inf",
              "adapter fc.0 NaN", "adapter fc.2 Inf", "lora B NaN", "lora A Inf",
              "lora alpha NaN", "lora alpha Inf")


@pytest.mark.parametrize("name", NON_FINITE)
def test_non_finite_weights_are_refused_naming_the_tensor(encoder, tmp_path, name):
    """NaN/Inf in a learned tensor (CoOp ctx, CoCoOp meta_net, adapter fc.*, LoRA A/B) or in
    LoRA's alpha used to load and give NaN features: each is a PeftError naming the file and
    the tensor."""
    cases = _non_finite_files(encoder)
    assert set(cases) == set(NON_FINITE)
    method, content, fragment = cases[name]
    path = _write_peft(method, content, tmp_path / f"{name.replace(' ', '-')}.pth")
    _refused(method, path, encoder, fragment)


def test_a_key_saved_with_and_without_the_module_prefix_is_refused(encoder, tmp_path):
    """{'ctx': A, 'module.ctx': B} used to keep whichever came last (B) silently."""
    coop = coop_state(encoder, randn(4, TEXT_WIDTH, seed=41))
    both = {**coop, "module.ctx": randn(4, TEXT_WIDTH, seed=42)}
    path = _write_peft("coop", both, tmp_path / "both.pth")
    _refused("coop", path, encoder, "state_dict holds both 'ctx' and 'module.ctx'; keep one")
    adapter = {**adapter_state(), "module.fc.2.weight": adapter_state(seed=3)["fc.2.weight"]}
    path = _write_peft("adapter", adapter, tmp_path / "adapter.pth")
    _refused("adapter", path, encoder, "both 'fc.2.weight' and 'module.fc.2.weight'")


def _tensors_without_data(encoder):
    """name -> (method, Dassl state_dict or LoRA payload, message fragment): tensors that
    are not dense floating CPU tensors with data, and an adapter of width 0."""
    coop = coop_state(encoder, randn(4, TEXT_WIDTH, seed=43))
    cocoop, adapter = cocoop_state(encoder), adapter_state()
    b = lora_payload(LORA_TEXT)["weights"]["layer_2"]["k_proj"]["w_lora_B"]

    def lora(value):
        return _lora_with(LORA_TEXT, "layer_2", ("k_proj", "w_lora_B"), value)

    return {
        "lora meta": ("lora", lora(torch.empty(TEXT_WIDTH, 2, device="meta")),
                      "layer_2.k_proj.w_lora_B is a meta tensor: it has a shape but holds no data"),
        "lora sparse": ("lora", lora(b.to_sparse()),
                        "layer_2.k_proj.w_lora_B has layout sparse_coo; expected a dense"),
        "lora csr": ("lora", lora(b.to_sparse_csr()), "has layout sparse_csr"),
        "lora quantized": ("lora", lora(quantized(b)),
                           "layer_2.k_proj.w_lora_B is a quantized tensor (torch.qint8)"),
        "lora complex": ("lora", lora(b.to(torch.complex64)),
                         "has complex dtype torch.complex64; expected real floating values"),
        "lora integer": ("lora", lora((b * 4).long()),
                         "w_lora_B has dtype torch.int64; expected a floating dtype"),
        "coop meta": ("coop", _with(coop, "ctx", torch.empty(4, TEXT_WIDTH, device="meta")),
                      "state_dict['ctx'] is a meta tensor"),
        "coop sparse": ("coop", _with(coop, "ctx", coop["ctx"].to_sparse()),
                        "state_dict['ctx'] has layout sparse_coo"),
        "coop quantized": ("coop", _with(coop, "ctx", quantized(coop["ctx"])),
                           "state_dict['ctx'] is a quantized tensor"),
        "coop complex": ("coop", _with(coop, "ctx", coop["ctx"].to(torch.complex64)),
                         "state_dict['ctx'] has complex dtype"),
        "coop float8": ("coop", _with(coop, "ctx", coop["ctx"].to(torch.float8_e4m3fn)),
                        "state_dict['ctx'] has dtype torch.float8_e4m3fn; expected float16, "
                        "bfloat16, float32 or float64"),
        "coop meta buffer": ("coop", _with(coop, "token_prefix",
                                           torch.empty(3, 1, TEXT_WIDTH, device="meta")),
                             "state_dict['token_prefix'] is a meta tensor"),
        "cocoop meta": ("cocoop", _with(cocoop, "meta_net.linear1.bias",
                                        torch.empty(4, dtype=torch.float16, device="meta")),
                        "state_dict['meta_net.linear1.bias'] is a meta tensor"),
        "adapter meta": ("adapter", _with(adapter, "fc.0.weight",
                                          torch.empty(4, DIM, device="meta")),
                         "state_dict['fc.0.weight'] is a meta tensor"),
        "adapter sparse": ("adapter", _with(adapter, "fc.0.weight",
                                            adapter["fc.0.weight"].to_sparse()),
                           "state_dict['fc.0.weight'] has layout sparse_coo"),
        "adapter width 0": ("adapter", {"fc.0.weight": torch.zeros(0, DIM),
                                        "fc.2.weight": torch.zeros(DIM, 0)},
                            "state_dict['fc.0.weight'] is empty (shape [0, 16])"),
    }


WITHOUT_DATA = ("lora meta", "lora sparse", "lora csr", "lora quantized", "lora complex",
                "lora integer", "coop meta", "coop sparse", "coop quantized", "coop complex",
                "coop float8", "coop meta buffer", "cocoop meta", "adapter meta", "adapter sparse",
                "adapter width 0")


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch on sparse/quantized
@pytest.mark.parametrize("name", WITHOUT_DATA)
def test_tensors_without_dense_floating_data_are_refused(encoder, tmp_path, name):
    """Meta, sparse, quantized, complex, integer and float8 tensors, and an adapter of width 0,
    used to raise NotImplementedError/RuntimeError/ZeroDivisionError deep in the loaders (float8:
    torch.isfinite is not implemented for it, review 1 item 7), or load silently (a sparse,
    complex or integer LoRA B merged): each is a PeftError naming the file and the tensor."""
    cases = _tensors_without_data(encoder)
    assert set(cases) == set(WITHOUT_DATA)
    method, content, fragment = cases[name]
    path = _write_peft(method, content, tmp_path / f"{name.replace(' ', '-')}.pth")
    _refused(method, path, encoder, fragment)


def test_bad_arguments(encoder, tmp_path):
    path = save_dassl(tmp_path / "c.pth", cocoop_state(encoder))
    assert PEFT_METHODS == ("coop", "cocoop", "adapter", "lora")
    with pytest.raises(PeftError, match="method must be one of"):
        load_peft("prefix", path, encoder, CLASSES)
    with pytest.raises(PeftError, match="applies to coop only"):
        load_peft("cocoop", path, encoder, CLASSES, class_token_position="middle")
    with pytest.raises(PeftError, match="class_token_position must be"):
        load_peft("coop", path, encoder, CLASSES, class_token_position="start")
    with pytest.raises(PeftError, match="not found"):
        load_peft("coop", tmp_path / "missing.pth", encoder, CLASSES)
    with pytest.raises(PeftError, match="class_names is empty"):
        load_peft("cocoop", path, encoder, [])
    assert issubclass(PeftError, ValueError)


# --- the command line: each source end to end ------------------------------------------------


def _write_pets(root):
    """oxford_pets in CoOp's layout with the three classes above (colour-coded PNGs)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = root / "oxford_pets" / "images"
    images.mkdir(parents=True)
    split = {}
    for name, count in {"train": 3, "val": 2, "test": 3}.items():
        split[name] = []
        for label, cls in enumerate(CLASSES):
            for i in range(count):
                colour = np.array([60 + 80 * label, 200 - 70 * label, 120], dtype=float)
                pixels = np.clip(colour + rng.normal(0, 40, (36, 40, 3)), 0, 255)
                relpath = f"{cls}_{name}_{i}.png"
                Image.fromarray(pixels.astype(np.uint8)).save(images / relpath)
                split[name].append([relpath, label, cls])
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(split))


def _peft_file(method, encoder, folder):
    path = folder / f"{method}.pth"
    if method == "coop":
        return save_dassl(path, coop_state(encoder, randn(4, TEXT_WIDTH, seed=3, std=0.5)))
    if method == "cocoop":
        return save_dassl(path, cocoop_state(encoder))
    if method == "adapter":
        return save_dassl(path, adapter_state())
    torch.save(lora_payload(("text", "half-bottom", ("k", "v", "o"))), path)
    return path


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_each_source_runs_end_to_end_in_the_cli(method, encoder, tiny_files, tmp_path, capsys):
    """extract -> fit -> choose M -> test table with features from the PEFT checkpoint; the
    run records the source, and a checkpoint for other classes is one line, exit 2."""
    pytest.importorskip("PIL.Image")
    from fma_fast.cli import main

    _write_pets(tmp_path / "data")
    checkpoint = _peft_file(method, encoder, tmp_path)
    data = ["--root", str(tmp_path / "data"), "--dataset", "oxford_pets", "--model", MODEL,
            "--model-config", str(tiny_files["config"]), "--checkpoint",
            str(tiny_files["checkpoint"]), "--shots", "2", "--views", "2", "--seeds", "1",
            "--quiet"]
    common = [*data, "--blocks", "1", "--epochs", "4", "--max-steps", "3"]
    out = tmp_path / "run"
    code = main(["run", *common, "--peft", method, "--peft-checkpoint", str(checkpoint),
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "test accuracy M=0 (zero-shot)" in printed.out
    results = json.loads((out / "results.json").read_text())
    assert results["peft"]["method"] == method
    assert results["peft"]["checkpoint_sha256"] == file_sha256(checkpoint)
    (run,) = results["runs"]
    assert len(run["test_accuracy"]) == 4 and run["test_rows"] == 9
    if method == "cocoop":
        assert "per-row-tables" in run["solve_path"], run["solve_path"]
    other = tmp_path / "other.pth"  # a checkpoint that does not fit this encoder or data
    if method in ("coop", "cocoop"):  # trained for two classes, not three
        save_dassl(other, {**coop_state(encoder, randn(4, TEXT_WIDTH, seed=3),
                                        names=CLASSES[:2])})
    elif method == "adapter":  # an adapter of another width
        save_dassl(other, {"fc.0.weight": randn(4, DIM + 8, seed=1),
                           "fc.2.weight": randn(DIM + 8, 4, seed=2)})
    else:  # LoRA matrices of the vision width on the text tower
        payload = lora_payload(("text", "half-bottom", ("k", "v", "o")))
        for layer in payload["weights"].values():
            for entry in layer.values():
                entry["w_lora_A"] = randn(2, VISION_WIDTH, seed=4)
        torch.save(payload, other)
    code = main(["run", *common, "--peft", method, "--peft-checkpoint", str(other),
                 "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert any(word in err for word in ("class", "meta_net", "width", "expected")), err
    if method == "coop":  # base-to-new: a context trained on the 2 base classes serves all 3
        assert main(["run", *common, "--subsample", "base-to-new", "--peft", method,
                     "--peft-checkpoint", str(other), "--out", str(tmp_path / "b2n")]) == 0
        (run,) = json.loads((tmp_path / "b2n" / "results.json").read_text())["runs"]
        assert run["classes"] == {"base": [0, 1], "new": [2]}
    if method == "cocoop":  # its feature files need the source's per-image tables
        assert main(["extract", *data, "--peft", method,
                     "--peft-checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 0
        code = main(["train", str(tmp_path / "x" / "seed1-k2" / "train.safetensors"), "--out",
                     str(tmp_path / "m"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "use fma-fast run --peft cocoop" in err, err


def _extract_refused(tiny_files, tmp_path, method, path, out, capsys) -> str:
    """``fma-fast extract --peft METHOD`` of the pets data into ``out``: exit 2 and one line,
    which it returns."""
    from fma_fast.cli import main

    _write_pets(tmp_path / "data")
    code = main(["extract", "--root", str(tmp_path / "data"), "--dataset", "oxford_pets",
                 "--model", MODEL, "--model-config", str(tiny_files["config"]),
                 "--checkpoint", str(tiny_files["checkpoint"]), "--shots", "1", "--views",
                 "1", "--seeds", "1", "--quiet", "--peft", method, "--peft-checkpoint",
                 str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch on sparse/quantized
@pytest.mark.parametrize("name", ["coop ctx NaN", "lora B NaN", "lora meta", "cocoop meta",
                                  "adapter width 0", "lora sparse"])
def test_bad_peft_weights_are_one_line_in_the_cli(encoder, tiny_files, tmp_path, capsys, name):
    """``extract --peft`` with NaN weights used to exit 0 and write NaN features into the cache
    and files; meta tensors and an adapter of width 0 printed tracebacks. Each is exit 2 with
    one line naming the tensor, before any image is encoded."""
    pytest.importorskip("PIL.Image")

    method, content, fragment = {**_non_finite_files(encoder),
                                 **_tensors_without_data(encoder)}[name]
    path = _write_peft(method, content, tmp_path / "peft.pth")
    out = tmp_path / "out"
    err = _extract_refused(tiny_files, tmp_path, method, path, out, capsys)
    assert fragment in err, err
    assert not list(out.rglob("*.safetensors"))


def _extreme_files():
    """Finite weights whose outputs are not: CLIP-Adapter fc.0 weights x1e30 (the adapted
    features overflow fp32's norm: F.normalize made every row 0) and LoRA alpha 1e300 (the
    merged weights overflow: NaN text features)."""
    adapter = adapter_state()
    adapter = {**adapter, "fc.0.weight": adapter["fc.0.weight"] * 1e30}
    return {
        "adapter x1e30": ("adapter", adapter,
                          "adapted image features: row 0 has a norm beyond float32"),
        "lora alpha 1e300": ("lora", lora_payload(LORA_TEXT, alpha=1e300),
                             "holds NaN or Inf"),
    }


@pytest.mark.parametrize("name", ["adapter x1e30", "lora alpha 1e300"])
def test_extreme_finite_peft_weights_are_refused_before_anything_is_written(
        encoder, tiny_files, tmp_path, capsys, pixels, name):
    """Review item 8: the adapter case exited 0 with all-zero features, the LoRA case exited 2
    only after text.safetensors held NaN. The encoder outputs are refused before they are
    normalised, naming the source, and before any file of the cache is written."""
    pytest.importorskip("PIL.Image")
    import safetensors.torch


    method, content, fragment = _extreme_files()[name]
    path = _write_peft(method, content, tmp_path / "peft.pth")
    source = load_peft(method, path, encoder, CLASSES)  # the weights themselves are finite
    with pytest.raises(PeftError if method == "adapter" else ValueError, match=fragment):
        if method == "adapter":
            source.image_features(pixels)
        else:
            source.class_features(["a photo of a {}."])
    out = tmp_path / "out"
    err = _extract_refused(tiny_files, tmp_path, method, path, out, capsys)
    assert fragment in err and "broken or extreme" in err, err
    written = sorted(out.rglob("*.safetensors"))
    # The adapter leaves the text tower alone: its class table is the backbone's, and right.
    assert [p.name for p in written] == (["text.safetensors"] if method == "adapter" else [])
    for table in written:
        features = safetensors.torch.load_file(table)["class_features"]
        assert bool(torch.isfinite(features).all()), table
        assert torch.allclose(features.norm(dim=-1), torch.ones(len(CLASSES)), atol=1e-5)
