"""Loading released checkpoints, and fma_fast's own safe format (safetensors + JSON, atomic)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .model import VelocityNet

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
OFFICIAL_WEIGHTS_NAME = "model.pth"
FORMAT_TAG = "fma_fast/velocity-net/1"
_UMASK = os.umask(0)
os.umask(_UMASK)
_BLOCK_KEY = re.compile(r"^res_blocks\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not match the network it describes."""


def _architecture_from_state(state: dict[str, torch.Tensor], source: str) -> dict[str, int]:
    for key in ("input_proj.weight", "final_layer.linear.weight"):
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r}; not an FMA velocity network")
    width, dim = state["input_proj.weight"].shape
    block_ids = {int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key))}
    blocks = max(block_ids) + 1 if block_ids else 0
    return {"dim": int(dim), "blocks": blocks, "width": int(width)}


def _build_and_load(state: dict[str, torch.Tensor], config: dict[str, int], source: str):
    model = VelocityNet(config["dim"], config["blocks"], config["width"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match a VelocityNet(dim={config['dim']}, "
            f"blocks={config['blocks']}, width={config['width']}): "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
        if not state[key].is_floating_point():
            raise CheckpointError(f"{source}: {key} has dtype {state[key].dtype}, not floating")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def load_official(path: str | os.PathLike) -> VelocityNet:
    """Load a released FMA run: a folder with model.pth (+ config.json), or a model.pth file.

    Loads with ``weights_only=True`` (no code runs from the file). The block count comes from
    config.json when present and must agree with the keys; otherwise it is inferred from them.
    """
    path = Path(path)
    config_path = None
    if path.is_dir():
        weights_path = path / OFFICIAL_WEIGHTS_NAME
        config_path = path / CONFIG_NAME if (path / CONFIG_NAME).is_file() else None
    else:
        weights_path = path
    if not weights_path.is_file():
        raise CheckpointError(f"no checkpoint file at {weights_path}")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or truncated files
        raise CheckpointError(
            f"{weights_path} is not a readable torch checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights_path} does not hold a state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    config = _architecture_from_state(state, str(weights_path))
    if config_path is not None:
        released = _read_json(config_path)
        blocks = released.get("blocks")
        if blocks is not None and blocks != config["blocks"]:
            raise CheckpointError(
                f"{config_path} says blocks={blocks} but {weights_path} holds "
                f"{config['blocks']} residual blocks"
            )
    return _build_and_load(state, config, str(weights_path))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def atomic_write(path: Path, write) -> None:
    """Write via ``write(temp_path)``, then rename over ``path``: nobody sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(temp))
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save(model, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Save a VelocityNet (or a fit result) to folder ``path``: model.safetensors + config.json.

    Both files are written atomically; the architecture is also stored inside the safetensors
    metadata so that a weights file and a config from different runs are refused on load.
    ``extra`` (JSON-serialisable) is stored in config.json, e.g. training settings or chosen M.
    """
    config_extra = dict(getattr(model, "config_extra", None) or {})
    model = getattr(model, "model", model)
    if not isinstance(model, VelocityNet):
        raise TypeError(f"model must be a VelocityNet or a fit result, got {type(model).__name__}")
    config_extra.update(extra or {})
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path must be a folder, but {path} is a file")
    architecture = model.config
    config = {"format": FORMAT_TAG, **architecture, **config_extra}
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as error:
        raise TypeError(f"extra must be JSON-serialisable: {error}") from None
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    metadata = {"format": FORMAT_TAG, "architecture": json.dumps(architecture, sort_keys=True)}
    atomic_write(path / WEIGHTS_NAME, lambda temp: save_file(state, str(temp), metadata=metadata))
    atomic_write(path / CONFIG_NAME, lambda temp: temp.write_text(config_text + "\n"))
    return path


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a folder written by :func:`save`."""
    return _read_json(Path(path) / CONFIG_NAME)


def load(path: str | os.PathLike, *, device: str | torch.device | None = None) -> VelocityNet:
    """Load a folder written by :func:`save`, refusing weights and configs that do not match."""
    path = Path(path)
    weights_path, config_path = path / WEIGHTS_NAME, path / CONFIG_NAME
    for required in (weights_path, config_path):
        if not required.is_file():
            raise CheckpointError(
                f"{required} is missing; is {path} a folder written by fma_fast.save?"
            )
    config = _read_json(config_path)
    if config.get("format") != FORMAT_TAG:
        raise CheckpointError(
            f"{config_path} has format {config.get('format')!r}, expected {FORMAT_TAG!r}"
        )
    try:
        state = load_file(str(weights_path))
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file: {error}"
        ) from None
    architecture = {key: config.get(key) for key in ("dim", "blocks", "width")}
    try:
        stored = json.loads(metadata.get("architecture", "null"))
    except json.JSONDecodeError:
        stored = None
    if stored != architecture:
        raise CheckpointError(
            f"{config_path} describes {architecture} but {weights_path} was saved for {stored}"
        )
    model = _build_and_load(state, architecture, str(weights_path))
    return model.to(device) if device is not None else model
