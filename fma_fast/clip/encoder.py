"""Frozen open_clip encoders loaded from local files only: nothing is fetched at run time."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._io import file_sha256
from .._validation import resolve_device
from .prompts import build_prompts

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed (a ValueError too, so the CLI prints one line)."""


def import_open_clip():
    """open_clip, imported only when an encoder is needed so ``import fma_fast`` stays light."""
    try:
        import open_clip
    except ImportError as error:
        raise MissingExtraError(
            f"CLIP encoders need open_clip ({error}); pip install fma_fast[clip]"
        ) from None
    return open_clip


def register_model_config(path: str | os.PathLike) -> str:
    """Register an open_clip architecture JSON (embed_dim, vision_cfg, text_cfg); returns its name.

    The name is the file's stem, as in open_clip's own registry.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config file not found: {path}")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"model config {path} is not valid JSON: {error}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if not isinstance(config, dict) or missing:
        raise ValueError(f"model config {path} lacks {missing or 'a JSON object'}")
    import_open_clip().add_model_config(path)
    return path.stem


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    return _AUTOCAST.get(precision, torch.float16)


class ClipEncoder:
    """A frozen open_clip model (both towers in eval mode) with its tokenizer and provenance.

    ``model_id`` (name, checkpoint sha256, precision) and ``preprocessing`` go into every
    cached shard so that features from another model or preprocessing are never reused.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        name: str,
        checkpoint: str,
        device: torch.device,
        precision: str,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.checkpoint = checkpoint
        self.device = device
        self.autocast_dtype = _autocast_dtype(precision, device)
        self.precision = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[
            self.autocast_dtype
        ]
        cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        self.preprocessing: dict[str, Any] = {
            "size": list(size),
            "mean": [float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))],
            "std": [float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))],
            "interpolation": cfg.get("interpolation", "bicubic"),
        }

    @property
    def model_id(self) -> dict[str, str]:
        return {"model": self.name, "checkpoint": self.checkpoint, "precision": self.precision}

    def _autocast(self):
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm fp32 features (B, D) on the CPU for preprocessed pixels (B, 3, H, W)."""
        with self._autocast():
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unit-norm fp32 features (N, D) on the CPU for N prompts."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            with self._autocast():
                features = self.model.encode_text(tokens)
            chunks.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(chunks)

    def class_features(
        self, class_names: Sequence[str], templates: Sequence[str], *, progress: bool = False
    ) -> torch.Tensor:
        """(C, D) class text features; several templates are a prompt ensemble: the mean of the
        normalised features over templates, renormalised."""
        if not class_names:
            raise ValueError("class_names is empty")
        per_template = [
            self.encode_text(prompts)
            for prompts in tqdm(
                build_prompts(class_names, templates),
                desc="text",
                unit="template",
                disable=None if progress else True,  # None: off when not a terminal
            )
        ]
        return F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)


def load_encoder(
    model: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str = "auto",
    init_seed: int = 0,
) -> ClipEncoder:
    """Build open_clip architecture ``model`` with weights from a local ``checkpoint`` file.

    ``checkpoint=None`` gives seeded random weights (for tests and smoke runs). Names are
    open_clip's (``ViT-B-16``, ``ViT-B-32``, ``ViT-L-14``, ``RN50``, ... or one registered with
    :func:`register_model_config`); schemas that download (``hf-hub:``) are refused, and so are
    towers that need Hugging Face files. ``precision`` picks fp16 ("auto"), bf16 or fp32
    autocast on CUDA; the CPU always runs fp32.
    """
    open_clip = import_open_clip()
    if ":" in model:
        raise ValueError(
            f"model {model!r}: schemas such as hf-hub: fetch files at run time; pass an "
            "open_clip architecture name (or --model-config FILE) and a local --checkpoint"
        )
    config = open_clip.get_model_config(model)
    if config is None:
        raise ValueError(
            f"unknown open_clip model {model!r}: use a name such as ViT-B-16, ViT-B-32, "
            "ViT-L-14 or RN50 (open_clip.list_models() lists them) or register an "
            "architecture JSON with --model-config"
        )
    text_cfg = config.get("text_cfg", {})
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
        raise ValueError(
            f"model {model!r} needs Hugging Face text files that would be fetched at run time; "
            "it is not supported offline"
        )
    device = resolve_device(device)
    _autocast_dtype(precision, device)  # reject a bad precision before the slow load
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            network = open_clip.create_model(
                model, pretrained=None, pretrained_image=False, pretrained_text=False
            )
        provenance = f"random-init:seed={init_seed}"
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        try:
            # An absolute path can never be mistaken for a downloadable pretrained tag.
            network = open_clip.create_model(
                model,
                pretrained=str(path.resolve()),
                pretrained_image=False,
                pretrained_text=False,
            )
        except Exception as error:  # torch and open_clip raise many types for a wrong file
            first_line = (str(error).splitlines() or [""])[0][:300]
            hint = ""
            if "TorchScript" in str(error) or "jit" in str(error).lower():
                hint = (
                    "; OpenAI's TorchScript .pt files need converting once: "
                    "torch.save(torch.jit.load(f).state_dict(), 'weights.pt')"
                )
            raise ValueError(
                f"{path} is not a loadable checkpoint for open_clip model {model!r}: "
                f"{type(error).__name__}: {first_line}{hint}"
            ) from None
        provenance = f"sha256:{file_sha256(path)}"
    tokenizer = open_clip.get_tokenizer(model)
    return ClipEncoder(
        network.to(device),
        tokenizer,
        name=model,
        checkpoint=provenance,
        device=device,
        precision=precision,
    )
