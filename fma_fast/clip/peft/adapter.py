"""CLIP-Adapter: the residual MLP of a Dassl ``clip_adapter`` on the image features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...core.validation import normalized_outputs
from .source import PeftError, PeftSource, embed_dim, shape_of

ADAPTER_RATIO = 0.2  # CLIP-Adapter's and FMA's hard-coded residual ratio


class AdapterSource(PeftSource):
    """CLIP-Adapter: f' = (1 - 0.2) f + 0.2 ReLU(W2 ReLU(W1 f)) on the unnormalised image
    feature f, then L2-normalised (as CLIP-Adapter and FMA's adapter extractor do). The MLP
    has no biases, so it is positively homogeneous and normalising f first would give the
    same f' up to rounding. Class features are the plain text tower's prompt-ensemble
    features."""

    def __init__(self, path, encoder, class_names, state, info):
        w1, w2 = state["fc.0.weight"], state["fc.2.weight"]
        dim = embed_dim(encoder)
        if w1.ndim != 2 or w1.shape[1] != dim:
            raise PeftError(
                f"{path}: adapter fc.0.weight has shape {shape_of(w1)}, expected [hidden, {dim}] "
                f"for the image embedding width {dim} of {encoder.name}"
            )
        if shape_of(w2) != [dim, w1.shape[0]]:
            raise PeftError(f"{path}: adapter fc.2.weight has shape {shape_of(w2)}, expected "
                            f"{[dim, w1.shape[0]]}")
        settings = {
            "ratio": ADAPTER_RATIO,
            "hidden": int(w1.shape[0]),
            "reduction": dim / w1.shape[0],
            "weights_dtype": str(w1.dtype).removeprefix("torch."),
            **info,
        }
        super().__init__("adapter", path, encoder, class_names, settings)
        self.weights = [w.detach().float().to(encoder.device) for w in (w1, w2)]

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """The residual mix of unnormalised image features (B, D), before normalisation."""
        w1, w2 = self.weights
        mlp = F.relu(F.linear(F.relu(F.linear(features, w1)), w2))
        return (1 - ADAPTER_RATIO) * features + ADAPTER_RATIO * mlp

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        with torch.inference_mode():
            with encoder._autocast():
                features = encoder.model.encode_image(pixels.to(encoder.device))
            return normalized_outputs(f"{self.path}: adapted image features",
                                      self.adapt(features.float()), error=PeftError).cpu()

    def class_features(self, templates: Sequence[str]) -> torch.Tensor:
        return self.encoder.class_features(self.class_names, templates)
