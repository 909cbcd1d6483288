"""PEFT feature sources: CoOp, CoCoOp, CLIP-Adapter and CLIP-LoRA checkpoints on open_clip.

Each loader reads the file that project writes (docs/peft-formats.md describes the formats),
checks it against the encoder and the class names, and gives features in the same form as
:class:`~fma_fast.clip.encoder.ClipEncoder`: unit-norm fp32 rows on the CPU.

- ``coop``: a Dassl checkpoint of CoOp's ``prompt_learner`` (``ctx`` unified or class-specific).
  The class table comes from the learned context; images go through the plain image tower.
- ``cocoop``: a Dassl checkpoint of CoCoOp's ``prompt_learner`` (``ctx`` and ``meta_net``). The
  class table depends on the image, so it is given per image by
  :meth:`PeftSource.per_image_class_features` as a (B, C, D) tensor.
- ``adapter``: a Dassl checkpoint of CLIP-Adapter's ``clip_adapter`` (``fc.0``, ``fc.2``); the
  residual MLP mixes into the unnormalised image feature with ratio 0.2, as released.
- ``lora``: CLIP-LoRA's ``save_lora`` file, merged into a copy of the encoder's model with
  W' = W + (alpha / sqrt(r)) B A (the scale CLIP-LoRA's ``LoRALayer`` uses); its classes are
  prompted "a photo of a {}." unless templates are given (:func:`peft_default_templates`).

Every file is read with ``torch.load(weights_only=True, map_location="cpu")``; see
:func:`read_checkpoint` for the optimizer and scheduler objects that Dassl pickles.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core import validation as check
from ..core.names import check_choice
from .encoder import ClipEncoder, file_sha256

PEFT_METHODS = ("coop", "cocoop", "adapter", "lora")
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
ADAPTER_RATIO = 0.2  # CLIP-Adapter's and FMA's hard-coded residual ratio
PROMPT_BATCH = 256  # prompts per text-tower pass

_DASSL_KEYS = {
    "coop": ("ctx",),
    "cocoop": (
        "ctx",
        "meta_net.linear1.weight",
        "meta_net.linear1.bias",
        "meta_net.linear2.weight",
        "meta_net.linear2.bias",
    ),
    "adapter": ("fc.0.weight", "fc.2.weight"),
}
_PROMPT_BUFFERS = ("token_prefix", "token_suffix")
_LABELS = {"coop": "CoOp", "cocoop": "CoCoOp", "adapter": "CLIP-Adapter", "lora": "CLIP-LoRA"}

# CLIP-LoRA's block index tables (loralib/utils.py): position -> block indices per tower.
_LORA_SHARED_POSITIONS = {  # the entries both towers' tables have
    "bottom": [0, 1, 2, 3],
    "mid": [4, 5, 6, 7],
    "up": [8, 9, 10, 11],
    "half-up": list(range(6, 12)),
    "half-bottom": list(range(0, 6)),
    "all": list(range(12)),
}
_LORA_TEXT_POSITIONS = {"top1": [11], "top2": [10, 11], "top3": [9, 10, 11],
                        **_LORA_SHARED_POSITIONS}
# ViT-B/16 (ViT-B/32 has the same lists, without top and top3)
_LORA_VISION_POSITIONS = {"top": [11], "top3": [9, 10, 11], **_LORA_SHARED_POSITIONS}
# ViT-L/14 (24 blocks): CLIP-LoRA replaced its table on 2024-09-12 (commit e6bf706), so files
# of both versions exist; the layer count in a file tells them apart (LoRASource).
_LORA_VISION_POSITIONS_L14_BEFORE = {  # "all" stopped at block 20, the halves at block 11
    **{k: v for k, v in _LORA_VISION_POSITIONS.items() if k not in ("top", "top3", "all")},
    "all": list(range(21)),
}
_LORA_VISION_POSITIONS_L14 = {
    "half-up": list(range(12, 24)),
    "half-bottom": list(range(12)),
    "all": list(range(24)),
}
_LORA_VISION_TABLES = {  # vision tower depth -> (name of the table version, table) readings
    24: (("ViT-L/14 table before 2024-09-12", _LORA_VISION_POSITIONS_L14_BEFORE),
         ("ViT-L/14 table since 2024-09-12", _LORA_VISION_POSITIONS_L14)),
}
_LORA_VISION_DEFAULT = (("ViT-B/16 table", _LORA_VISION_POSITIONS),)
LORA_TEMPLATE = "a photo of a {}."
"""The prompt CLIP-LoRA's datasets and the released FMA's LoRA extractor encode classes with."""
_PEFT_TEMPLATES = {"lora": LORA_TEMPLATE}
_LORA_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
_LORA_METADATA = ("r", "alpha", "encoder", "params", "position")


class PeftError(ValueError):
    """A PEFT checkpoint that cannot be read or does not fit the encoder (one-line message)."""


# ---------------------------------------------------------------------------------------------
# Reading files


class _Dropped:
    """Inert stand-in for an optimizer or scheduler object pickled inside a Dassl file.

    It runs no code of the class it replaces and keeps none of the pickled state.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __repr__(self) -> str:
        return "<dropped optimizer/scheduler object>"


