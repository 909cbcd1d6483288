"""Frozen open_clip encoders: from a local checkpoint file, from an open_clip pretrained tag or
``hf-hub:`` name (resolved through open_clip's own cache, downloaded there only when missing),
or seeded random weights."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.names import Amp, check_amp
from ..core.progress import progress as progress_bar
from ..core.validation import normalized_outputs, resolve_device
from ..io.files import file_sha256, read_json
from .prompts import build_prompts

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
HF_HUB_PREFIX = "hf-hub:"
"""open_clip's schema for a model whose architecture and weights live in a Hugging Face repo."""
RANDOM_INIT = "random-init:seed="
"""How an encoder with seeded random weights records its "checkpoint" (the seed follows)."""


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
    config = read_json(path, "model config")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg")
               if not isinstance(config, dict) or k not in config]
    if not isinstance(config, dict) or missing:
        raise ValueError(f"model config {path} lacks {missing or 'a JSON object'}")
    import_open_clip().add_model_config(path)
    return path.stem


def _autocast_dtype(precision: Amp, device: torch.device) -> torch.dtype | None:
    """The encoder's autocast on CUDA (fp16 for "auto"); none on the CPU."""
    precision = check_amp("precision", precision)
    if device.type != "cuda" or precision == "fp32":
        return None
    return _AUTOCAST.get(precision, torch.float16)


class ClipEncoder:
    """A frozen open_clip model (both towers in eval mode) with its tokenizer and provenance.

    ``model_id`` (name, checkpoint sha256, the pretrained tag when one was used, precision) and
    ``preprocessing`` go into every cached shard so that features from another model or
    preprocessing are never reused. ``spec`` says how to build the same encoder again.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        name: str,
        checkpoint: str,
        device: torch.device,
        precision: Amp,
        pretrained: str | None = None,
        weights_file: str | None = None,
        architecture: dict[str, Any] | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.checkpoint = checkpoint
        self.pretrained = pretrained
        self.weights_file = weights_file
        self.architecture = copy.deepcopy(architecture)
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
        identity = {"model": self.name, "checkpoint": self.checkpoint, "precision": self.precision}
        if self.pretrained is not None:
            identity["pretrained"] = self.pretrained
        return identity

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able: what :func:`load_encoder` needs to build this encoder again (the
        architecture, the weights' digest or random-init seed, the tag or file they came from)."""
        return {
            "model": self.name,
            "checkpoint": self.checkpoint,
            "pretrained": self.pretrained,
            "weights_file": self.weights_file,
            "architecture": copy.deepcopy(self.architecture),
            "preprocessing": copy.deepcopy(self.preprocessing),
        }

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
        return normalized_outputs(f"image features of {self.name}", features).cpu()

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Unit-norm fp32 features (N, D) on the CPU for N prompts."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            with self._autocast():
                features = self.model.encode_text(tokens)
            chunks.append(normalized_outputs(f"text features of {self.name} (prompts from "
                                             f"{start})", features).cpu())
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
            for prompts in progress_bar(build_prompts(class_names, templates), desc="text",
                                        unit="template", enabled=progress)
        ]
        return normalized_outputs(f"class features of {self.name}",
                                  torch.stack(per_template).mean(dim=0))


