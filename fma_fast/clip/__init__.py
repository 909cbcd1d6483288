"""Real inputs for FMA: open_clip encoders, few-shot datasets, prompts and a feature cache.

Importing this package is cheap: open_clip, PIL and torchvision load only when an encoder is
built or images are read (``pip install fma_fast[clip]``).
"""

from ..core.distributed import Context, launch
from ..core.metrics import CollapseWarning
from ..solver.sharded import accuracy_by_steps_sharded, solve_sharded
from .cache import (
    ExtractedFeatures,
    SplitFeatures,
    cached_class_features,
    extract,
    extract_split,
    load_split,
)
from .classifier import ClassifierError, FewShotClassifier, Predictions
from .datasets import DATASET_NAMES, Dataset, Item, few_shot, load_dataset
from .encoder import (
    ClipEncoder,
    MissingExtraError,
    load_encoder,
    register_model_config,
    resolve_pretrained,
)
from .peft import PEFT_METHODS, PeftEncoder, PeftError, PeftSource, load_peft
from .predict import PredictSummary, predict_images
from .prompts import DATASET_TEMPLATES, ENSEMBLES, build_prompts, resolve_templates
from .transforms import Preprocess

__all__ = [
    "DATASET_NAMES",
    "DATASET_TEMPLATES",
    "ENSEMBLES",
    "ClassifierError",
    "ClipEncoder",
    "CollapseWarning",
    "Context",
    "Dataset",
    "ExtractedFeatures",
    "FewShotClassifier",
    "Item",
    "MissingExtraError",
    "PEFT_METHODS",
    "PeftEncoder",
    "PeftError",
    "PeftSource",
    "PredictSummary",
    "Predictions",
    "Preprocess",
    "SplitFeatures",
    "accuracy_by_steps_sharded",
    "build_prompts",
    "cached_class_features",
    "extract",
    "extract_split",
    "few_shot",
    "launch",
    "load_peft",
    "load_dataset",
    "load_encoder",
    "load_split",
    "predict_images",
    "register_model_config",
    "resolve_pretrained",
    "resolve_templates",
    "solve_sharded",
]
