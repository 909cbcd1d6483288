"""Reading PEFT checkpoint files: ``torch.load(weights_only=True)`` with inert stand-ins for
the optimizer and scheduler objects Dassl pickles, and the ``state_dict`` of a Dassl container
(CoOp, CoCoOp, CLIP-Adapter) checked key by key."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .source import _LABELS, PeftError, learned, one_line

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
            f"{one_line(detail, 160)}"
        ) from None
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise PeftError(
            f"{path} is not a readable torch checkpoint: {type(error).__name__}: {one_line(error)}"
        ) from None


def _refused_globals(path: Path) -> list[str]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (non-zip) file, or unreadable: fall back to torch's message
        return []
    dropped = set(_DROPPED_CLASSES) | set(_DROPPED_FACTORIES)
    return sorted(name for name in names if name not in dropped)


def dassl_state_dict(payload: Any, path: Path, method: str) -> tuple[dict, dict]:
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
        clean[key] = learned(path, f"state_dict[{key!r}]", value)
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