def _dropped_mapping(*args, **kwargs) -> dict:
    """Stand-in for ``collections.defaultdict(dict)`` (an optimizer's ``state``): a plain dict."""
    return {}


# Globals that Dassl's containers pickle: the torch scheduler a warm-up scheduler keeps as
# ``successor`` (inside the ``scheduler`` entry), the optimizer that scheduler holds, and that
# optimizer's defaultdict state. Dassl builds only these optimizers and schedulers
# (dassl/optim/optimizer.py, lr_scheduler.py); its warm-up schedulers are listed for a
# warm-up wrapped in another.
_DROPPED_CLASSES = (
    "torch.optim.sgd.SGD",
    "torch.optim.adam.Adam",
    "torch.optim.adamw.AdamW",
    "torch.optim.rmsprop.RMSprop",
    "torch.optim.radam.RAdam",
    "dassl.optim.radam.RAdam",
    "torch.optim.lr_scheduler.StepLR",
    "torch.optim.lr_scheduler.MultiStepLR",
    "torch.optim.lr_scheduler.CosineAnnealingLR",
    "dassl.optim.lr_scheduler.ConstantWarmupScheduler",
    "dassl.optim.lr_scheduler.LinearWarmupScheduler",
)
_DROPPED_FACTORIES = ("collections.defaultdict", "builtins.dict")
_DROPPED_GLOBALS = [(_Dropped, name) for name in _DROPPED_CLASSES] + [
    (_dropped_mapping, name) for name in _DROPPED_FACTORIES
]


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")`` that also reads Dassl files.

    Dassl's ``save_model`` stores ``scheduler.state_dict()``. With the warm-up that CoOp's and
    CoCoOp's configs set, that dict holds the wrapped torch scheduler itself (``successor``),
    which pickles its optimizer (an ``SGD`` with a ``defaultdict`` state), so a plain
    ``weights_only=True`` load refuses the file. Allow-listing the real classes would let
    the unpickler construct optimizers and schedulers and run their ``__setstate__`` (and
    the set of classes would grow with every optimizer Dassl can build). Instead, each of
    the fully qualified names Dassl can pickle there is mapped, for this call only, to an
    inert stand-in (``_Dropped``, or an empty plain dict for the defaultdict), so those
    objects come back empty; no code of theirs runs and weights_only stays on. The loaders
    read only ``state_dict`` (and ``epoch``, ``val_result``), so the ``optimizer`` and
    ``scheduler`` entries are ignored, and every ``state_dict`` entry must be a tensor, so a
    stand-in never reaches a computation. Any other global is still refused (one-line
    :class:`PeftError` naming it). ``weights_only=False`` is never used. Torch < 2.5 has no
    ``safe_globals``; there such Dassl files are refused.
    """
    path = Path(path)
    if path.is_dir():
        raise PeftError(
            f"{path} is a directory; pass the checkpoint file itself "
            "(e.g. prompt_learner/model.pth.tar-50)"
        )
    if not path.is_file():
        raise PeftError(f"PEFT checkpoint not found: {path}")
    stand_ins = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    context = stand_ins(_DROPPED_GLOBALS) if stand_ins else contextlib.nullcontext()
    try:
        with context:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _refused_globals(path)
        if refused:
            raise PeftError(
                f"{path}: torch.load(weights_only=True) refuses {', '.join(refused)} (not "
                "tensors or a known Dassl optimizer/scheduler); if you trust the file, load it "
                "once with weights_only=False and re-save only its state_dict"
            ) from None
        detail = str(error).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise PeftError(
            f"{path} is not a torch checkpoint readable with weights_only=True: "
            f"{_one_line(detail, 160)}"
        ) from None
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise PeftError(
            f"{path} is not a readable torch checkpoint: {type(error).__name__}: {_one_line(error)}"
        ) from None


def _refused_globals(path: Path) -> list[str]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) file, or unreadable: fall back to torch's message
        return []
    dropped = set(_DROPPED_CLASSES) | set(_DROPPED_FACTORIES)
    return sorted(name for name in names if name not in dropped)


def _dassl_state_dict(payload: Any, path: Path, method: str) -> tuple[dict, dict]:
    """(state_dict, container info) of a Dassl checkpoint, or of a bare state_dict."""
    if isinstance(payload, Mapping) and "state_dict" in payload:
        state, info = payload["state_dict"], {}
        epoch = payload.get("epoch")
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            info["epoch"] = epoch
        if isinstance(payload.get("val_result"), (int, float)):
            info["val_result"] = float(payload["val_result"])
    elif (
        isinstance(payload, Mapping)
        and payload
        and all(isinstance(v, torch.Tensor) for v in payload.values())
    ):
        state, info = payload, {}
    else:
        raise PeftError(
            f"{path} is not a Dassl checkpoint of {_LABELS[method]} (no 'state_dict' entry)"
        )
    if not isinstance(state, Mapping):
        raise PeftError(f"{path}: 'state_dict' is a {type(state).__name__}, not a mapping")
    clean = {}
    for saved, value in state.items():
        key = str(saved).removeprefix("module.")
        if not isinstance(value, torch.Tensor):
            kind = "pickled optimizer/scheduler" if isinstance(value, _Dropped) else "Python"
            raise PeftError(
                f"{path}: state_dict[{key!r}] is a {kind} object "
                f"({type(value).__name__}), not a tensor"
            )
        if key in clean:  # 'ctx' and 'module.ctx': which one was trained is unknown
            raise PeftError(f"{path}: state_dict holds both {key!r} and 'module.{key}'; keep one")
        clean[key] = _learned(path, f"state_dict[{key!r}]", value)
    expected = _DASSL_KEYS[method]
    missing = [k for k in expected if k not in clean]
    if missing:
        raise PeftError(
            f"{path}: missing key(s) {', '.join(missing)} of a {_LABELS[method]} checkpoint"
        )
    allowed = set(expected) | (set(_PROMPT_BUFFERS) if method in ("coop", "cocoop") else set())
    extra = sorted(set(clean) - allowed)
    if extra:
        raise PeftError(
            f"{path}: unexpected key(s) {', '.join(extra[:4])} in a {_LABELS[method]} checkpoint"
        )
    return clean, info


def _shape(tensor: torch.Tensor) -> list[int]:
    return list(tensor.shape)


def _learned(path: Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of a PEFT file, refused unless dense, floating, with data, finite and not
    empty: NaN weights would give NaN features, and a meta tensor has no values to merge."""
    return check.check_dense_float(
        f"{path}: {name}", tensor, finite=True, nonempty=True, error=PeftError
    )


