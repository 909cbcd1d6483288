"""Few-shot baselines on frozen features, and FMA as a classifier that plugs in after them.

Every method has the same shape: ``fit(features, labels, class_features, val_features,
val_labels)`` on a K-shot train split, hyper-parameters chosen on the val split from a small grid
(highest val accuracy, then lowest val cross-entropy, then the first in grid order), then
``logits`` / ``predict`` / ``accuracy`` on new rows. Image and class features are L2-normalised
on the way in, as CLIP's are. Methods written from their published descriptions:
linear probe (Radford et al. 2021), CLIP-Adapter (Gao et al. 2021), Tip-Adapter and Tip-Adapter-F
(Zhang et al. 2022). Full-batch training (K-shot splits are small) keeps them deterministic;
only the random initialisations draw from ``seed``.

Where FMA applies: FMA transports *image features*, so it stacks after any method that outputs
features (zero-shot CLIP: :class:`FMA`; CLIP-Adapter: ``Pipeline(ClipAdapter(), FMA())``). The
linear probe and Tip-Adapter output *logits*, which FMA cannot move; there the only honest
combination is the reverse order, ``Pipeline(FMA(), LinearProbe())``: the method trained and
scored on FMA-transported features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import validation as check
from ..core.policy import DEFAULT_STEP_SIZE, LOGIT_SCALE, best_on_val
from ..solver.api import StepSelection, solve
from ..train.fit import FitResult, fit
from .adaptive import TrajectoryStats, trajectory_stats

Array = torch.Tensor | np.ndarray
Selection = tuple[float, float]
TIP_ALPHAS = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
TIP_BETAS = (1.0, 2.0, 4.0, 7.0, 12.0, 20.0, 30.0)
"""Tip-Adapter's search grids: wide, since the cache term adds up K shots per class against
zero-shot logits whose class gaps are a few units at logit scale 100."""


def _prepare(
    features, labels, class_features
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Checked fp32 CPU copies: unit-norm features, int64 labels (or None), unit-norm classes."""
    x = check.check_matrix("features", features)
    check.check_finite("features", x)
    z = check.check_matrix("class_features", class_features, dim=x.shape[1], dim_source="features")
    check.check_finite("class_features", z)
    y = None
    if labels is not None:
        y = check.check_labels("labels", labels, rows=x.shape[0], num_classes=z.shape[0]).cpu()
    return F.normalize(x.float().cpu(), dim=-1), y, F.normalize(z.float().cpu(), dim=-1)


def _check_grid(name: str, grid: Sequence[float], *, allow_zero: bool = False) -> tuple[float, ...]:
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of numbers, got {grid!r}")
    return tuple(
        check.check_positive_float(f"{name}[{i}]", v, allow_zero=allow_zero)
        for i, v in enumerate(grid)
    )


def val_score(logits: torch.Tensor, labels: torch.Tensor) -> Selection:
    """The selection key: (accuracy, -cross-entropy); larger is better, accuracy first."""
    accuracy = float((logits.argmax(dim=-1) == labels).double().mean())
    return accuracy, -float(F.cross_entropy(logits.double(), labels))


def _best(scores: list[Selection]) -> int:
    """Index of the best candidate by :func:`fma_fast.core.policy.best_on_val` (accuracy, then
    cross-entropy, then the first in grid order)."""
    return best_on_val([accuracy for accuracy, _ in scores], [-loss for _, loss in scores])


