"""Training the velocity field: coupling enforcement and noise augmentation (docs/method.md §1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

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
from ..core.reference import DEFAULT_TIME_EPS
from ..ops import dispatch
from ..ops.class_tables import PerRowClasses
from ..solver import routing
from ..solver.routing import BF16_CPU_REFUSAL, op_backend


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


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """"warmup-cosine": linear warm-up over ``warmup_steps`` (step k at (k+1)/W), then cosine
    decay to 0 at ``total_steps``; ``step`` counts from 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / decay_steps)))


def _released_rates(lr: float, warmup_steps: int, total_steps: int) -> list[float]:
    """The released loop's rate at every step: the first step at the full ``lr``; after step k
    (counting from 1) a warm-up sets lr·k/W while k < W; from then on a cosine annealer over
    T = total − W steps scales the current rate by (1 + cos(πj/T)) / (1 + cos(π(j−1)/T)) at
    its j-th step, so the cosine starts from the last warm-up rate, not from ``lr``. The
    products are taken in the annealer's order, so the rates match it to the last bit."""
    cosine_steps = total_steps - warmup_steps
    rates, current, annealed = [lr], lr, 0
    for done in range(1, total_steps):
        if done < warmup_steps:
            current = lr * (float(done) / float(warmup_steps))
        else:
            annealed += 1
            current = (
                (1 + math.cos(math.pi * annealed / cosine_steps))
                / (1 + math.cos(math.pi * (annealed - 1) / cosine_steps))
                * current
            )
        rates.append(current)
    return rates


def learning_rates(schedule: Schedule, lr: float, warmup_steps: int, total_steps: int
                   ) -> list[float]:
    """The learning rate of each of ``total_steps`` optimizer steps under ``schedule``."""
    if check_choice("schedule", schedule, SCHEDULES) == "released":
        return _released_rates(lr, warmup_steps, total_steps)
    return [lr * lr_factor(step, warmup_steps, total_steps) for step in range(total_steps)]


def _check_views(views, labels: torch.Tensor) -> int:
    """``views`` consecutive rows per image (image-major, as the feature cache writes them):
    the row count must divide and every image's rows must share one label."""
    views = check.check_int("views", views, minimum=1)
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
    return views