# ---------------------------------------------------------------------------------------------
# The text tower on embeddings


def _check_text_tower(model: torch.nn.Module) -> None:
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if not all(hasattr(model, name) for name in needed):
        raise PeftError(
            f"{type(model).__name__} has no built-in CLIP text tower (token_embedding, "
            "transformer, ln_final); prompt learning needs an open_clip CLIP model"
        )
    pool = getattr(model, "text_pool_type", "argmax")
    if pool != "argmax":
        raise PeftError(f"prompt learning needs argmax (EOT) text pooling, the model uses {pool!r}")


def encode_text_embeddings(
    model: torch.nn.Module, embeddings: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` from token embeddings (N, L, width) instead of ids.

    ``tokens`` (N, L) are the ids the embeddings stand for; their argmax (the EOT token)
    picks the pooled row. Returns the unnormalised (N, D) text features.
    """
    cast = model.transformer.get_cast_dtype()
    x = embeddings.to(cast) + model.positional_embedding.to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = model.text_projection
    if projection is None:
        return x
    if isinstance(projection, torch.nn.Linear):
        return projection(x)
    return x @ projection


# ---------------------------------------------------------------------------------------------
# Sources


class PeftSource:
    """Features of one PEFT checkpoint on one encoder: unit-norm fp32 rows on the CPU."""

    method: str
    checkpoint_sha256: str

    def __init__(
        self,
        method: str,
        path: Path,
        encoder: ClipEncoder,
        class_names: Sequence[str],
        settings: dict[str, Any],
    ) -> None:
        self.method = method
        self.path = path
        self.encoder = encoder
        self.class_names = list(class_names)
        self.checkpoint_sha256 = file_sha256(path)
        self._settings = settings

    def describe(self) -> dict[str, Any]:
        """JSON-able provenance: method, checkpoint sha256 and the settings read from the file."""
        return {
            "method": self.method,
            "checkpoint_sha256": self.checkpoint_sha256,
            "encoder": dict(self.encoder.model_id),
            "n_classes": len(self.class_names),
            **copy.deepcopy(self._settings),
        }

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) unit fp32 image features for preprocessed pixels (B, 3, H, W)."""
        return self.encoder.encode_images(pixels)

    def class_features(self, templates: Sequence[str]) -> torch.Tensor:
        """(C, D) unit fp32 class features."""
        raise NotImplementedError

    def per_image_class_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C, D) per-image class features: CoCoOp only."""
        raise PeftError(
            f"{self.method} class features do not depend on the image; use class_features"
        )


class _PromptSource(PeftSource):
    """Shared by CoOp and CoCoOp: prompts rebuilt from the current class names.

    For class c the tokenised prompt is ``"X X ... X <name>."`` (n_ctx placeholders), as CoOp
    builds it. Its embedding rows are the token embeddings with the n_ctx context rows put
    at the positions ``class_token_position`` picks (end: right after SOS; middle: half
    before and half after the name; front: after the name). Only the learned tensors are
    taken from the file; the saved token_prefix/token_suffix buffers serve as checks.
    """

    def __init__(self, method, path, encoder, class_names, state, info, position, strict_classes):
        model = encoder.model
        _check_text_tower(model)
        ctx = state["ctx"]
        width = model.ln_final.weight.shape[0]
        context_length = model.positional_embedding.shape[0]
        if ctx.ndim not in (2, 3) or (method == "cocoop" and ctx.ndim != 2):
            allowed = "[n_ctx, ctx_dim]"
            if method == "coop":
                allowed += " or [n_cls, n_ctx, ctx_dim]"
            raise PeftError(f"{path}: ctx has shape {_shape(ctx)}, expected {allowed}")
        if ctx.shape[-1] != width:
            raise PeftError(
                f"{path}: ctx_dim {ctx.shape[-1]} does not match the text width {width} of "
                f"{encoder.name} (trained on another backbone?)"
            )
        n_ctx = ctx.shape[-2]
        n_cls = len(class_names)
        if ctx.ndim == 3 and ctx.shape[0] != n_cls:
            raise PeftError(
                f"{path}: class-specific ctx holds {ctx.shape[0]} classes, {n_cls} class "
                "names given"
            )
        file_classes = self._check_buffers(
            path,
            state,
            encoder,
            class_names,
            n_ctx,
            context_length,
            ctx.ndim == 3,
            strict_classes,
        )
        settings = {
            "n_ctx": n_ctx,
            "class_specific": ctx.ndim == 3,
            "class_token_position": position,
            "ctx_dtype": str(ctx.dtype).removeprefix("torch."),
            "n_classes_in_file": file_classes,
            "buffers_in_file": all(k in state for k in _PROMPT_BUFFERS),
            "text_context_length": context_length,
            **info,
        }
        super().__init__(method, path, encoder, class_names, settings)
        self.n_ctx = n_ctx
        self.position = position
        self.ctx = ctx.detach().float().to(encoder.device)
        tokens, positions = self._layout(encoder, class_names, n_ctx, position, context_length)
        self.tokens = tokens.to(encoder.device)
        self.ctx_positions = positions.to(encoder.device)
        with torch.inference_mode():
            self.base = model.token_embedding(self.tokens).detach().float()

    @staticmethod
    def _name_ids(tokenizer, name: str) -> list[int]:
        if hasattr(tokenizer, "encode"):
            return list(tokenizer.encode(name))
        ids = tokenizer([name])[0]
        return ids[1 : int(ids.argmax())].tolist()

    def _end_tokens(self, encoder, class_names, n_ctx, context_length):
        """Token ids of CoOp's prompts ``"X ... X <name>."`` and the name lengths in tokens."""
        names = [name.replace("_", " ") for name in class_names]
        placeholder = " ".join(["X"] * n_ctx)
        tokens = encoder.tokenizer([f"{placeholder} {name}." for name in names])
        if tokens.shape[1] != context_length:
            raise PeftError(
                f"the tokenizer's context length {tokens.shape[1]} differs from the text "
                f"tower's {context_length}"
            )
        lengths = [len(self._name_ids(encoder.tokenizer, name)) for name in names]
        for name, length in zip(names, lengths):
            needed = 1 + n_ctx + length + 2  # SOS, context, name, ".", EOT
            if needed > context_length:
                raise PeftError(
                    f"class name {name!r} is too long: its prompt needs {needed} tokens, the "
                    f"text context length is {context_length}"
                )
        return tokens, lengths

    def _layout(self, encoder, class_names, n_ctx, position, context_length):
        """Token ids (C, L) of the prompts as laid out and the context rows' positions (C, n)."""
        tokens, lengths = self._end_tokens(encoder, class_names, n_ctx, context_length)
        rows, positions = [], []
        for c, length in enumerate(lengths):
            sos, slots, suffix = tokens[c, :1], tokens[c, 1 : 1 + n_ctx], tokens[c, 1 + n_ctx :]
            if position == "end":
                parts, starts = [sos, slots, suffix], [(1, n_ctx)]
            elif position == "middle":
                half = n_ctx // 2
                parts = [sos, slots[:half], suffix[:length], slots[half:], suffix[length:]]
                starts = [(1, half), (1 + half + length, n_ctx - half)]
            else:  # front
                parts = [sos, suffix[:length], slots, suffix[length:]]
                starts = [(1 + length, n_ctx)]
            rows.append(torch.cat(parts))
            positions.append(torch.cat([torch.arange(s, s + n) for s, n in starts]))
        return torch.stack(rows), torch.stack(positions)

    def _check_buffers(
        self,
        path,
        state,
        encoder,
        class_names,
        n_ctx,
        context_length,
        class_specific,
        strict_classes,
    ) -> int | None:
        """Checks with the saved token_prefix/token_suffix; returns the file's class count."""
        width, n_cls = encoder.model.ln_final.weight.shape[0], len(class_names)
        prefix, suffix = state.get("token_prefix"), state.get("token_suffix")
        if prefix is None and suffix is None:
            return None
        if prefix is None or suffix is None:
            missing = "token_prefix" if prefix is None else "token_suffix"
            raise PeftError(f"{path}: missing key {missing} (the file holds only one buffer)")
        if prefix.ndim != 3 or prefix.shape[1] != 1 or prefix.shape[2] != width:
            raise PeftError(
                f"{path}: token_prefix has shape {_shape(prefix)}, expected [n_cls, 1, {width}]"
            )
        if suffix.ndim != 3 or suffix.shape[0] != prefix.shape[0] or suffix.shape[2] != width:
            raise PeftError(
                f"{path}: token_suffix has shape {_shape(suffix)}, expected "
                f"[{prefix.shape[0]}, L - 1 - n_ctx, {width}]"
            )
        if 1 + n_ctx + suffix.shape[1] != context_length:
            raise PeftError(
                f"{path}: context length 1 + n_ctx ({n_ctx}) + token_suffix "
                f"({suffix.shape[1]}) = {1 + n_ctx + suffix.shape[1]}, but the text tower's "
                f"is {context_length}"
            )
        model = encoder.model
        sot = getattr(encoder.tokenizer, "sot_token_id", None)
        if sot is None:
            sot = int(encoder.tokenizer([""])[0, 0])
        with torch.inference_mode():
            sos = model.token_embedding.weight[sot].detach().float().cpu()
        if not torch.allclose(prefix.float(), sos.expand_as(prefix), rtol=1e-2, atol=1e-4):
            raise PeftError(
                f"{path}: token_prefix is not {encoder.name}'s SOS embedding: the file was "
                "trained on another backbone"
            )
        file_classes = int(prefix.shape[0])
        if file_classes != n_cls and (strict_classes or class_specific):
            raise PeftError(
                f"{path}: the file was trained on {file_classes} classes, {n_cls} class names "
                "given (strict_classes=False rebuilds the prompts for the names given)"
            )
        if strict_classes and file_classes == n_cls:
            tokens, _ = self._end_tokens(encoder, class_names, n_ctx, context_length)
            with torch.inference_mode():
                current = model.token_embedding(tokens[:, 1 + n_ctx :].to(encoder.device))
            current = current.detach().float().cpu()
            close = torch.isclose(suffix.float(), current, rtol=1e-2, atol=1e-4).all(-1).all(-1)
            if not bool(close.all()):
                c = int((~close).nonzero()[0])
                raise PeftError(
                    f"{path}: token_suffix of class {c} differs from the prompt for "
                    f"{class_names[c]!r}: other class names, another class order or "
                    "another backbone (strict_classes=False ignores the saved buffers)"
                )
        return file_classes

    def _encode(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        chunks = []
        with torch.inference_mode():
            for start in range(0, embeddings.shape[0], PROMPT_BATCH):
                stop = start + PROMPT_BATCH
                with encoder._autocast():
                    x = encode_text_embeddings(
                        encoder.model, embeddings[start:stop], tokens[start:stop]
                    )
                chunks.append(F.normalize(x.float(), dim=-1).cpu())
        return torch.cat(chunks)


class CoOpSource(_PromptSource):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._table: torch.Tensor | None = None

    def prompt_embeddings(self) -> torch.Tensor:
        """(C, L, width) prompt embeddings: token embeddings with the context spliced in."""
        n_cls = len(self.class_names)
        with torch.inference_mode():
            ctx = self.ctx if self.ctx.ndim == 3 else self.ctx.expand(n_cls, -1, -1)
            prompts = self.base.clone()
            prompts[torch.arange(n_cls, device=prompts.device)[:, None], self.ctx_positions] = ctx
        return prompts

    def class_features(self, templates: Sequence[str] = ()) -> torch.Tensor:
        """(C, D) class features of the learned prompts; ``templates`` are ignored."""
        if self._table is None:
            self._table = self._encode(self.prompt_embeddings(), self.tokens)
        return self._table.clone()


class CoCoOpSource(_PromptSource):
    def __init__(self, method, path, encoder, class_names, state, info, position, strict):
        super().__init__(method, path, encoder, class_names, state, info, position, strict)
        w1, b1 = state["meta_net.linear1.weight"], state["meta_net.linear1.bias"]
        w2, b2 = state["meta_net.linear2.weight"], state["meta_net.linear2.bias"]
        dim = _embed_dim(encoder)
        width = self.ctx.shape[-1]
        if w1.ndim != 2 or w1.shape[1] != dim:
            raise PeftError(
                f"{path}: meta_net.linear1.weight has shape {_shape(w1)}, expected "
                f"[hidden, {dim}] for the image embedding width {dim} of {encoder.name}"
            )
        hidden = w1.shape[0]
        expected = {
            "meta_net.linear1.bias": (b1, [hidden]),
            "meta_net.linear2.weight": (w2, [width, hidden]),
            "meta_net.linear2.bias": (b2, [width]),
        }
        for key, (tensor, shape) in expected.items():
            if _shape(tensor) != shape:
                raise PeftError(f"{path}: {key} has shape {_shape(tensor)}, expected {shape}")
        device = encoder.device
        self.meta = [t.detach().float().to(device) for t in (w1, b1, w2, b2)]
        self._settings.update(
            meta_net_hidden=hidden, meta_net_dtype=str(w1.dtype).removeprefix("torch.")
        )

    def meta_net(self, image_features: torch.Tensor) -> torch.Tensor:
        """pi(x) = W2 ReLU(W1 x + b1) + b2: the (B, ctx_dim) bias added to every context row."""
        w1, b1, w2, b2 = self.meta
        return F.linear(F.relu(F.linear(image_features, w1, b1)), w2, b2)

    def class_features(self, templates: Sequence[str] = ()) -> torch.Tensor:
        raise PeftError("cocoop class features depend on the image: use per_image_class_features")

    def per_image_class_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, C, D) class features of the prompts conditioned on each unit image feature."""
        x = torch.as_tensor(image_features)
        dim = _embed_dim(self.encoder)
        if x.ndim != 2 or x.shape[1] != dim:
            raise PeftError(f"image_features has shape {_shape(x)}, expected [B, {dim}]")
        x = x.detach().float().to(self.encoder.device)
        if not torch.allclose(x.norm(dim=-1), torch.ones((), device=x.device), atol=1e-2):
            raise PeftError("image_features must be unit-norm rows (CoCoOp's meta-net input)")
        n_img, n_cls = x.shape[0], len(self.class_names)
        chunks = []
        with torch.inference_mode():
            shifted = self.ctx[None] + self.meta_net(x)[:, None]  # (B, n_ctx, width)
            rows = torch.arange(n_img * n_cls, device=x.device)
            image_of, class_of = rows // n_cls, rows % n_cls
            for start in range(0, rows.numel(), PROMPT_BATCH):
                b = image_of[start : start + PROMPT_BATCH]
                c = class_of[start : start + PROMPT_BATCH]
                prompts = self.base[c].clone()
                slots = (torch.arange(c.numel(), device=x.device)[:, None], self.ctx_positions[c])
                prompts[slots] = shifted[b]
                chunks.append(self._encode(prompts, self.tokens[c]))
        return torch.cat(chunks).reshape(n_img, n_cls, -1)


def _embed_dim(encoder: ClipEncoder) -> int:
    visual = encoder.model.visual
    dim = getattr(visual, "output_dim", None)
    if dim is None:
        projection = getattr(encoder.model, "text_projection", None)
        dim = projection.shape[1] if isinstance(projection, torch.Tensor) else None
    if dim is None:
        raise PeftError(f"cannot tell the embedding width of {encoder.name}")
    return int(dim)


class AdapterSource(PeftSource):
    """CLIP-Adapter: f' = (1 - 0.2) f + 0.2 ReLU(W2 ReLU(W1 f)) on the unnormalised image
    feature f, then L2-normalised (as CLIP-Adapter and FMA's adapter extractor do). The MLP
    has no biases, so it is positively homogeneous and normalising f first would give the
    same f' up to rounding. Class features are the plain text tower's prompt-ensemble
    features."""

    def __init__(self, path, encoder, class_names, state, info):
        w1, w2 = state["fc.0.weight"], state["fc.2.weight"]
        dim = _embed_dim(encoder)
        if w1.ndim != 2 or w1.shape[1] != dim:
            raise PeftError(
                f"{path}: adapter fc.0.weight has shape {_shape(w1)}, expected [hidden, {dim}] "
                f"for the image embedding width {dim} of {encoder.name}"
            )
        if _shape(w2) != [dim, w1.shape[0]]:
            raise PeftError(
                f"{path}: adapter fc.2.weight has shape {_shape(w2)}, expected {[dim, w1.shape[0]]}"
            )
        settings = {
            "ratio": ADAPTER_RATIO,
            "hidden": int(w1.shape[0]),
            "reduction": dim / w1.shape[0],
            "weights_dtype": str(w1.dtype).removeprefix("torch."),
            **info,
        }
        super().__init__("adapter", path, encoder, class_names, settings)
        self.weights = [w.detach().float().to(encoder.device) for w in (w1, w2)]

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """The residual mix of unnormalised image features (B, D), before normalisation."""
        w1, w2 = self.weights
        mlp = F.relu(F.linear(F.relu(F.linear(features, w1)), w2))
        return (1 - ADAPTER_RATIO) * features + ADAPTER_RATIO * mlp

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        with torch.inference_mode():
            with encoder._autocast():
                features = encoder.model.encode_image(pixels.to(encoder.device))
            return F.normalize(self.adapt(features.float()), dim=-1).cpu()

    def class_features(self, templates: Sequence[str]) -> torch.Tensor:
        return self.encoder.class_features(self.class_names, templates)


class LoRASource(PeftSource):
    """CLIP-LoRA: the low-rank updates merged into a deep copy of the encoder's model.

    ``layer_i`` is the i-th wrapped attention in CLIP-LoRA's order: the selected text blocks
    ascending (encoder text/both), then the selected vision blocks ascending (vision/both).
    q, k and v update the row blocks [0:d], [d:2d], [2d:3d] of ``in_proj_weight``; o updates
    ``out_proj.weight``. The merged eval weights are exact and deterministic (no LoRA
    dropout). The caller's encoder is never modified. CLIP-LoRA has two ViT-L/14 vision
    tables (changed on 2024-09-12); the file's layer count says which one it was saved with.
    """

    def __init__(self, path, encoder, class_names, payload):
        if not isinstance(payload, Mapping) or "weights" not in payload:
            raise PeftError(f"{path} is not a CLIP-LoRA file (no 'weights' entry)")
        metadata, weights = payload.get("metadata"), payload["weights"]
        if not isinstance(metadata, Mapping):
            raise PeftError(f"{path}: missing key 'metadata' of a CLIP-LoRA file")
        missing = [k for k in _LORA_METADATA if k not in metadata]
        if missing:
            raise PeftError(f"{path}: metadata lacks {', '.join(missing)}")
        r, alpha = metadata["r"], metadata["alpha"]
        tower, params, position = metadata["encoder"], metadata["params"], metadata["position"]
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise PeftError(f"{path}: metadata r must be a positive int, got {r!r}")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(
            alpha
        ):
            raise PeftError(f"{path}: metadata alpha must be a finite number, got {alpha!r}")
        if tower not in ("text", "vision", "both"):
            raise PeftError(f"{path}: metadata encoder must be text, vision or both, got {tower!r}")
        if (
            isinstance(params, str)
            or not isinstance(params, Sequence)
            or not params
            or not set(params) <= set(_LORA_PROJ)
        ):
            raise PeftError(
                f"{path}: metadata params must be a list from q, k, v, o, got {params!r}"
            )
        blocks, vision_table = _lora_blocks(path, encoder, tower, position, weights)
        if not isinstance(weights, Mapping):
            raise PeftError(f"{path}: 'weights' is a {type(weights).__name__}, not a mapping")
        expected = {f"layer_{i}" for i in range(len(blocks))}
        if set(weights) != expected:
            extra, lost = sorted(set(weights) - expected), sorted(expected - set(weights))
            raise PeftError(
                f"{path}: {len(weights)} LoRA layers in the file, but encoder={tower} "
                f"position={position} selects {len(blocks)} attention blocks of {encoder.name}"
                + (f" (missing {', '.join(lost[:3])})" if lost else "")
                + (f" (unexpected {', '.join(map(str, extra[:3]))})" if extra else "")
            )
        keys = {_LORA_PROJ[p] for p in params}
        updates = []
        for i, (name, index, width) in enumerate(blocks):
            layer = weights[f"layer_{i}"]
            if not isinstance(layer, Mapping) or set(layer) != keys:
                found = sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
                raise PeftError(
                    f"{path}: layer_{i} holds {found}, expected {sorted(keys)} for params "
                    f"{list(params)}"
                )
            for proj in sorted(keys):
                entry = layer[proj]
                if not isinstance(entry, Mapping) or not all(
                    isinstance(entry.get(k), torch.Tensor) for k in ("w_lora_A", "w_lora_B")
                ):
                    raise PeftError(f"{path}: layer_{i}.{proj} lacks tensors w_lora_A, w_lora_B")
                a, b = (
                    _learned(path, f"layer_{i}.{proj}.{key}", entry[key])
                    for key in ("w_lora_A", "w_lora_B")
                )
                if _shape(a) != [r, width] or _shape(b) != [width, r]:
                    raise PeftError(
                        f"{path}: layer_{i}.{proj} (the {name} block {index}) has A "
                        f"{_shape(a)} and B {_shape(b)}, expected [{r}, {width}] and "
                        f"[{width}, {r}] (LoRA d = the {name} width {width})"
                    )
                updates.append((name, index, proj, a, b))
        scale = alpha / math.sqrt(r)
        settings = {
            "r": r,
            "alpha": alpha,
            "scale": scale,
            "encoder_towers": tower,
            "params": list(params),
            "position": position,
            "text_blocks": [index for name, index, _ in blocks if name == "text"],
            "vision_blocks": [index for name, index, _ in blocks if name == "vision"],
            "vision_table": vision_table,
            "dropout": "none: merged eval weights",
        }
        super().__init__("lora", path, encoder, class_names, settings)
        model = copy.deepcopy(encoder.model)
        with torch.no_grad():
            for name, index, proj, a, b in updates:
                attn = _tower_blocks(model, name)[index].attn
                device, dtype = attn.in_proj_weight.device, attn.in_proj_weight.dtype
                delta = (scale * (b.float() @ a.float())).to(device=device, dtype=dtype)
                if proj == "proj":
                    attn.out_proj.weight += delta
                else:
                    row = "qkv".index(proj[0]) * attn.embed_dim
                    attn.in_proj_weight[row : row + attn.embed_dim] += delta
        self.merged = ClipEncoder(
            model,
            encoder.tokenizer,
            name=encoder.name,
            checkpoint=encoder.checkpoint,
            device=encoder.device,
            precision=encoder.precision,
        )

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.merged.encode_images(pixels)

    def class_features(self, templates: Sequence[str]) -> torch.Tensor:
        return self.merged.class_features(self.class_names, templates)


def _tower_blocks(model: torch.nn.Module, tower: str):
    if tower == "text":
        parent = getattr(model, "transformer", None)
    else:
        parent = getattr(getattr(model, "visual", None), "transformer", None)
    return getattr(parent, "resblocks", None)


def _tower_selection(path, encoder: ClipEncoder, name: str, table, position):
    """(tower, block index, width) of the blocks ``table[position]`` selects in one tower."""
    selected = []
    for index, block in enumerate(_tower_blocks(encoder.model, name)):
        if index not in table[position]:
            continue
        attn = getattr(block, "attn", None)
        if not isinstance(attn, torch.nn.MultiheadAttention) or not getattr(
            attn, "_qkv_same_embed_dim", False
        ):
            raise PeftError(
                f"{path}: {name} block {index} of {encoder.name} has no packed "
                "nn.MultiheadAttention to merge LoRA into"
            )
        selected.append((name, index, attn.embed_dim))
    return selected


def _lora_blocks(
    path, encoder: ClipEncoder, tower: str, position, weights
) -> tuple[list[tuple[str, int, int]], str | None]:
    """(tower, block index, width) of each wrapped attention, in CLIP-LoRA's layer order, and
    the vision table version read (None without vision LoRA).

    A tower with two table versions (ViT-L/14) is read with the version whose selection has
    as many layers as the file holds; a file that fits none, or versions that would select
    different blocks from the same count, is refused naming every reading.
    """
    readings: list[tuple[str | None, list]] = [(None, [])]
    for name in ("text", "vision"):
        if tower not in (name, "both"):
            continue
        blocks = _tower_blocks(encoder.model, name)
        if blocks is None:
            what = "a ViT image tower" if name == "vision" else "an open_clip CLIP text tower"
            raise PeftError(f"{path}: {name} LoRA needs {what}; {encoder.name} has none")
        if name == "text":
            versions = ((None, _LORA_TEXT_POSITIONS),)
        else:
            versions = _LORA_VISION_TABLES.get(len(blocks), _LORA_VISION_DEFAULT)
        known = [(label, table) for label, table in versions if position in table]
        if not known:
            names = dict.fromkeys(key for _, table in versions for key in table)
            raise PeftError(
                f"{path}: position {position!r} is not in CLIP-LoRA's {name} table "
                f"({', '.join(names)})"
            )
        readings = [
            (label or first, selected + _tower_selection(path, encoder, name, table, position))
            for first, selected in readings
            for label, table in known
        ]
    if len({tuple(selected) for _, selected in readings}) == 1:
        return readings[0][1], readings[0][0]
    count = len(weights) if isinstance(weights, Mapping) else None
    fitting = [(label, selected) for label, selected in readings if len(selected) == count]
    if len({tuple(selected) for _, selected in fitting}) == 1:
        return fitting[0][1], fitting[0][0]
    described = " or ".join(
        f"{len(selected)} with CLIP-LoRA's {label}" for label, selected in readings
    )
    raise PeftError(
        f"{path}: {count} LoRA layers in the file, but encoder={tower} position={position} "
        f"selects {described} (attention blocks of {encoder.name})"
        + ("; the count fits more than one reading" if len(fitting) > 1 else "")
    )


def peft_default_templates(method: str | None) -> list[str] | None:
    """The prompt templates a PEFT method's class features use when none are given (None: the
    dataset's own template, as the plain encoder)."""
    template = _PEFT_TEMPLATES.get(method)
    return None if template is None else [template]


def load_peft(
    method: str,
    path: str | os.PathLike,
    encoder: ClipEncoder,
    class_names: Sequence[str],
    *,
    class_token_position: str = "end",
    strict_classes: bool = True,
) -> PeftSource:
    """Load a CoOp, CoCoOp, CLIP-Adapter or CLIP-LoRA checkpoint as a feature source.

    ``class_token_position`` (coop only; the file does not record it) is end, middle or
    front. With ``strict_classes`` (the default) a CoOp/CoCoOp file's saved buffers must
    match the class names given (count, order, names); ``strict_classes=False`` accepts a
    unified context trained on other classes (CoCoOp's base-to-new setting) and rebuilds
    the prompts for the names given. Raises :class:`PeftError` with a one-line message for
    a file that does not fit.
    """
    check_choice("method", method, PEFT_METHODS, error=PeftError)
    check_choice("class_token_position", class_token_position, CLASS_TOKEN_POSITIONS,
                 error=PeftError)
    if class_token_position != "end" and method != "coop":
        raise PeftError(f"class_token_position {class_token_position!r} applies to coop only")
    class_names = list(class_names)
    if not class_names:
        raise PeftError("class_names is empty")
    path = Path(path)
    payload = read_checkpoint(path)
    if method == "lora":
        return LoRASource(path, encoder, class_names, payload)
    state, info = _dassl_state_dict(payload, path, method)
    if method == "adapter":
        return AdapterSource(path, encoder, class_names, state, info)
    cls = CoOpSource if method == "coop" else CoCoOpSource
    return cls(
        method, path, encoder, class_names, state, info, class_token_position, strict_classes
    )


class PeftEncoder:
    """A :class:`ClipEncoder` seen through a PEFT source, for the extraction pipeline: images
    and class texts are encoded by the source, and ``model_id`` carries the source's
    provenance, so its features never mix with the plain encoder's (or another checkpoint's)
    in a cache. For CoCoOp the class table is the plain prompt table (its per-image tables come
    from :meth:`per_image_tables`)."""

    def __init__(self, source: PeftSource) -> None:
        self.source = source
        base = source.encoder
        self.name, self.checkpoint, self.device = base.name, base.checkpoint, base.device
        self.precision, self.preprocessing = base.precision, base.preprocessing

    @property
    def model_id(self) -> dict[str, Any]:
        return {**self.source.encoder.model_id, "peft": self.source.describe()}

    @property
    def per_image(self) -> bool:
        return self.source.method == "cocoop"

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.source.image_features(pixels)

    def class_features(self, class_names: Sequence[str], templates: Sequence[str], *,
                       progress: bool = False) -> torch.Tensor:
        if list(class_names) != self.source.class_names:
            raise PeftError(f"the {self.source.method} source was loaded for other class names")
        if self.per_image:
            return self.source.encoder.class_features(class_names, templates, progress=progress)
        return self.source.class_features(templates)

    def per_image_tables(self, class_indices: Sequence[int] | None = None):
        """CoCoOp's tables as :class:`fma_fast.PerRowClasses` (of ``class_indices`` only, in
        that order, when given: base-to-new halves)."""
        from ..ops.class_tables import PerRowClasses

        count = len(self.source.class_names)
        keep = None if class_indices is None else torch.as_tensor(list(class_indices))

        def build(x0: torch.Tensor) -> torch.Tensor:
            tables = self.source.per_image_class_features(x0.detach().float().cpu())
            return tables if keep is None else tables[:, keep]

        return PerRowClasses(build=build, num_classes=count if keep is None else len(keep),
                             dim=_embed_dim(self.source.encoder))