def _first_line(error: BaseException, limit: int = 200) -> str:
    line = " ".join((str(error).splitlines() or [""])[0].split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _download_source(open_clip, cfg: dict[str, Any]) -> tuple[str, str]:
    """(what open_clip would download for a pretrained entry, the default cache it goes to):
    the entry's Hugging Face repo when huggingface_hub is installed, else its URL, the order
    open_clip's ``download_pretrained`` tries them in."""
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub and open_clip.pretrained.has_hf_hub():
        repo, filename = os.path.split(hub)
        files = filename or "open_clip_model.safetensors or open_clip_pytorch_model.bin"
        return f"https://huggingface.co/{repo} ({files})", "the Hugging Face cache (HF_HOME)"
    return url or "nothing (the entry names no URL)", "~/.cache/clip"


def resolve_pretrained(
    model: str, tag: str, cache_dir: str | os.PathLike | None = None
) -> tuple[str, Path]:
    """open_clip's pretrained ``tag`` of ``model`` as (the tag as open_clip lists it, the local
    weights file), resolved as ``open_clip.create_model(model, pretrained=tag,
    cache_dir=cache_dir)`` resolves it: ``get_pretrained_cfg`` then ``download_pretrained``,
    which returns the file in open_clip's cache and downloads it only when it is missing.

    An unknown tag, or weights neither cached nor downloadable (no network), raise ValueError
    in one line naming the tag, what open_clip would download, and ``--checkpoint FILE``.
    """
    open_clip = import_open_clip()
    if tag.startswith(HF_HUB_PREFIX):
        raise ValueError(
            f"pretrained {tag!r}: hf-hub: names are open_clip model names; pass it as the model "
            f"(--model {tag}, load_encoder({tag!r})), which takes its weights from that repo"
        )
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model)
        listed = ", ".join(known) if known else f"no tags for {model}"
        raise ValueError(
            f"unknown pretrained tag {tag!r} for open_clip model {model!r} (open_clip knows "
            f"{listed}); for weights in a local file use --checkpoint FILE (checkpoint=...)"
        )
    name = next(
        (t for t in open_clip.list_pretrained_tags_by_model(model)
         if open_clip.get_pretrained_cfg(model, t) is cfg),
        tag,
    )
    cache = None if cache_dir is None else str(cache_dir)
    try:
        found = open_clip.pretrained.download_pretrained(cfg, cache_dir=cache)
    except Exception as error:  # urllib, huggingface_hub and open_clip raise many types
        source, default = _download_source(open_clip, cfg)
        where = f"--cache-dir {cache}" if cache else default
        raise ValueError(
            f"pretrained {name!r} of {model}: its weights are not in {where} and could not be "
            f"downloaded ({type(error).__name__}: {_first_line(error)}); open_clip downloads "
            f"{source}: fetch it where there is a network into a cache folder given as "
            "--cache-dir, or pass a local copy with --checkpoint FILE"
        ) from None
    if not found or not Path(found).is_file():
        raise ValueError(f"pretrained {name!r} of {model}: open_clip resolved no file ({found!r})")
    return name, Path(found)


def _hub_files(open_clip, model: str, cache_dir: str | None) -> tuple[Path, dict[str, Any]]:
    """An ``hf-hub:`` model's weights file and architecture, fetched as open_clip's
    ``create_model`` fetches them (the repo's open_clip_config.json and default weights)."""
    repo = model[len(HF_HUB_PREFIX):]
    fetch = open_clip.pretrained.download_pretrained_from_hf
    try:
        config_path = fetch(repo, filename="open_clip_config.json", cache_dir=cache_dir)
        weights = Path(fetch(repo, cache_dir=cache_dir))
    except Exception as error:  # huggingface_hub raises many types (offline, missing, HTTP)
        where = f"--cache-dir {cache_dir}" if cache_dir else "the Hugging Face cache (HF_HOME)"
        raise ValueError(
            f"model {model!r}: its open_clip_config.json and weights are not in {where} and "
            f"could not be downloaded ({type(error).__name__}: {_first_line(error)}); open_clip "
            f"downloads them from https://huggingface.co/{repo}: fetch them where there is a "
            "network, or pass an architecture name (or --model-config FILE) and --checkpoint FILE"
        ) from None
    config = read_json(config_path, f"model {model!r}'s open_clip_config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ValueError(f"model {model!r}: its open_clip_config.json has no model_cfg")
    return weights, config["model_cfg"]


def _architecture(open_clip, model: str, checkpoint, pretrained, cache: str | None
                  ) -> tuple[Path | None, dict[str, Any]]:
    """The architecture of ``model`` (and an ``hf-hub:`` model's weights file), refusing what
    open_clip would load wrongly or fma_fast does not support."""
    if checkpoint is not None and pretrained is not None:
        raise ValueError(
            "give checkpoint (a local weights file) or pretrained (an open_clip tag), not both"
        )
    hub = model.startswith(HF_HUB_PREFIX)
    if ":" in model and not hub:
        raise ValueError(
            f"model {model!r}: of open_clip's schemas only hf-hub: is supported; for a local "
            "folder pass an architecture name (or --model-config FILE) and --checkpoint FILE"
        )
    if hub and (checkpoint is not None or pretrained is not None):
        raise ValueError(
            f"model {model!r} takes its weights from that repo (as open_clip's create_model "
            "does); drop checkpoint/pretrained (--checkpoint/--pretrained)"
        )
    weights = None
    if hub:
        weights, config = _hub_files(open_clip, model, cache)
    else:
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
            f"model {model!r} needs a Hugging Face transformers text tower or tokenizer; it is "
            "not supported"
        )
    return weights, config