class Baseline:
    """A few-shot classifier on frozen features: fit on train (+ val for its grids), then score.

    ``selection`` holds the hyper-parameters chosen on val, ``val_table`` every candidate tried
    with its val (accuracy, -cross-entropy).
    """

    name = "baseline"

    def __init__(self) -> None:
        self.class_features: torch.Tensor | None = None
        self.selection: dict[str, float] = {}
        self.val_table: list[tuple[dict[str, float], Selection]] = []

    def fit(
        self,
        features: Array,
        labels: Array,
        class_features: Array,
        val_features: Array | None = None,
        val_labels: Array | None = None,
    ) -> Baseline:
        """Fit on the K-shot split; the val split (needed whenever a grid has > 1 value)
        chooses the hyper-parameters. Returns ``self``."""
        x, y, z = _prepare(features, labels, class_features)
        if y is None:
            raise ValueError("labels are required to fit")
        val = None
        if val_features is not None or val_labels is not None:
            if val_features is None or val_labels is None:
                raise ValueError("pass both val_features and val_labels, or neither")
            vx, vy, _ = _prepare(val_features, val_labels, z)
            val = (vx, vy)
        self.class_features = z
        self._fit(x, y, z, val)
        return self

    def _needs_val(self, grid_size: int, val) -> None:
        if grid_size > 1 and val is None:
            raise ValueError(
                f"{self.name} chooses among {grid_size} settings on val: "
                "pass val_features and val_labels (or a one-value grid)"
            )

    def _require_fitted(self) -> None:
        if self.class_features is None:
            raise RuntimeError(f"{self.name} is not fitted: call fit first")

    def _fit(self, x, y, z, val) -> None:
        raise NotImplementedError

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, features: Array) -> torch.Tensor:
        """(N, C) class scores of ``features`` (on the CPU, fp32)."""
        self._require_fitted()
        x, _, _ = _prepare(features, None, self.class_features)
        with torch.no_grad():
            return self._logits(x)

    def predict(self, features: Array) -> torch.Tensor:
        """(N,) predicted class indices."""
        return self.logits(features).argmax(dim=-1)

    def accuracy(self, features: Array, labels: Array) -> float:
        """Top-1 accuracy on a labelled split."""
        self._require_fitted()
        x, y, _ = _prepare(features, labels, self.class_features)
        return float((self.predict(x) == y).double().mean())


class ZeroShot(Baseline):
    """The backbone's own prediction (FMA's M=0): argmax cosine to the class text features."""

    name = "zero-shot"

    def _fit(self, x, y, z, val) -> None:
        pass

    def _logits(self, x):
        return LOGIT_SCALE * x @ self.class_features.T


class LinearProbe(Baseline):
    """Multinomial logistic regression on L2-normalised features, full-batch L-BFGS.

    Loss: mean cross-entropy + ``l2``·‖W‖² (bias unpenalised), ``l2`` chosen on val from
    ``l2_grid``. The grid is solved as a regularisation path, strongest ``l2`` first from zero,
    each next one warm-started from the last (same optimum, far fewer iterations); nothing
    here is random, so the fit depends on the data only.
    """

    name = "linear probe"

    def __init__(
        self,
        l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
        max_iter: int = 200,
    ) -> None:
        super().__init__()
        self.l2_grid = _check_grid("l2_grid", l2_grid, allow_zero=True)
        self.max_iter = check.check_int("max_iter", max_iter, minimum=1)

    def _train(
        self, x, y, start: tuple[torch.Tensor, torch.Tensor], l2: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight = start[0].clone().requires_grad_(True)
        bias = start[1].clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=self.max_iter,
            history_size=20,
            tolerance_grad=1e-7,
            tolerance_change=1e-10,
            line_search_fn="strong_wolfe",
        )

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return weight.detach(), bias.detach()

    def _fit(self, x, y, z, val) -> None:
        self._needs_val(len(self.l2_grid), val)
        fits: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        start = (torch.zeros(z.shape[0], x.shape[1]), torch.zeros(z.shape[0]))
        for l2 in sorted(set(self.l2_grid), reverse=True):
            start = fits[l2] = self._train(x, y, start, l2)
        chosen = 0
        if val is not None:
            scores = [
                val_score(val[0] @ fits[l2][0].T + fits[l2][1], val[1]) for l2 in self.l2_grid
            ]
            self.val_table = [({"l2": l2}, s) for l2, s in zip(self.l2_grid, scores)]
            chosen = _best(scores)
        self.weight, self.bias = fits[self.l2_grid[chosen]]
        self.selection = {"l2": self.l2_grid[chosen]}

    def _logits(self, x):
        return x @ self.weight.T + self.bias