def _autocast_dtype(amp: Amp, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``: fp16 ("auto") or bf16 on CUDA; on the CPU
    bf16 only when asked and only with BF16 units ("auto" stays fp32 there)."""
    if check_amp("amp", amp) == "fp32":
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
    ran.
    """
    x_all = check.check_matrix("image_features", image_features)
    per_row = isinstance(class_features, PerRowClasses)
    if per_row:
        if class_features.dim != x_all.shape[1]:
            raise ValueError(f"per-row class tables have dim {class_features.dim} but "
                             f"image_features have {x_all.shape[1]}")
        class_features.check_rows(x_all.shape[0])
        z_table, num_classes = class_features, class_features.num_classes
        check.check_same_device(image_features=x_all, labels=check.as_tensor("labels", labels))
    else:
        z_table = check.check_matrix(
            "class_features", class_features, dim=x_all.shape[1], dim_source="image_features"
        )
        num_classes = z_table.shape[0]
        check.check_same_device(image_features=x_all, labels=check.as_tensor("labels", labels),
                                class_features=z_table)
    y_all = check.check_labels("labels", labels, rows=x_all.shape[0], num_classes=num_classes)
    check.check_finite("image_features", x_all)
    check.warn_unless_unit_rows("image_features", x_all)
    if not per_row:
        check.check_finite("class_features", z_table)
        check.warn_unless_unit_rows("class_features", z_table)
    epochs = check.check_int("epochs", epochs, minimum=1)
    batch_size = check.check_int("batch_size", batch_size, minimum=1)
    warmup_epochs = check.check_int("warmup_epochs", warmup_epochs, minimum=0)
    check_choice("schedule", schedule, SCHEDULES)
    views = _check_views(views, y_all)
    lr = check.check_positive_float("lr", lr)
    weight_decay = check.check_positive_float("weight_decay", weight_decay, allow_zero=True)
    gamma = check.check_positive_float("gamma", gamma, allow_zero=True)
    check_choice("noise", noise, NOISE_FORMS)
    check_choice("backend", backend, OP_BACKENDS)
    seed = check.check_int("seed", seed)
    time_eps = check.check_positive_float("time_eps", time_eps)
    if not time_eps < 0.5:
        raise ValueError(f"time_eps must lie in (0, 0.5), got {time_eps}")

    device = check.resolve_device(device)
    dim = x_all.shape[1]
    if model is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VelocityNet(dim, blocks=blocks, width=width)
    elif not isinstance(model, VelocityNet):
        raise TypeError(f"model must be a VelocityNet or None, got {type(model).__name__}")
    elif model.dim != dim:
        raise ValueError(f"image_features have dim {dim} but model expects {model.dim}")
    model = model.to(device).train()

    # Detached: the caller's tensors get no .grad and no graph, whatever their requires_grad.
    x_all = x_all.detach().to(device, torch.float32)
    if not per_row:
        z_table = z_table.detach().to(device, torch.float32)
    y_all = y_all.to(device)
    feature_std = x_all.std(dim=0, unbiased=False) if noise == "endpoint" else None
    autocast_dtype = _autocast_dtype(amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)

    images = x_all.shape[0] // views
    steps_per_epoch = math.ceil(images / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    rates = learning_rates(schedule, lr, warmup_steps, total_steps)
    # The fused AdamW kernel beats the per-tensor loop on CPU for these small nets.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda")
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    # Per-step noise seeds come from a CPU generator: drawing them never syncs with the GPU.
    noise_seeds = torch.Generator().manual_seed(seed)
    pair_options = {
        "gamma": gamma,
        "form": noise,
        "feature_std": feature_std,
        "time_eps": time_eps,
        "backend": op_backend(backend, device),
        "labels_checked": True,  # checked once above: no sync with the device per step
    }

    history: list[float] = []
    taken: list[float] = []
    path = None
    # disable=None: no bar when output is not a terminal (logs, CI), even with progress=True
    bar = tqdm(range(epochs), desc="fit", unit="epoch", disable=None if progress else True,
               leave=False)
    for epoch in bar:
        order = torch.randperm(images, device=device, generator=generator)
        if views > 1:  # one view of every image, drawn afresh each epoch
            order = order * views + torch.randint(
                views, (images,), device=device, generator=generator
            )
        loss_sum = torch.zeros((), device=device)
        for start in range(0, images, batch_size):
            index = order[start : start + batch_size]
            x0, labels_batch = x_all[index], y_all[index]
            t = torch.rand(len(index), device=device, generator=generator)
            step_seed = int(torch.randint(2**31 - 1, (), generator=noise_seeds))
            # The noise is regenerated from the seed inside the loss: it is never stored.
            targets, target_labels = z_table, labels_batch
            if per_row:  # each row's own-class feature, a (rows, D) table indexed by row
                targets = z_table.targets(x0, index, labels_batch)
                target_labels = torch.arange(len(index), device=device)
            pair = dispatch.fused_pair(x0, target_labels, targets, t, seed=step_seed,
                                       **pair_options)
            with torch.autocast(
                device.type,
                dtype=autocast_dtype or torch.float32,
                enabled=autocast_dtype is not None,
            ):
                prediction = model(pair.x_t, pair.t)
            loss, path = dispatch.fused_loss(
                prediction, x0, target_labels, targets, t, seed=step_seed, **pair_options
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            rate = rates[len(taken)]
            for group in optimizer.param_groups:
                group["lr"] = rate
            taken.append(rate)
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(index)
        epoch_loss = float(loss_sum) / images
        if not math.isfinite(epoch_loss):
            raise FloatingPointError(
                f"training loss became {epoch_loss} in epoch {epoch + 1}; lower lr or gamma"
            )
        history.append(epoch_loss)
        bar.set_postfix(loss=f"{epoch_loss:.4f}")
    bar.close()

    config = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs,
        "schedule": schedule,
        "optimizer_steps": len(taken),
        "warmup_steps": warmup_steps,
        "gamma": gamma,
        "noise": noise,
        "seed": seed,
        "time_eps": time_eps,
        "path": path,
        "amp": amp if autocast_dtype is not None else "fp32",
        "rows": int(x_all.shape[0]),
        "views": views,
        "images": images,
        "classes": int(num_classes),
        "per_row_classes": per_row,
    }
    return FitResult(model=model.eval(), config=config, history=history, learning_rates=taken)