def _weights_source(open_clip, model: str, hub_weights: Path | None, checkpoint, pretrained,
                    cache: str | None) -> tuple[str | None, Path | None, str | None]:
    """(what open_clip's create_model takes as ``pretrained``, the local weights file, the
    pretrained tag); no weights file: seeded random init."""
    if model.startswith(HF_HUB_PREFIX):
        return None, hub_weights, None
    if pretrained is not None:
        if not isinstance(pretrained, str):
            raise TypeError(f"pretrained must be a tag (str), got {type(pretrained).__name__}")
        if not open_clip.get_pretrained_cfg(model, pretrained) and Path(pretrained).is_file():
            return str(Path(pretrained).resolve()), Path(pretrained), None
        tag, weights_file = resolve_pretrained(model, pretrained, cache)
        return tag, weights_file, tag
    if checkpoint is not None:
        weights_file = Path(checkpoint)
        if not weights_file.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {weights_file}")
        # An absolute path can never be mistaken for a downloadable pretrained tag.
        return str(weights_file.resolve()), weights_file, None
    return None, None, None


def _network(open_clip, model: str, source: str | None, weights_file: Path | None,
             cache: str | None, init_seed: int) -> tuple[torch.nn.Module, str]:
    """The open_clip model with its weights, and where they came from (the file's sha256, or
    the seed of a random init)."""
    if weights_file is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            network = open_clip.create_model(
                model, pretrained=None, pretrained_image=False, pretrained_text=False
            )
        return network, f"{RANDOM_INIT}{init_seed}"
    try:
        network = open_clip.create_model(
            model,
            pretrained=source,
            cache_dir=cache,
            pretrained_image=False,
            pretrained_text=False,
        )
    except Exception as error:  # torch and open_clip raise many types for a wrong file
        hint = ""
        if "TorchScript" in str(error) or "jit" in str(error).lower():
            hint = (
                "; OpenAI's TorchScript .pt files need converting once: "
                "torch.save(torch.jit.load(f).state_dict(), 'weights.pt')"
            )
        raise ValueError(
            f"{weights_file} is not a loadable checkpoint for open_clip model {model!r}: "
            f"{type(error).__name__}: {_first_line(error, 300)}{hint}"
        ) from None
    return network, f"sha256:{file_sha256(weights_file)}"


def load_encoder(
    model: str,
    checkpoint: str | os.PathLike | None = None,
    *,
    pretrained: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    precision: Amp = "auto",
    init_seed: int = 0,
) -> ClipEncoder:
    """Build open_clip architecture ``model`` with weights from a local ``checkpoint`` file or
    an open_clip ``pretrained`` tag (not both).

    Names are open_clip's (``ViT-B-16``, ``ViT-L-14``, ``RN50``, ... or one registered with
    :func:`register_model_config`), or ``hf-hub:org/repo`` (architecture and weights from that
    repo). ``pretrained`` takes what ``open_clip.create_model(model, pretrained=...)`` takes:
    a tag (``"openai"``, ``"laion2b_s34b_b88k"``) or a file path; the weights come from
    open_clip's cache (``cache_dir``, as open_clip's option) and are downloaded only when
    missing, and the tag's preprocessing applies. The encoder records the tag and the
    weights file's sha256. Neither ``checkpoint`` nor ``pretrained``: seeded random weights
    (tests, smoke runs). Text towers from Hugging Face transformers are refused.
    ``precision`` picks fp16 ("auto"), bf16 or fp32 autocast on CUDA; the CPU runs fp32.
    """
    open_clip = import_open_clip()
    cache = None if cache_dir is None else str(cache_dir)
    hub_weights, config = _architecture(open_clip, model, checkpoint, pretrained, cache)
    device = resolve_device(device)
    _autocast_dtype(precision, device)  # reject a bad precision before the slow load
    source, weights_file, tag = _weights_source(open_clip, model, hub_weights, checkpoint,
                                                pretrained, cache)
    network, provenance = _network(open_clip, model, source, weights_file, cache, init_seed)
    try:
        tokenizer = open_clip.get_tokenizer(model, cache_dir=cache)
    except ImportError as error:
        raise MissingExtraError(f"the tokenizer of {model!r} needs {error}") from None
    return ClipEncoder(
        network.to(device),
        tokenizer,
        name=model,
        checkpoint=provenance,
        device=device,
        precision=precision,
        pretrained=tag,
        weights_file=None if weights_file is None else str(Path(weights_file).resolve()),
        architecture=config,
    )
