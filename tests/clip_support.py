"""Tiny open_clip architectures, tiny image sets and a network guard for the CLIP tests."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import torch


def tiny_architecture(*, vision_layers: int = 1, vision_width: int = 32, text_layers: int = 1,
                      text_width: int = 32, embed_dim: int = 16, image_size: int = 32) -> dict:
    """An open_clip architecture small enough to run in milliseconds on a CPU."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                       "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": text_width,
                     "heads": text_width // 16, "layers": text_layers},
    }


def write_architecture(folder: Path, name: str, architecture: dict) -> Path:
    """``folder/<name>.json`` (open_clip names a registered config by its file's stem)."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(architecture))
    return path


def save_random_weights(open_clip, name: str, path: Path, seed: int = 0) -> Path:
    """Seeded random weights of architecture ``name`` as a state_dict file (.pt or
    .safetensors by suffix)."""
    torch.manual_seed(seed)
    state = open_clip.create_model(name).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def colour_image(label: int, index: int, rng: np.random.Generator):
    """A noisy PNG-able image whose colour codes its class (a random encoder still separates
    them a little, so a field has something to learn)."""
    from PIL import Image

    height, width = (40, 36) if index % 2 else (36, 44)
    colour = np.array([60 + 80 * label, 200 - 70 * label, 120], dtype=float)
    pixels = np.clip(colour + rng.normal(0, 40, (height, width, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def write_class_folders(root: Path, classes: list[str], per_class: int, seed: int = 0) -> Path:
    """``root/<class>/<class>_<i>.png``: a class-per-folder image set."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour_image(label, i, rng).save(root / name / f"{name}_{i}.png")
    return root


def write_pets(root: Path, classes: list[str], counts: dict[str, int], seed: int = 0) -> Path:
    """oxford_pets in CoOp's layout (images/ and split_zhou_OxfordPets.json)."""
    rng = np.random.default_rng(seed)
    images = root / "oxford_pets" / "images"
    images.mkdir(parents=True)
    split = {}
    for name, count in counts.items():
        split[name] = []
        for label, cls in enumerate(classes):
            for i in range(count):
                relpath = f"{cls}_{name}_{i}.png"
                colour_image(label, i, rng).save(images / relpath)
                split[name].append([relpath, label, cls])
    (root / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(split))
    return root


def block_network(monkeypatch) -> list[str]:
    """Make every attempt to open a network connection fail, and record it: the returned list
    stays empty when nothing tried. Hugging Face's offline mode is switched on too."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub
    except ImportError:
        return attempts
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return attempts


def hf_cache_file(cache: Path, repo: str, filename: str, data: bytes,
                  revision: str = "0" * 40) -> Path:
    """Place ``filename`` of Hugging Face repo ``repo`` in a hub cache folder as
    huggingface_hub lays it out (refs/main -> snapshots/<revision>/<file>)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    (snapshot / filename).write_bytes(data)
    return snapshot / filename
