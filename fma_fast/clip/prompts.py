"""Prompt templates: CoOp's per-dataset templates, user templates and prompt ensembles."""

from __future__ import annotations

from collections.abc import Sequence

#: CoOp's hand-written template per dataset (docs/method.md §7), keyed by fma_fast's dataset names.
DATASET_TEMPLATES: dict[str, str] = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}

DEFAULT_TEMPLATE = "a photo of a {}."

#: The seven-template ImageNet ensemble that Tip-Adapter and CLIP-Adapter use.
IMAGENET_ENSEMBLE: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

#: Named ensembles accepted wherever a template is.
ENSEMBLES: dict[str, tuple[str, ...]] = {"imagenet7": IMAGENET_ENSEMBLE}


def clean_class_name(name: str) -> str:
    """Underscores become spaces (CoOp's convention), surrounding whitespace goes."""
    return " ".join(name.replace("_", " ").split())


def resolve_templates(
    templates: Sequence[str] | str | None, dataset: str | None = None
) -> list[str]:
    """The template list to encode: given templates (ensemble names expand), else the dataset's.

    Each template must hold exactly one ``{}`` for the class name; a typo would otherwise
    silently give every class the same prompt.
    """
    if templates is None or (not isinstance(templates, str) and len(templates) == 0):
        return [DATASET_TEMPLATES.get(dataset or "", DEFAULT_TEMPLATE)]
    if isinstance(templates, str):
        templates = [templates]
    resolved: list[str] = []
    for template in templates:
        if not isinstance(template, str):
            raise TypeError(f"templates must be strings, got {type(template).__name__}")
        if template in ENSEMBLES:
            resolved.extend(ENSEMBLES[template])
        elif template.count("{}") != 1:
            raise ValueError(
                f"template {template!r} must contain exactly one '{{}}' for the class name "
                f"(or be an ensemble name: {', '.join(ENSEMBLES)})"
            )
        else:
            resolved.append(template)
    return resolved


def build_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """``prompts[t][c]``: template t filled with the cleaned name of class c."""
    names = [clean_class_name(name) for name in class_names]
    return [[template.replace("{}", name) for name in names] for template in templates]
