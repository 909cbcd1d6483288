"""CLIP-LoRA: its ``save_lora`` file's low-rank updates merged into a copy of the encoder's
model, with the block tables CLIP-LoRA selects layers by."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch

from ..encoder import ClipEncoder
from .source import PeftError, PeftSource, learned, shape_of

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
_LORA_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}
_LORA_METADATA = ("r", "alpha", "encoder", "params", "position")


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
        r, alpha, tower, params, position = _metadata(path, payload.get("metadata"))
        weights = payload["weights"]
        blocks, vision_table = _lora_blocks(path, encoder, tower, position, weights)
        updates = _updates(path, encoder, weights, blocks, tower, params, position, r)
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
        self.merged = _merged(encoder, updates, scale)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.merged.encode_images(pixels)

    def class_features(self, templates: Sequence[str]) -> torch.Tensor:
        return self.merged.class_features(self.class_names, templates)


def _metadata(path, metadata) -> tuple[int, float, str, Sequence[str], str]:
    """(r, alpha, towers, params, position) of a CLIP-LoRA file's metadata, each checked."""
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
    return r, alpha, tower, params, position


def _updates(path, encoder: ClipEncoder, weights, blocks, tower: str, params, position,
             r: int) -> list[tuple[str, int, str, torch.Tensor, torch.Tensor]]:
    """(tower, block, projection, A, B) of every LoRA pair in the file, each checked against
    the block it updates."""
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
                learned(path, f"layer_{i}.{proj}.{key}", entry[key])
                for key in ("w_lora_A", "w_lora_B")
            )
            if shape_of(a) != [r, width] or shape_of(b) != [width, r]:
                raise PeftError(
                    f"{path}: layer_{i}.{proj} (the {name} block {index}) has A "
                    f"{shape_of(a)} and B {shape_of(b)}, expected [{r}, {width}] and "
                    f"[{width}, {r}] (LoRA d = the {name} width {width})"
                )
            updates.append((name, index, proj, a, b))
    return updates


def _merged(encoder: ClipEncoder, updates, scale: float) -> ClipEncoder:
    """A copy of ``encoder`` with every update's ``scale``·B·A added to its attention."""
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
    return ClipEncoder(
        model,
        encoder.tokenizer,
        name=encoder.name,
        checkpoint=encoder.checkpoint,
        device=encoder.device,
        precision=encoder.precision,
    )


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
