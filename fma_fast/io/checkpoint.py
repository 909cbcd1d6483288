"""Loading released checkpoints, and fma_fast's own safe format (safetensors + JSON, atomic)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..core.model import VelocityNet
from ..core.policy import DEFAULT_STEP_SIZE
from ..core.validation import check_dense_float, resolve_device
from .files import JsonError, atomic_write, file_problem, loads_json, read_json, save_safetensors

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
OFFICIAL_WEIGHTS_NAME = "model.pth"
FORMAT_TAG = "fma_fast/velocity-net/2"
LEGACY_FORMAT_TAG = "fma_fast/velocity-net/1"
"""fma_fast 0.1 folders: no save id, so a mixed pair cannot be told from a real one."""
METADATA_KEY = "fma_fast"
RESERVED_KEYS = ("format", "dim", "blocks", "width", "save_id")
"""config.json keys that ``save`` writes itself; ``extra`` may not set them."""
CLASS_TABLE_KEY = "trained_on.class_table"
"""The tensor of model.safetensors that holds the class table the model was trained with
(no VelocityNet key starts with "trained_on")."""
CARRIED = ("steps", "step_size", "normalize")
"""VelocityNet attributes that config.json stores under the same names (and ``trained_on``
under "data")."""
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
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{source}: {key} contains NaN or Inf; a model with non-finite weights gives "
                "the same prediction for every row (was its training unstable?)"
            )
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


def _describe(value: Any) -> str:
    """A value and its type for an error message: '2' (str), [1, 2] (list)."""
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def _readable(path: Path, what: str) -> None:
    problem = file_problem(path)
    if problem:
        raise CheckpointError(f"cannot read {what} {path}: {problem}")


def load_official(path: str | os.PathLike) -> VelocityNet:
    """Load a released FMA run: a folder with model.pth (+ config.json), or a model.pth file.

    Loads with ``weights_only=True`` (no code runs from the file). The block count comes from
    config.json when present and must agree with the keys; otherwise it is inferred from them.

    Args:
        path: the run folder or its model.pth.

    Returns:
        The :class:`~fma_fast.VelocityNet`; a bad file raises :class:`CheckpointError`.
    """
    path = Path(path)
    config_path = None
    if path.is_dir():
        weights_path = path / OFFICIAL_WEIGHTS_NAME
        config_path = path / CONFIG_NAME if (path / CONFIG_NAME).is_file() else None
    else:
        weights_path = path
    _readable(weights_path, "checkpoint")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or truncated files
        raise CheckpointError(
            f"{weights_path} is not a readable torch checkpoint (truncated or corrupt?): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{weights_path} holds {_describe(state)}, not a state_dict of tensors"
        )
    unprefixed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{weights_path}: entry {key!r} holds {_describe(value)}, not a tensor; "
                "not a state_dict of tensors"
            )
        check_dense_float(f"{weights_path}: {key}", value, nonempty=True, error=CheckpointError)
        name = str(key).removeprefix("module.")
        if name in unprefixed:  # 'x' and 'module.x': which one was trained is unknown
            raise CheckpointError(
                f"{weights_path} holds both {name!r} and 'module.{name}'; keep one"
            )
        unprefixed[name] = value
    state = unprefixed
    config = _architecture_from_state(state, str(weights_path))
    if config_path is not None:
        released = _read_json(config_path)
        blocks = released.get("blocks")
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int)):
            raise CheckpointError(
                f"{config_path}: blocks must be an integer, got {_describe(blocks)}"
            )
        if blocks is not None and blocks != config["blocks"]:
            raise CheckpointError(
                f"{config_path} says blocks={blocks} but {weights_path} holds "
                f"{config['blocks']} residual blocks"
            )
    return _build_and_load(state, config, str(weights_path))


def _read_json(path: Path) -> dict[str, Any]:
    _readable(path, "config")
    try:
        value = read_json(path, "config")
    except JsonError as error:
        raise CheckpointError(str(error)) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _check_known_keys(config: dict[str, Any], source: str) -> None:
    """The keys the solver and the CLI read back (``steps``, ``step_size``, ``class_names``)
    must have usable values; the same check runs on save and on load."""
    steps = config.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"{source}: steps must be an int >= 0, got {_describe(steps)}")
    step_size = config.get("step_size")
    if step_size is not None and (
        isinstance(step_size, bool)
        or not isinstance(step_size, (int, float))
        or not math.isfinite(step_size)
        or step_size <= 0
    ):
        raise ValueError(
            f"{source}: step_size must be a finite number > 0, got {_describe(step_size)}"
        )
    names = config.get("class_names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    ):
        raise ValueError(f"{source}: class_names must be a list of strings")
    normalize = config.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise ValueError(f"{source}: normalize must be true or false, got {_describe(normalize)}")
    data = config.get("data")
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{source}: data must be a JSON object, got {_describe(data)}")


def state_digest(state: dict[str, torch.Tensor], text: str) -> str:
    """sha256 of CPU tensors by sorted name, then ``text`` (a config): what a network's
    outputs depend on."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy())
    digest.update(text.encode())
    return digest.hexdigest()