class ClipAdapter(Baseline):
    """CLIP-Adapter as released, trained here on the cached image features.

    ``x' = normalize(α·A(x) + (1-α)·x)`` with A = Linear(D, D/reduction) → ReLU →
    Linear(.., D) → ReLU, both Linears without biases, and the released residual ratio
    α = 0.2; scored by cosine to the class texts at logit scale 100 and trained with
    cross-entropy (full-batch AdamW). Several values in ``alpha_grid`` (not the release) train
    one adapter each from the same seeded initialisation and choose α on val. The one-step
    counterpart of FMA's multi-step transport, and a feature producer FMA can stack on
    (``transform``). A CLIP-Adapter checkpoint of the released code is a feature source
    instead (:func:`fma_fast.clip.load_peft`, ``--peft adapter``).
    """

    name = "CLIP-Adapter"

    def __init__(
        self,
        alpha_grid: Sequence[float] = (0.2,),
        *,
        reduction: int = 4,
        iterations: int = 100,
        lr: float = 5e-3,
        weight_decay: float = 1e-2,
        seed: int = 1,
    ) -> None:
        super().__init__()
        self.alpha_grid = _check_grid("alpha_grid", alpha_grid)
        if any(a > 1 for a in self.alpha_grid):
            raise ValueError(f"alpha_grid values must lie in (0, 1], got {list(alpha_grid)}")
        self.reduction = check.check_int("reduction", reduction, minimum=1)
        self.iterations = check.check_int("iterations", iterations, minimum=1)
        self.lr = check.check_positive_float("lr", lr)
        self.weight_decay = check.check_positive_float(
            "weight_decay", weight_decay, allow_zero=True
        )
        self.seed = check.check_int("seed", seed, minimum=0)

    @staticmethod
    def _adapt(w1, w2, alpha, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(alpha * torch.relu(torch.relu(x @ w1) @ w2) + (1 - alpha) * x,
                           dim=-1)

    def _fit(self, x, y, z, val) -> None:
        self._needs_val(len(self.alpha_grid), val)
        dim, count = x.shape[1], len(self.alpha_grid)
        hidden = max(1, dim // self.reduction)
        generator = torch.Generator().manual_seed(self.seed)
        # nn.Linear's default init range, drawn from our own generator.
        w1 = (torch.rand(dim, hidden, generator=generator) * 2 - 1) / math.sqrt(dim)
        w2 = (torch.rand(hidden, dim, generator=generator) * 2 - 1) / math.sqrt(hidden)
        # All α trained side by side: separate parameters and per-element AdamW make this
        # exactly the same as one run per α, at a fraction of the per-step overhead.
        w1 = nn.Parameter(w1.expand(count, dim, hidden).clone())
        w2 = nn.Parameter(w2.expand(count, hidden, dim).clone())
        alphas = torch.tensor(self.alpha_grid)[:, None, None]
        optimizer = torch.optim.AdamW([w1, w2], lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.iterations):
            logits = LOGIT_SCALE * self._adapt(w1, w2, alphas, x) @ z.T  # (count, N, C)
            loss = F.cross_entropy(logits.transpose(1, 2), y.expand(count, -1), reduction="none")
            optimizer.zero_grad(set_to_none=True)
            loss.mean(dim=1).sum().backward()
            optimizer.step()
        w1, w2 = w1.detach(), w2.detach()
        chosen = 0
        if val is not None:
            scores = [
                val_score(LOGIT_SCALE * self._adapt(w1[i], w2[i], a, val[0]) @ z.T, val[1])
                for i, a in enumerate(self.alpha_grid)
            ]
            self.val_table = [({"alpha": a}, s) for a, s in zip(self.alpha_grid, scores)]
            chosen = _best(scores)
        self.w1, self.w2, self.alpha = w1[chosen], w2[chosen], self.alpha_grid[chosen]
        self.selection = {"alpha": self.alpha}

    def transform(self, features: Array) -> torch.Tensor:
        """The adapted, unit-norm features x' (what FMA stacks on)."""
        self._require_fitted()
        x, _, _ = _prepare(features, None, self.class_features)
        return self._adapt(self.w1, self.w2, self.alpha, x)

    def _logits(self, x):
        return LOGIT_SCALE * self._adapt(self.w1, self.w2, self.alpha, x) @ self.class_features.T


def tip_adapter_logits(
    features: torch.Tensor,
    class_features: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Tip-Adapter's scores: ``100·x·zᵀ + α·exp(-β(1 - x·Kᵀ))·V``.

    ``features`` (N, D) and ``class_features`` (C, D) unit-norm, cache ``keys`` (S, D) and
    one-hot ``values`` (S, C). The cache term is a kernel vote of the labelled shots, sharper
    with larger β, weighted by α against CLIP's zero-shot logits.
    """
    affinity = features @ keys.T
    return LOGIT_SCALE * features @ class_features.T + alpha * torch.exp(
        -beta * (1 - affinity)
    ) @ values.to(affinity.dtype)


class TipAdapter(Baseline):
    """Tip-Adapter: a training-free cache of the K-shot features (keys) and one-hot labels
    (values) added to the zero-shot logits; α and β searched on val over the full grid."""

    name = "Tip-Adapter"

    def __init__(
        self,
        alpha_grid: Sequence[float] = TIP_ALPHAS,
        beta_grid: Sequence[float] = TIP_BETAS,
    ) -> None:
        super().__init__()
        self.alpha_grid = _check_grid("alpha_grid", alpha_grid, allow_zero=True)
        self.beta_grid = _check_grid("beta_grid", beta_grid, allow_zero=True)

    def _search(self, keys, val) -> None:
        self._needs_val(len(self.alpha_grid) * len(self.beta_grid), val)
        candidates = [(a, b) for b in self.beta_grid for a in self.alpha_grid]
        if val is None:
            self.alpha, self.beta = candidates[0]
        else:
            scores = [
                val_score(
                    tip_adapter_logits(val[0], self.class_features, keys, self.values, a, b),
                    val[1],
                )
                for a, b in candidates
            ]
            self.val_table = [({"alpha": a, "beta": b}, s) for (a, b), s in zip(candidates, scores)]
            self.alpha, self.beta = candidates[_best(scores)]
        self.selection = {"alpha": self.alpha, "beta": self.beta}

    def _fit(self, x, y, z, val) -> None:
        self.keys = x
        self.values = F.one_hot(y, z.shape[0]).float()
        self._search(self.keys, val)

    def _logits(self, x):
        return tip_adapter_logits(
            x, self.class_features, self.keys, self.values, self.alpha, self.beta
        )


class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: the cache keys become parameters fine-tuned with cross-entropy on the
    K-shot split (full-batch AdamW, at the α, β of the training-free search), then α and β
    are searched again on val. Keys start at the cached features, so nothing here is random.

    The paper trains on augmented views of the images. On fixed features every train row
    meets its own key at affinity 1, so its loss is already small and the keys move little:
    expect Tip-Adapter-F close to Tip-Adapter here. (Scoring each row without its own key
    was tried and lost accuracy: the keys overfit.)
    """

    name = "Tip-Adapter-F"

    def __init__(
        self,
        alpha_grid: Sequence[float] = TIP_ALPHAS,
        beta_grid: Sequence[float] = TIP_BETAS,
        *,
        iterations: int = 100,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(alpha_grid, beta_grid)
        self.iterations = check.check_int("iterations", iterations, minimum=0)
        self.lr = check.check_positive_float("lr", lr)

    def _fit(self, x, y, z, val) -> None:
        super()._fit(x, y, z, val)
        keys = nn.Parameter(x.clone())
        optimizer = torch.optim.AdamW([keys], lr=self.lr, weight_decay=0.0)
        for _ in range(self.iterations):
            logits = tip_adapter_logits(x, z, keys, self.values, self.alpha, self.beta)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        self.keys = keys.detach()
        self._search(self.keys, val)


class FMA(Baseline):
    """FMA as a classifier: fit the velocity field on the train split, choose M on val,
    predict by cosine after M Euler steps. On features from another method it is that method
    plus FMA (the paper's plug-and-play use).

    Defaults are the demo's small CPU setting (2 blocks, 60 epochs, γ=0.05); any other
    :func:`fma_fast.fit` option (``lr``, ``batch_size``, ``noise``, ...) passes through.
    """

    name = "FMA"

    def __init__(
        self,
        *,
        blocks: int = 2,
        epochs: int = 60,
        gamma: float = 0.05,
        max_steps: int = 10,
        step_size: float = DEFAULT_STEP_SIZE,
        seed: int = 1,
        **fit_options: Any,
    ) -> None:
        super().__init__()
        self.fit_options = {
            "blocks": blocks,
            "epochs": epochs,
            "gamma": gamma,
            "seed": seed,
            "progress": False,
            "device": "cpu",
            **fit_options,
        }
        self.max_steps = check.check_int("max_steps", max_steps, minimum=0)
        self.step_size = check.check_positive_float("step_size", step_size)
        self.fit_result: FitResult | None = None
        self.steps_selection: StepSelection | None = None
        self.val_stats: TrajectoryStats | None = None

    def _fit(self, x, y, z, val) -> None:
        self._needs_val(self.max_steps + 1, val)
        self.fit_result = fit(x, y, z, **self.fit_options)
        self.model = self.fit_result.model
        if val is None:
            self.steps = self.max_steps
        else:
            # One pass over the val states gives M (select_steps' rule) and what adaptive
            # stopping chooses its rule from (``val_stats``).
            self.val_stats = trajectory_stats(self.model, val[0], z, val[1],
                                              max_steps=self.max_steps, step_size=self.step_size)
            accuracy = self.val_stats.fixed_accuracy(val[1])
            loss = (-self.val_stats.label_logprob.double().mean(dim=0)).tolist()
            best = best_on_val(accuracy, loss, steps=range(len(accuracy)))
            self.steps_selection = StepSelection(best, accuracy, loss)
            self.steps = best
        self.selection = {"steps": self.steps}

    def transform(self, features: Array) -> torch.Tensor:
        """Features after the chosen M Euler steps (not normalised: scoring is by cosine)."""
        self._require_fitted()
        x, _, _ = _prepare(features, None, self.class_features)
        return solve(x, self.model, self.steps, step_size=self.step_size)

    def _logits(self, x):
        moved = solve(x, self.model, self.steps, step_size=self.step_size)
        return LOGIT_SCALE * F.normalize(moved, dim=-1) @ self.class_features.T


class Pipeline(Baseline):
    """``first`` (a method with ``transform``: CLIP-Adapter or FMA) then ``then`` on its features.

    ``Pipeline(ClipAdapter(), FMA())`` is CLIP-Adapter + FMA; ``Pipeline(FMA(), TipAdapter())``
    is Tip-Adapter on FMA-transported features. With ``fit_first=False`` an already fitted
    ``first`` is reused (one FMA fit shared by several heads).
    """

    def __init__(self, first: Baseline, then: Baseline, *, fit_first: bool = True) -> None:
        super().__init__()
        if not callable(getattr(first, "transform", None)):
            raise TypeError(f"first must have a transform method, got {type(first).__name__}")
        if not isinstance(then, Baseline):
            raise TypeError(f"then must be a Baseline, got {type(then).__name__}")
        self.first, self.then, self.fit_first = first, then, fit_first
        self.name = f"{then.name} on {first.name}"

    def _fit(self, x, y, z, val) -> None:
        if self.fit_first:
            self.first.fit(x, y, z, *(val or (None, None)))
        elif self.first.class_features is None:
            raise RuntimeError("fit_first=False needs a fitted first method")
        moved_val = None if val is None else (self.first.transform(val[0]), val[1])
        self.then.fit(self.first.transform(x), y, z, *(moved_val or (None, None)))
        self.selection = {**self.first.selection, **self.then.selection}

    def _logits(self, x):
        return self.then.logits(self.first.transform(x))


__all__ = [
    "FMA",
    "LOGIT_SCALE",
    "Baseline",
    "ClipAdapter",
    "LinearProbe",
    "Pipeline",
    "TipAdapter",
    "TipAdapterF",
    "ZeroShot",
    "tip_adapter_logits",
    "val_score",
]
