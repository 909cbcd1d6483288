"""CoOp and CoCoOp: the learned context of a Dassl ``prompt_learner`` spliced into prompts
rebuilt from the current class names, run through the text tower from embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...core.validation import normalized_outputs
from .dassl import _PROMPT_BUFFERS
from .source import PeftError, PeftSource, embed_dim, shape_of

PROMPT_BATCH = 256  # prompts per text-tower pass


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


def _check_buffer_shapes(path, prefix, suffix, encoder, n_ctx: int, context_length: int
                         ) -> None:
    """Both buffers there, of the shapes the text width and context length give."""
    width = encoder.model.ln_final.weight.shape[0]
    if prefix is None or suffix is None:
        missing = "token_prefix" if prefix is None else "token_suffix"
        raise PeftError(f"{path}: missing key {missing} (the file holds only one buffer)")
    if prefix.ndim != 3 or prefix.shape[1] != 1 or prefix.shape[2] != width:
        raise PeftError(
            f"{path}: token_prefix has shape {shape_of(prefix)}, expected [n_cls, 1, {width}]"
        )
    if suffix.ndim != 3 or suffix.shape[0] != prefix.shape[0] or suffix.shape[2] != width:
        raise PeftError(
            f"{path}: token_suffix has shape {shape_of(suffix)}, expected "
            f"[{prefix.shape[0]}, L - 1 - n_ctx, {width}]"
        )
    if 1 + n_ctx + suffix.shape[1] != context_length:
        raise PeftError(
            f"{path}: context length 1 + n_ctx ({n_ctx}) + token_suffix "
            f"({suffix.shape[1]}) = {1 + n_ctx + suffix.shape[1]}, but the text tower's "
            f"is {context_length}"
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
            raise PeftError(f"{path}: ctx has shape {shape_of(ctx)}, expected {allowed}")
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
        file_classes = self._check_buffers(path, state, encoder, class_names, n_ctx,
                                           context_length, ctx.ndim == 3, strict_classes)
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

    def _check_buffers(self, path, state, encoder, class_names, n_ctx, context_length,
                       class_specific, strict_classes) -> int | None:
        """Checks with the saved token_prefix/token_suffix; returns the file's class count."""
        prefix, suffix = state.get("token_prefix"), state.get("token_suffix")
        if prefix is None and suffix is None:
            return None
        _check_buffer_shapes(path, prefix, suffix, encoder, n_ctx, context_length)
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
        file_classes, n_cls = int(prefix.shape[0]), len(class_names)
        if file_classes != n_cls and (strict_classes or class_specific):
            raise PeftError(
                f"{path}: the file was trained on {file_classes} classes, {n_cls} class names "
                "given (strict_classes=False rebuilds the prompts for the names given)"
            )
        if strict_classes and file_classes == n_cls:
            self._check_suffixes(path, suffix, encoder, class_names, n_ctx, context_length)
        return file_classes

    def _check_suffixes(self, path, suffix, encoder, class_names, n_ctx, context_length) -> None:
        """The saved token_suffix must be the embedding of the prompts of the class names
        given (same names, same order, same backbone)."""
        tokens, _ = self._end_tokens(encoder, class_names, n_ctx, context_length)
        with torch.inference_mode():
            current = encoder.model.token_embedding(tokens[:, 1 + n_ctx :].to(encoder.device))
        current = current.detach().float().cpu()
        close = torch.isclose(suffix.float(), current, rtol=1e-2, atol=1e-4).all(-1).all(-1)
        if not bool(close.all()):
            c = int((~close).nonzero()[0])
            raise PeftError(
                f"{path}: token_suffix of class {c} differs from the prompt for "
                f"{class_names[c]!r}: other class names, another class order or "
                "another backbone (strict_classes=False ignores the saved buffers)"
            )

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
                chunks.append(normalized_outputs(
                    f"{self.path}: text features of the learned prompts (from {start})", x,
                    error=PeftError).cpu())
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
        dim = embed_dim(encoder)
        width = self.ctx.shape[-1]
        if w1.ndim != 2 or w1.shape[1] != dim:
            raise PeftError(
                f"{path}: meta_net.linear1.weight has shape {shape_of(w1)}, expected "
                f"[hidden, {dim}] for the image embedding width {dim} of {encoder.name}"
            )
        hidden = w1.shape[0]
        expected = {
            "meta_net.linear1.bias": (b1, [hidden]),
            "meta_net.linear2.weight": (w2, [width, hidden]),
            "meta_net.linear2.bias": (b2, [width]),
        }
        for key, (tensor, shape) in expected.items():
            if shape_of(tensor) != shape:
                raise PeftError(f"{path}: {key} has shape {shape_of(tensor)}, expected {shape}")
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
        dim = embed_dim(self.encoder)
        if x.ndim != 2 or x.shape[1] != dim:
            raise PeftError(f"image_features has shape {shape_of(x)}, expected [B, {dim}]")
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
