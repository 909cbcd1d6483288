"""Training the velocity field: coupling enforcement and noise augmentation (docs/method.md §1)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core import environment
from ..core import validation as check
from ..core.model import VelocityNet
from ..core.names import (
    NOISE_FORMS,
    OP_BACKENDS,
    SCHEDULES,
    Amp,
    NoiseForm,
    OpBackend,
    Schedule,
    check_amp,
    check_choice,
)
from ..core.progress import progress as progress_bar
from ..core.reference import DEFAULT_TIME_EPS
from ..ops import dispatch
from ..ops.class_tables import PerRowClasses
from ..solver import routing
from ..solver.routing import BF16_CPU_REFUSAL, op_backend
from .schedules import learning_rates


@dataclass
class FitResult:
    """The trained ``model``, the settings it was trained with, the mean loss per epoch and the
    learning rate of every optimizer step (what the schedule gave, in order)."""

    model: VelocityNet
    config: dict[str, Any]
    history: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)

    @property
    def config_extra(self) -> dict[str, Any]:
        """What :func:`fma_fast.save` stores beside the architecture."""
        return {"training": self.config}


@dataclass(frozen=True)
class FitSettings:
    """How :func:`fit` trains (its keyword arguments but ``model`` and ``device``), checked
    once when built: an error names the argument and what was expected. ``amp="off"`` is read
    as "fp32" (:data:`~fma_fast.core.names.AMP_ALIASES`)."""

    blocks: int = 12
    width: int | None = None
    epochs: int = 200
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    schedule: Schedule = "released"
    views: int = 1
    gamma: float = 0.0
    noise: NoiseForm = "bridge"
    seed: int = 1
    amp: Amp = "auto"
    time_eps: float = DEFAULT_TIME_EPS
    backend: OpBackend = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        checked = {
            "epochs": check.check_int("epochs", self.epochs, minimum=1),
            "batch_size": check.check_int("batch_size", self.batch_size, minimum=1),
            "warmup_epochs": check.check_int("warmup_epochs", self.warmup_epochs, minimum=0),
            "schedule": check_choice("schedule", self.schedule, SCHEDULES),
            "views": check.check_int("views", self.views, minimum=1),
            "lr": check.check_positive_float("lr", self.lr),
            "weight_decay": check.check_positive_float("weight_decay", self.weight_decay,
                                                       allow_zero=True),
            "gamma": check.check_positive_float("gamma", self.gamma, allow_zero=True),
            "noise": check_choice("noise", self.noise, NOISE_FORMS),
            "backend": check_choice("backend", self.backend, OP_BACKENDS),
            "seed": check.check_int("seed", self.seed),
            "time_eps": check.check_positive_float("time_eps", self.time_eps),
            "amp": check_amp("amp", self.amp),
        }
        if not checked["time_eps"] < 0.5:
            raise ValueError(f"time_eps must lie in (0, 0.5), got {checked['time_eps']}")
        for name, value in checked.items():
            object.__setattr__(self, name, value)


def _check_views(views: int, labels: torch.Tensor) -> None:
    """``views`` consecutive rows per image (image-major, as the feature cache writes them):
    the row count must divide and every image's rows must share one label."""
    rows = labels.shape[0]
    if rows % views:
        raise ValueError(
            f"views={views} needs the rows to come in groups of {views} (one image's views, "
            f"image-major), but there are {rows} rows"
        )
    if views > 1:
        grouped = labels.reshape(-1, views)
        mixed = (grouped != grouped[:, :1]).any(dim=1)
        if bool(mixed.any()):
            image = int(mixed.nonzero()[0, 0])
            raise ValueError(
                f"views={views}: rows {image * views}..{image * views + views - 1} (image "
                f"{image}) carry different labels; the rows must be image-major, {views} views "
                "of one image after another"
            )