def _save_id(state: dict[str, torch.Tensor], config_text: str) -> str:
    """Identifies one save: a digest of its weights and its config (so identical runs write
    identical files, and any two different saves get different ids)."""
    return state_digest(state, config_text)[:32]


def _class_table(data: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
    """A data record without its class table values, and those values (None if absent)."""
    if "class_table" not in data:
        return data, None
    data = dict(data)
    table = data.pop("class_table")
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or not table.is_floating_point():
        raise TypeError("data['class_table'] must be a 2-D floating tensor (the class table)")
    return data, table.detach().to("cpu", torch.float32).contiguous()


def save(model, path: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Save a VelocityNet (or a fit result) to folder ``path``: model.safetensors + config.json.

    Both files are written atomically and carry the same save id, so a weights file and a
    config from different saves (or from a save killed between its two renames) are refused
    on load. config.json holds what the model carries (``steps``, ``step_size``, ``normalize``,
    ``trained_on`` as "data"), then ``extra`` (JSON; it wins), e.g. the chosen ``steps``;
    ``step_size`` is recorded in any case (default 0.1, the solver's). A data record's
    ``class_table`` values (:func:`fma_fast.io.features.data_record`) go into the weights file.
    ``extra`` may not set the keys ``save`` writes itself (:data:`RESERVED_KEYS`), and
    ``steps``, ``step_size``, ``normalize`` and ``class_names`` are checked as ``load`` checks
    them.

    Args:
        model: a :class:`~fma_fast.VelocityNet` or a :class:`~fma_fast.FitResult`.
        path: the folder (created with its parents).
        extra: more config.json entries, e.g. ``{"steps": M}``.

    Returns:
        The folder's path.
    """
    config_extra = dict(getattr(model, "config_extra", None) or {})
    model = getattr(model, "model", model)
    if not isinstance(model, VelocityNet):
        raise TypeError(f"model must be a VelocityNet or a fit result, got {type(model).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    extra = extra or {}
    for key in extra:
        if not isinstance(key, str):
            raise TypeError(f"extra keys must be strings, got {_describe(key)}")
        if key in RESERVED_KEYS:
            raise ValueError(
                f"extra may not set {key!r}: save writes it itself ({', '.join(RESERVED_KEYS)})"
            )
    carried = {key: getattr(model, key, None) for key in CARRIED}
    carried["data"] = getattr(model, "trained_on", None)
    config_extra = {**{k: v for k, v in carried.items() if v is not None}, **config_extra,
                    **extra}
    config_extra.setdefault("step_size", DEFAULT_STEP_SIZE)
    table = None
    if isinstance(config_extra.get("data"), dict):
        config_extra["data"], table = _class_table(config_extra["data"])
    _check_known_keys(config_extra, "extra")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path must be a folder, but {path} is a file")
    check_model_folder(path)
    architecture = model.config
    config = {"format": FORMAT_TAG, **architecture, **config_extra}
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"extra must be JSON-serialisable (no NaN/Inf): {error}") from None
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
    }
    if table is not None:
        state[CLASS_TABLE_KEY] = table
    save_id = _save_id(state, config_text)
    config_text = json.dumps({**config, "save_id": save_id}, indent=2, sort_keys=True)
    stamp = {"format": FORMAT_TAG, "architecture": architecture, "save_id": save_id}
    metadata = {METADATA_KEY: json.dumps(stamp, sort_keys=True)}
    save_safetensors(path / WEIGHTS_NAME, state, metadata)
    atomic_write(path / CONFIG_NAME, lambda temp: temp.write_text(config_text + "\n"))
    return path


def _is_model_config(path: Path) -> bool:
    try:
        value = read_json(path, "config")
    except JsonError:
        return False
    return isinstance(value, dict) and value.get("format") in (FORMAT_TAG, LEGACY_FORMAT_TAG)


def _is_model_weights(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return False
    return METADATA_KEY in metadata or metadata.get("format") == LEGACY_FORMAT_TAG


def check_model_folder(path: str | os.PathLike, name: str = "path") -> Path:
    """A folder ``save`` may write into: the files it would replace, if there, must be an
    earlier fma_fast model (a released run's config.json, say, is never overwritten)."""
    path = Path(path)
    for file_name, is_ours in ((WEIGHTS_NAME, _is_model_weights), (CONFIG_NAME, _is_model_config)):
        target = path / file_name
        if target.exists() and not (target.is_file() and is_ours(target)):
            raise ValueError(
                f"{name} {path}: {file_name} there is not an fma_fast model file; "
                "refusing to overwrite it (choose another folder)"
            )
    return path


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a folder written by :func:`save` (its known keys checked).

    Args:
        path: a folder written by :func:`save`.

    Returns:
        The config as a dict; a bad file raises :class:`CheckpointError`.
    """
    config_path = Path(path) / CONFIG_NAME
    config = _read_json(config_path)
    try:
        _check_known_keys(config, str(config_path))
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return config


def _written(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime).isoformat(sep=" ", timespec="seconds")


def _mixed_pair(weights_path: Path, config_path: Path, weights_id, config_id) -> CheckpointError:
    newer, older = (
        (weights_path, config_path)
        if weights_path.stat().st_mtime >= config_path.stat().st_mtime
        else (config_path, weights_path)
    )
    return CheckpointError(
        f"{weights_path.name} and {config_path.name} in {weights_path.parent} come from "
        f"different saves (save ids {weights_id} and {config_id}); {newer.name} is newer "
        f"(written {_written(newer)}, {older.name} {_written(older)}): a save was interrupted "
        "or files were mixed; save the model again"
    )


def load(path: str | os.PathLike, *, device: str | torch.device | None = None) -> VelocityNet:
    """Load a folder written by :func:`save`, refusing weights and configs that do not match.

    The network carries what the folder says it is used with: ``steps`` (M chosen on val),
    ``step_size``, ``normalize`` and ``trained_on`` (the data record, with the class table
    values when saved), so ``solve(x, fma_fast.load(folder))`` solves as ``eval`` does.

    Args:
        path: a folder written by :func:`save`.
        device: where to move the network (None: it stays on the CPU).

    Returns:
        The :class:`~fma_fast.VelocityNet`; a bad folder raises :class:`CheckpointError`.
    """
    path = Path(path)
    weights_path, config_path = path / WEIGHTS_NAME, path / CONFIG_NAME
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file; a model is a folder written by fma_fast.save")
    for required in (weights_path, config_path):
        if not required.exists():
            raise CheckpointError(
                f"{required} is missing; is {path} a folder written by fma_fast.save?"
            )
    config = load_config(path)
    tag = config.get("format")
    if tag not in (FORMAT_TAG, LEGACY_FORMAT_TAG):
        raise CheckpointError(f"{config_path} has format {tag!r}, expected {FORMAT_TAG!r}")
    _readable(weights_path, "weights")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a handle is not iterable)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file: {error}"
        ) from None
    architecture = {key: config.get(key) for key in ("dim", "blocks", "width")}
    stored = _weights_stamp(metadata, weights_path)
    if tag == LEGACY_FORMAT_TAG:
        warnings.warn(
            f"{path} was saved by fma_fast 0.1, whose files carry no save id: a weights file "
            "and a config from different saves cannot be told apart; save it again",
            stacklevel=2,
        )
    elif stored.get("save_id") != config.get("save_id"):
        raise _mixed_pair(weights_path, config_path, stored.get("save_id"), config.get("save_id"))
    if stored.get("architecture") != architecture:
        raise CheckpointError(
            f"{config_path} describes {architecture} but {weights_path} was saved for "
            f"{stored.get('architecture')}"
        )
    table = state.pop(CLASS_TABLE_KEY, None)
    model = _build_and_load(state, architecture, str(weights_path))
    for key in CARRIED:
        setattr(model, key, config.get(key))
    data = config.get("data")
    if isinstance(data, dict):
        model.trained_on = dict(data) if table is None else {**data, "class_table": table.float()}
    return model if device is None else model.to(resolve_device(device))


def _weights_stamp(metadata: dict[str, str], path: Path) -> dict[str, Any]:
    """What a weights file says of itself: this format's one metadata key, or 0.1's two."""
    try:
        if METADATA_KEY in metadata:
            stamp = loads_json(metadata[METADATA_KEY], f"{path}'s stamp")
            return stamp if isinstance(stamp, dict) else {}
        return {"architecture": loads_json(metadata.get("architecture", "null"),
                                           f"{path}'s architecture")}
    except JsonError as error:
        raise CheckpointError(str(error)) from None
