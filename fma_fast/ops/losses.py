"""Training losses at the solver's output: the cosine cross-entropy against all class texts.

``cosine_cross_entropy(solve(x0, model, M, differentiable=True), z, y)`` is the loss of the
early-stopped solve as a classifier (docs/method.md §4): gradients reach the features, the
field and the class table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import reference
from ..core import validation as check
from ..core.names import OP_BACKENDS, OpBackend, check_choice
from ..core.policy import LOGIT_SCALE
from . import dispatch, scoring


def cosine_cross_entropy(
    features,
    class_features,
    labels,
    *,
    logit_scale: float = LOGIT_SCALE,
    backend: OpBackend = "auto",
) -> torch.Tensor:
    """Mean cross-entropy of softmax(``logit_scale``·cos(x_n, z_c)) over all C classes.

    Differentiable w.r.t. ``features`` (N, D) and ``class_features`` (C, D) (neither needs
    unit rows: both are normalised inside, and the gradient goes through that). No (N, C)
    matrix is built, for the forward or the backward: on the CPU torch class tiles with their
    own backward (``scoring.TiledCrossEntropy``); on CUDA the fused Triton kernel when the class
    table needs no gradient (it has none for the table), else the torch tiles.
    ``backend``: "reference" the plain formula (builds (N, C)), "triton" the kernel or an
    error. ``labels`` (N,) are integer classes in [0, C); NaN/Inf inputs raise ValueError.
    """
    x = check.check_matrix("features", features)
    z = check.check_matrix("class_features", class_features, dim=x.shape[1],
                           dim_source="features")
    y = check.check_labels("labels", labels, rows=x.shape[0], num_classes=z.shape[0])
    check.check_same_device(features=x, class_features=z, labels=y)
    check.check_finite("features", x.detach())
    check.check_finite("class_features", z.detach())
    logit_scale = check.check_positive_float("logit_scale", logit_scale)
    check_choice("backend", backend, OP_BACKENDS)
    if backend == "reference":
        return reference.cosine_cross_entropy(x, z, y, logit_scale)
    ops = dispatch.op_backend(backend, x.device)
    table_grad = z.requires_grad and torch.is_grad_enabled()
    if ops == "reference" or (table_grad and ops == "auto"):
        unit_table = F.normalize(reference.at_least_fp32(z), dim=-1)
        return scoring.tiled_cross_entropy(x, unit_table, y, logit_scale)
    return dispatch.cosine_cross_entropy(x, z, y, logit_scale, backend=ops).loss
