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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...core.names import check_choice
from ..encoder import ClipEncoder
from .adapter import AdapterSource
from .coop import CoCoOpSource, CoOpSource
from .dassl import dassl_state_dict, read_checkpoint
from .lora import LORA_TEMPLATE, LoRASource
from .source import PeftError, PeftSource, embed_dim

PEFT_METHODS = ("coop", "cocoop", "adapter", "lora")
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
_PEFT_TEMPLATES = {"lora": LORA_TEMPLATE}


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
    state, info = dassl_state_dict(payload, path, method)
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
        from ...ops.class_tables import PerRowClasses

        count = len(self.source.class_names)
        keep = None if class_indices is None else torch.as_tensor(list(class_indices))

        def build(x0: torch.Tensor) -> torch.Tensor:
            tables = self.source.per_image_class_features(x0.detach().float().cpu())
            return tables if keep is None else tables[:, keep]

        return PerRowClasses(build=build, num_classes=count if keep is None else len(keep),
                             dim=embed_dim(self.source.encoder))
