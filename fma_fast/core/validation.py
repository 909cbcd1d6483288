"""Argument checks shared by the public API: each error names the argument and what was expected."""

from __future__ import annotations

import numbers
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .policy import UNIT_NORM_TOLERANCE

_INTERNAL_MODULES = ("fma_fast", "torch", "contextlib")
"""Frames skipped when a warning is attributed to the caller's line."""


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """Warn at the first frame outside fma_fast (and the torch decorators around it), so the
    warning points at the user's line whichever public function was called."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_INTERNAL_MODULES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def as_tensor(name: str, value) -> torch.Tensor:
    """Accept a tensor or a numpy array (memory-mapped arrays stay on disk until chunked)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.flags.writeable:
            return torch.from_numpy(value)
        # A read-only array (a memmap opened with mode "r"): fma_fast never writes its inputs,
        # so torch's warning that writing through the tensor would be undefined does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(value)
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The floating dtypes inputs and weights may have. float8 and the other narrow formats are
floating too, but most ops (``torch.isfinite`` among them) are not implemented for them."""


def _float_dtype_problem(name: str, value: torch.Tensor) -> str | None:
    if value.dtype in FLOAT_DTYPES:
        return None
    if not value.is_floating_point():
        return f"{name} has dtype {value.dtype}; expected a floating dtype"
    return (f"{name} has dtype {value.dtype}; expected float16, bfloat16, float32 or float64 "
            "(convert it first, e.g. tensor.float())")


def check_matrix(
    name: str,
    value,
    *,
    dim: int | None = None,
    dim_source: str = "the model",
    allow_empty: bool = False,
) -> torch.Tensor:
    """A finite, floating (rows, dim) matrix."""
    x = as_tensor(name, value)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if _float_dtype_problem(name, x):
        raise TypeError(_float_dtype_problem(name, x))
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: it has 0 rows")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has 0 columns")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"{name} has dim {x.shape[1]} but {dim_source} expects {dim} (shape {tuple(x.shape)})"
        )
    return x


def check_dense_float(
    name: str,
    value,
    *,
    finite: bool = False,
    nonempty: bool = False,
    error: type[Exception] = ValueError,
) -> torch.Tensor:
    """``value`` if it is a dense (strided) tensor of a real floating dtype that holds data,
    free of NaN/Inf with ``finite`` and with at least one element with ``nonempty``; else
    ``error`` naming it. What weights files and class tables must hold: a meta tensor has a
    shape but no data (files are read with map_location="cpu", so every other tensor of
    theirs is on the CPU), and sparse, nested, quantized, integer, complex or float8 ones are
    read wrongly or fail deep inside a computation (a cast to float drops an imaginary part;
    ``torch.isfinite`` is not implemented for float8): see :data:`FLOAT_DTYPES`."""
    if not isinstance(value, torch.Tensor):
        raise error(f"{name} is a {type(value).__name__}, not a tensor")
    if value.is_quantized:
        raise error(f"{name} is a quantized tensor ({value.dtype}); expected it dequantized "
                    "(tensor.dequantize())")
    if value.is_meta:
        raise error(f"{name} is a meta tensor: it has a shape but holds no data")
    if value.is_nested:
        raise error(f"{name} is a nested tensor; expected a dense tensor")
    if value.layout != torch.strided:
        layout = str(value.layout).removeprefix("torch.")
        raise error(f"{name} has layout {layout}; expected a dense tensor (tensor.to_dense())")
    if value.is_complex():
        raise error(f"{name} has complex dtype {value.dtype}; expected real floating values "
                    "(a cast would drop the imaginary part)")
    if _float_dtype_problem(name, value):
        raise error(_float_dtype_problem(name, value))
    if nonempty and value.numel() == 0:
        raise error(f"{name} is empty (shape {list(value.shape)})")
    if finite and value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise error(f"{name} contains NaN or Inf ({bad} of {value.numel()} values)")
    return value


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise on NaN/Inf naming the first bad row (one pass; call per chunk when streaming)."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return  # NaN/Inf propagate into the sum: no (rows, dim) temporary for clean inputs
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad_row = int((~finite).reshape(x.shape[0], -1).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or Inf (first at row {bad_row})")


def normalized_outputs(name: str, features: torch.Tensor, *,
                       error: type[Exception] = ValueError) -> torch.Tensor:
    """An encoder's output rows (rows, D) L2-normalised in fp32, refused (``error`` naming
    ``name`` and the row) when a row holds NaN/Inf or its norm is zero or overflows fp32:
    ``F.normalize`` would turn those into zero or NaN rows, which every later step takes for
    data (extreme weights, e.g. a PEFT file scaled by 1e30, gave all-zero features)."""
    x = features.float()
    norms = torch.linalg.vector_norm(x, dim=-1)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        why = ("holds NaN or Inf" if not bool(torch.isfinite(x[row]).all())
               else "has norm 0" if float(norms[row]) == 0 else "has a norm beyond float32")
        raise error(f"{name}: row {row} {why} ({int(bad.sum())} of {x.shape[0]} rows); "
                    "the encoder's weights (or the PEFT weights applied to it) are broken or "
                    "extreme")
    return F.normalize(x, dim=-1)


class NotUnitNormWarning(UserWarning):
    """Feature rows that are not L2-normalised: FMA's lines run between unit image and text
    features (every released extractor normalises), so raw rows give other answers."""


class UnitNormWatch:
    """Tracks the row norm furthest from 1 over the batches of one argument and warns once,
    naming the argument, the worst norm and its row (docs/method.md §7)."""

    def __init__(self, name: str):
        self.name = name
        self.worst: tuple[float, float, int] | None = None  # (|norm - 1|, norm, row)

    def update(self, rows: torch.Tensor, start: int = 0) -> None:
        if rows.numel() == 0:
            return
        norms = torch.linalg.vector_norm(rows.detach(), dim=-1, dtype=torch.float32)
        deviation = (norms - 1).abs()
        row = int(deviation.argmax())
        found = (float(deviation[row]), float(norms[row]), start + row)
        if self.worst is None or found[0] > self.worst[0]:
            self.worst = found

    def warn(self) -> None:
        if self.worst is None or not self.worst[0] > UNIT_NORM_TOLERANCE:
            return
        _, norm, row = self.worst
        warn_at_caller(
            f"{self.name} rows are not unit-norm (worst norm {norm:.4g} at row {row}; "
            f"|norm - 1| > {UNIT_NORM_TOLERANCE:g}): CLIP features are L2-normalised before "
            "FMA (torch.nn.functional.normalize(x, dim=-1)); raw rows give other answers",
            NotUnitNormWarning,
        )


def warn_unless_unit_rows(name: str, x: torch.Tensor) -> None:
    """One :class:`NotUnitNormWarning` when a row of ``x`` is not unit-norm."""
    watch = UnitNormWatch(name)
    watch.update(x)
    watch.warn()


LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
"""The dtypes labels may have, in memory and in every file (eval's and score's): signed
integers and uint8. Wider unsigned dtypes are refused (torch lacks min/max for them)."""


def check_labels(name: str, value, *, rows: int, num_classes: int) -> torch.Tensor:
    """Integer class indices of length ``rows`` in [0, num_classes)."""
    labels = as_tensor(name, value)
    if labels.dtype not in LABEL_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in LABEL_DTYPES)
        raise TypeError(
            f"{name} must be an integer tensor of class indices ({allowed}), got dtype "
            f"{labels.dtype}"
        )
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D (rows,), got shape {tuple(labels.shape)}")
    if labels.shape[0] != rows:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the features have {rows} rows")
    if rows and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) for {num_classes} classes, "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels.long()


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on the same device: {listing}")
    return next(iter(devices.values()))


def check_int(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def resolve_device(device, *, default: torch.device | None = None) -> torch.device:
    """``device`` as a torch.device that exists here; None gives ``default`` (or CUDA when
    present, else the CPU). Unknown or unavailable devices raise ValueError naming them."""
    if device is None:
        if default is not None:
            return default
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}"
        ) from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA GPU is available here")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(
                f"device {device!r}: there are {count} CUDA GPU(s) here (cuda:0..cuda:{count - 1})"
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here")
    elif resolved.type != "cpu":
        raise ValueError(f"device {device!r}: fma_fast runs on 'cpu', 'cuda' or 'mps'")
    return resolved