def _autocast_dtype(amp: Amp, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``: fp16 ("auto") or bf16 on CUDA; on the CPU
    bf16 only when asked and only with BF16 units ("auto" stays fp32 there)."""
    if amp == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if amp == "fp16":
        raise ValueError("amp='fp16' needs a CUDA device (CPUs have no fast fp16 GEMM); use "
                         "'bf16' or 'fp32'")
    if amp == "bf16":
        if device.type != "cpu" or not routing.cpu_bf16_units():
            raise ValueError(f"amp='bf16' {BF16_CPU_REFUSAL}; none in effect here (ISA "
                             f"{environment.cpu_isa()})")
        return torch.bfloat16
    return None



@dataclass
class _Data:
    """A fit's training rows on the compute device: features, labels, the class table (or
    per-row tables) and how the rows group into images."""

    x: torch.Tensor
    y: torch.Tensor
    table: torch.Tensor | PerRowClasses
    num_classes: int
    views: int = 1

    @property
    def per_row(self) -> bool:
        return isinstance(self.table, PerRowClasses)

    @property
    def images(self) -> int:
        return self.x.shape[0] // self.views


def _checked_data(image_features, labels, class_features) -> _Data:
    """The arguments checked (shapes, devices, labels, finite values; a warning for rows that
    are not unit-norm), as given: not yet moved or detached."""
    x = check.check_matrix("image_features", image_features)
    if isinstance(class_features, PerRowClasses):
        if class_features.dim != x.shape[1]:
            raise ValueError(f"per-row class tables have dim {class_features.dim} but "
                             f"image_features have {x.shape[1]}")
        class_features.check_rows(x.shape[0])
        table, num_classes = class_features, class_features.num_classes
        check.check_same_device(image_features=x, labels=check.as_tensor("labels", labels))
    else:
        table = check.check_matrix(
            "class_features", class_features, dim=x.shape[1], dim_source="image_features"
        )
        num_classes = table.shape[0]
        check.check_same_device(image_features=x, labels=check.as_tensor("labels", labels),
                                class_features=table)
    y = check.check_labels("labels", labels, rows=x.shape[0], num_classes=num_classes)
    check.check_finite("image_features", x)
    check.warn_unless_unit_rows("image_features", x)
    if not isinstance(table, PerRowClasses):
        check.check_finite("class_features", table)
        check.warn_unless_unit_rows("class_features", table)
    return _Data(x, y, table, int(num_classes))


def _model(model: VelocityNet | None, dim: int, settings: FitSettings,
           device: torch.device) -> VelocityNet:
    """The network to train on ``device``: ``model``, or a new one initialised from the seed
    (without touching the global random state)."""
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model = VelocityNet(dim, blocks=settings.blocks, width=settings.width)
    elif not isinstance(model, VelocityNet):
        raise TypeError(f"model must be a VelocityNet or None, got {type(model).__name__}")
    elif model.dim != dim:
        raise ValueError(f"image_features have dim {dim} but model expects {model.dim}")
    return model.to(device).train()


class _Loop:
    """One fit's training loop: AdamW at the schedule's rate of every step, the pair and the
    loss through :mod:`~fma_fast.ops.dispatch` (noise regenerated from a per-step seed, never
    stored), random streams from the seed."""

    def __init__(self, model: VelocityNet, data: _Data, settings: FitSettings,
                 device: torch.device):
        self.model, self.data, self.settings, self.device = model, data, settings, device
        self.autocast = _autocast_dtype(settings.amp, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast == torch.float16)
        steps_per_epoch = math.ceil(data.images / settings.batch_size)
        self.warmup_steps = settings.warmup_epochs * steps_per_epoch
        self.rates = learning_rates(settings.schedule, settings.lr, self.warmup_steps,
                                    settings.epochs * steps_per_epoch)
        # The fused AdamW kernel beats the per-tensor loop on CPU for these small nets.
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
            fused=device.type in ("cpu", "cuda"),
        )
        self.generator = torch.Generator(device=device).manual_seed(settings.seed)
        # Per-step noise seeds come from a CPU generator: drawing them never syncs with the GPU.
        self.noise_seeds = torch.Generator().manual_seed(settings.seed)
        feature_std = (data.x.std(dim=0, unbiased=False) if settings.noise == "endpoint"
                       else None)
        self.pair_options = {
            "gamma": settings.gamma,
            "form": settings.noise,
            "feature_std": feature_std,
            "time_eps": settings.time_eps,
            "backend": op_backend(settings.backend, device),
            "labels_checked": True,  # checked once in fit: no sync with the device per step
        }
        self.taken: list[float] = []
        self.path: str | None = None

    def _batches(self) -> Iterator[torch.Tensor]:
        """The row indices of each step of one epoch: one view of every image, drawn afresh."""
        data, device = self.data, self.device
        order = torch.randperm(data.images, device=device, generator=self.generator)
        if data.views > 1:
            order = order * data.views + torch.randint(
                data.views, (data.images,), device=device, generator=self.generator
            )
        for start in range(0, data.images, self.settings.batch_size):
            yield order[start : start + self.settings.batch_size]

    def _step(self, index: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the rows ``index``; returns the batch's loss (detached)."""
        x0, labels = self.data.x[index], self.data.y[index]
        t = torch.rand(len(index), device=self.device, generator=self.generator)
        step_seed = int(torch.randint(2**31 - 1, (), generator=self.noise_seeds))
        targets, target_labels = self.data.table, labels
        if self.data.per_row:  # each row's own-class feature, a (rows, D) table indexed by row
            targets = self.data.table.targets(x0, index, labels)
            target_labels = torch.arange(len(index), device=self.device)
        pair = dispatch.fused_pair(x0, target_labels, targets, t, seed=step_seed,
                                   **self.pair_options)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                            enabled=self.autocast is not None):
            prediction = self.model(pair.x_t, pair.t)
        loss, self.path = dispatch.fused_loss(
            prediction, x0, target_labels, targets, t, seed=step_seed, **self.pair_options
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        rate = self.rates[len(self.taken)]
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.taken.append(rate)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def epoch(self, number: int) -> float:
        """One pass over the images; the mean loss per image (refused when not finite)."""
        loss_sum = torch.zeros((), device=self.device)
        for index in self._batches():
            loss_sum += self._step(index) * len(index)
        epoch_loss = float(loss_sum) / self.data.images
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(
                f"training loss became {epoch_loss} in epoch {number + 1}; lower lr or gamma"
            )
        return epoch_loss

    def config(self) -> dict[str, Any]:
        """What ``FitResult.config`` records: the settings and what the loop ran."""
        settings, data = self.settings, self.data
        return {
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "warmup_epochs": settings.warmup_epochs,
            "schedule": settings.schedule,
            "optimizer_steps": len(self.taken),
            "warmup_steps": self.warmup_steps,
            "gamma": settings.gamma,
            "noise": settings.noise,
            "seed": settings.seed,
            "time_eps": settings.time_eps,
            "path": self.path,
            "amp": settings.amp if self.autocast is not None else "fp32",
            "rows": int(data.x.shape[0]),
            "views": data.views,
            "images": data.images,
            "classes": data.num_classes,
            "per_row_classes": data.per_row,
        }


def fit(
    image_features,
    labels,
    class_features,
    *,
    model: VelocityNet | None = None,
    blocks: int = 12,
    width: int | None = None,
    epochs: int = 200,
    batch_size: int = 32,
    lr: float = 2e-4,
    weight_decay: float = 0.01,
    warmup_epochs: int = 1,
    schedule: Schedule = "released",
    views: int = 1,
    gamma: float = 0.0,
    noise: NoiseForm = "bridge",
    seed: int = 1,
    device: str | torch.device | None = None,
    amp: Amp = "auto",
    time_eps: float = DEFAULT_TIME_EPS,
    backend: OpBackend = "auto",
    progress: bool = True,
) -> FitResult:
    """Train a velocity field that carries each image feature to its own class text feature.

    ``class_features``: a (C, D) table, or :class:`~fma_fast.PerRowClasses` (CoCoOp: every
    row has its own table; each batch gathers the rows' own classes only).
    Every row is paired with its ground-truth class text only (coupling enforcement); t ~ U(0,1)
    per row; ``gamma`` sets the noise of the ``noise`` form ("bridge": the released code's
    Brownian bridge, "endpoint": the paper's, σ = γ·per-dimension std of ``image_features``).
    AdamW; ``schedule`` "released" gives the released loop's learning rate at every step
    (full rate first, warm-up, then a cosine chained from the last warm-up rate), and
    "warmup-cosine" a linear warm-up then a cosine from ``lr``
    (:data:`~fma_fast.core.names.SCHEDULES`). ``views``: the rows are image-major groups of
    ``views`` augmented views of one image (the feature cache's layout); an epoch is one pass
    over the images, each seen through one of its views drawn at random, so the optimizer steps
    do not grow with ``views``. ``amp`` picks fp16 ("auto"), bf16 or no autocast ("fp32"; "off"
    is read so) on CUDA; on the CPU "bf16" autocasts where the CPU has BF16 units ("auto" stays
    fp32 there, "fp16" is refused). Reproducible from ``seed``.
    ``backend``: "auto" builds the pair and the loss in the fused Triton kernels on CUDA and in
    PyTorch elsewhere; "reference" forces PyTorch; "triton" forces the kernels (on CPU tensors
    through the slow interpreter, TRITON_INTERPRET=1, for tests). ``config["path"]`` says which
    ran. The settings are checked as a :class:`FitSettings`.

    Args:
        image_features: (N, D) training rows (``views`` rows per image, image-major).
        labels: (N,) class index of every row.
        class_features: (C, D) class text table, or :class:`~fma_fast.PerRowClasses`.
        model: a network to continue training; None builds ``VelocityNet(D, blocks, width)``.
        epochs, batch_size, lr, weight_decay, warmup_epochs, schedule: the AdamW loop.
        gamma, noise, time_eps: the noise around the path and the clamp of t.
        seed, device, amp, backend, progress: as above.

    Returns:
        A :class:`FitResult`: ``.model``, ``.config`` (settings, optimizer steps, path),
        ``.history`` (mean loss per epoch) and ``.learning_rates`` (every step's rate).
    """
    data = _checked_data(image_features, labels, class_features)
    settings = FitSettings(
        blocks=blocks, width=width, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, schedule=schedule, views=views,
        gamma=gamma, noise=noise, seed=seed, amp=amp, time_eps=time_eps, backend=backend,
        progress=progress,
    )
    _check_views(settings.views, data.y)
    device = check.resolve_device(device)
    model = _model(model, data.x.shape[1], settings, device)
    # Detached: the caller's tensors get no .grad and no graph, whatever their requires_grad.
    data.x = data.x.detach().to(device, torch.float32)
    if not data.per_row:
        data.table = data.table.detach().to(device, torch.float32)
    data.y, data.views = data.y.to(device), settings.views
    loop = _Loop(model, data, settings, device)
    history: list[float] = []
    bar = progress_bar(range(settings.epochs), desc="fit", unit="epoch",
                       enabled=settings.progress)
    for epoch in bar:
        history.append(loop.epoch(epoch))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    bar.close()
    return FitResult(model=model.eval(), config=loop.config(), history=history,
                     learning_rates=loop.taken)
