"""``fit`` on feature files with M chosen on a validation file: what ``fma-fast train`` runs
(the command prints the tables and saves the model with :func:`fma_fast.save`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..core import validation as check
from ..core.model import VelocityNet
from ..core.policy import DEFAULT_STEP_SIZE
from ..io.features import (
    FeatureSet,
    check_feature_files,
    data_record,
    file_views,
    read_features,
)
from ..solver.api import StepSelection, select_steps
from .fit import FitResult, FitSettings, fit
from .refine import REFINE_LR, refine


@dataclass
class TrainingFiles:
    """A training file and an optional validation file as read (rows L2-normalised when
    asked), with how many rows of each that changed."""

    train_path: str
    train: FeatureSet
    val_path: str | None = None
    val: FeatureSet | None = None
    changed: int = 0
    changed_val: int = 0

    @classmethod
    def read(cls, train_path, val_path=None, *, normalize: bool = True) -> TrainingFiles:
        read = {"normalize": normalize, "require_labels": True}
        train, changed = read_features(train_path, **read)
        val, changed_val = read_features(val_path, **read) if val_path else (None, 0)
        return cls(str(train_path), train, None if val_path is None else str(val_path), val,
                   changed, changed_val)

    def check_together(self) -> None:
        """A validation file must come from the training file's source and class table."""
        if self.val is not None:
            check_feature_files({Path(self.train_path).name: self.train,
                                 Path(self.val_path).name: self.val})


@dataclass
class Trained:
    """The fit, the choice of M on val (None without a validation file) and what
    :func:`fma_fast.save` stores beside the weights (``extra``). After a refinement
    ``result`` holds the refined field (its config records the refinement under
    "refinement"), ``selection`` the M chosen again and ``before_refinement`` the first
    choice."""

    result: FitResult
    selection: StepSelection | None
    extra: dict[str, Any]
    before_refinement: StepSelection | None = None

    @property
    def model(self) -> VelocityNet:
        return self.result.model


def fit_on_files(files: TrainingFiles, settings: FitSettings, *, views: int | None = None,
                 max_steps: int = 10, step_size: float = DEFAULT_STEP_SIZE, normalize: bool = True,
                 device: str | torch.device | None = None, refine_epochs: int = 0,
                 refine_lr: float = REFINE_LR) -> Trained:
    """Fit on the training file (``views`` per image: given, else the file's provenance) and
    choose M on the validation file; CoCoOp files are refused (their class tables depend on
    the image, which a feature file does not hold). ``refine_epochs`` > 0 then refines the
    field at that M (:func:`~fma_fast.train.refine.refine`, needs the validation file; at
    M=0 the field is not used, so the skip is recorded) and chooses M again."""
    train, val = files.train, files.val
    refine_epochs = check.check_int("refine_epochs", refine_epochs, minimum=0)
    if refine_epochs and val is None:
        raise ValueError("refine_epochs needs a validation file: the field is refined at the "
                         "M chosen there")
    peft = (train.source or {}).get("peft") or {}
    if peft.get("method") == "cocoop":
        raise ValueError(f"{files.train_path} holds CoCoOp features, whose class tables depend "
                         "on the image: use fma-fast run --peft cocoop")
    settings = replace(settings, views=file_views(train, views))
    result = fit(train.features, train.labels, train.class_features, device=device,
                 **asdict(settings))
    extra = {"step_size": step_size, "data": data_record(train), "normalize": normalize}
    if val is None:
        return Trained(result, None, extra)

    def choose(model: VelocityNet) -> StepSelection:
        return select_steps(model, val.features, val.labels, val.class_features,
                            max_steps=max_steps, step_size=step_size, device=device)

    selection = before = choose(result.model)
    if refine_epochs and selection.best_steps == 0:
        result = FitResult(result.model, {**result.config, "refinement": {
            "skipped": "M=0 chosen on val"}}, result.history, result.learning_rates)
    elif refine_epochs:
        refined = refine(result.model, train.features, train.labels, train.class_features,
                         steps=selection.best_steps, epochs=refine_epochs, lr=refine_lr,
                         step_size=step_size, seed=settings.seed, device=device,
                         progress=settings.progress)
        result = FitResult(refined.model, {**result.config, "refinement": {
            **refined.config, "history": refined.history}}, result.history,
            result.learning_rates)
        selection = choose(refined.model)
    extra.update(steps=selection.best_steps, val_accuracy=selection.accuracy)
    return Trained(result, selection, extra, before if refine_epochs else None)
