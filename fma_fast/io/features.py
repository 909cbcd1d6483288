"""Feature files: one safetensors file with features, labels, the class table and class names,
and where they came from (their provenance), so that splits of different origins never mix."""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..core import validation as check
from ..core.policy import CLASS_TABLE_TOLERANCE, UNIT_ROW_TOLERANCE
from .files import (
    JsonError,
    file_problem,
    loads_json,
    read_json_record,
    save_safetensors,
    write_text,
)

CLASS_NAMES_KEY = "class_names"
PROVENANCE_KEY = "provenance"
SOURCE_NAME = "source.json"
SOURCE_FORMAT = "fma_fast/feature-source/1"


class FeatureFileError(ValueError):
    """A feature file is missing, unreadable or inconsistent, or files that must go together
    (train, val and test; a model and its test set) do not."""


@dataclass
class FeatureSet:
    """``features`` (N, D), ``labels`` (N,) or None, ``class_features`` (C, D), ``class_names``,
    and ``provenance``: {"source": what produced the features (encoder, checkpoint,
    preprocessing, dataset, templates; or the synthetic task), plus per-file details such as
    the split}, or None for files made by hand."""

    features: torch.Tensor
    labels: torch.Tensor | None
    class_features: torch.Tensor
    class_names: list[str] | None = None
    provenance: dict[str, Any] | None = None

    @property
    def source(self) -> dict[str, Any] | None:
        return (self.provenance or {}).get("source")


def save_features(
    path: str | os.PathLike,
    features: torch.Tensor,
    class_features: torch.Tensor,
    labels: torch.Tensor | None = None,
    class_names: list[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a feature file atomically (temp file, then rename); the same content always gives
    the same bytes. Features and class table are stored in fp32, the format's dtype and the
    solver's, whatever dtype they come in (values beyond fp32's range are refused).
    ``provenance`` (JSON) should hold a ``source`` shared by every split of one origin."""
    x = check.check_matrix("features", features)
    z = check.check_matrix("class_features", class_features, dim=x.shape[1], dim_source="features")
    tensors = {"features": x.detach().to("cpu", torch.float32).contiguous(),
               "class_features": z.detach().to("cpu", torch.float32).contiguous()}
    for name in ("features", "class_features"):
        check.check_finite(name, tensors[name])
    if labels is not None:
        tensors["labels"] = check.check_labels(
            "labels", labels, rows=x.shape[0], num_classes=z.shape[0]
        ).cpu()
    if class_names is not None and len(class_names) != z.shape[0]:
        raise ValueError(f"class_names has {len(class_names)} names for {z.shape[0]} classes")
    metadata = {}
    if class_names is not None:
        metadata[CLASS_NAMES_KEY] = json.dumps(list(class_names))
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(dict(provenance), sort_keys=True)
    return save_safetensors(path, tensors, metadata)


def _json_metadata(path: Path, metadata: dict[str, str], key: str, kind: type):
    if key not in metadata:
        return None
    try:
        value = loads_json(metadata[key], f"{path}: {key} metadata")
    except JsonError as error:
        raise FeatureFileError(str(error)) from None
    if not isinstance(value, kind):
        raise FeatureFileError(f"{path}: {key} metadata must be a JSON {kind.__name__}")
    return value


def load_features(path: str | os.PathLike, *, require_labels: bool = False) -> FeatureSet:
    """Read and validate a feature file written by :func:`save_features` (or by hand)."""
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise FeatureFileError(f"cannot read feature file {path}: {problem}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in keys}
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise FeatureFileError(f"{path} is not a readable safetensors file: {error}") from None
    for key in ("features", "class_features"):
        if key not in keys:
            raise FeatureFileError(f"{path} has no tensor named {key!r} (found {sorted(keys)})")
    if require_labels and "labels" not in keys:
        raise FeatureFileError(f"{path} has no 'labels' tensor, which this command needs")
    try:
        x = check.check_matrix(f"{path.name}:features", tensors["features"])
        z = check.check_matrix(
            f"{path.name}:class_features",
            tensors["class_features"],
            dim=x.shape[1],
            dim_source=f"{path.name}:features",
        )
        labels = tensors.get("labels")
        if labels is not None:
            labels = check.check_labels(
                f"{path.name}:labels", labels, rows=x.shape[0], num_classes=z.shape[0]
            )
    except (TypeError, ValueError) as error:
        raise FeatureFileError(str(error)) from None
    names = _json_metadata(path, metadata, CLASS_NAMES_KEY, list)
    if names is not None and len(names) != z.shape[0]:
        raise FeatureFileError(f"{path}: class_names must list {z.shape[0]} names")
    provenance = _json_metadata(path, metadata, PROVENANCE_KEY, dict)
    return FeatureSet(
        features=x, labels=labels, class_features=z, class_names=names, provenance=provenance
    )


def unit_rows(rows: torch.Tensor, name: str, first_row: int = 0) -> tuple[torch.Tensor, int]:
    """``rows`` L2-normalised, and how many changed: rows already unit-norm (within
    :data:`~fma_fast.core.policy.UNIT_ROW_TOLERANCE`) keep their bits, so data written
    normalised gives the same values and class-table digest before and after. A row of norm 0
    has no direction and is refused, naming ``name`` and its row (``first_row`` is the index of
    ``rows[0]``): left at 0 it would be scored as some class all the same. The one row rule of
    every command."""
    norms = torch.linalg.vector_norm(rows.float(), dim=-1, keepdim=True)
    off = (norms - 1).abs().squeeze(-1) > UNIT_ROW_TOLERANCE
    if not bool(off.any()):
        return rows, 0
    zero = norms.squeeze(-1) == 0
    if bool(zero.any()):
        raise ValueError(f"{name}: row {first_row + int(zero.nonzero()[0, 0])} is all zeros: it "
                         f"has no direction to L2-normalise ({int(zero.sum())} such rows in "
                         "these rows); remove such rows or pass normalize=False "
                         "(--no-normalize) to score raw rows")
    fixed = rows.float().clone()
    fixed[off] = fixed[off] / norms[off]
    return fixed.to(rows.dtype), int(off.sum())


def normalized(data: FeatureSet, name: str) -> tuple[FeatureSet, int]:
    """``data`` (the file ``name``) with every feature and class row L2-normalised
    (:func:`unit_rows`), and how many rows changed."""
    features, changed = unit_rows(data.features, f"{name} features")
    table, changed_table = unit_rows(data.class_features, f"{name} class_features")
    return replace(data, features=features, class_features=table), changed + changed_table


def subsample_classes(data: FeatureSet, classes: list[int], name: str) -> FeatureSet:
    """The rows of ``classes`` only, relabelled 0..len-1 in that order, with their class table
    rows and names; the provenance records the subset as ``name`` (e.g. "base")."""
    if data.labels is None:
        raise FeatureFileError(f"selecting the {name} classes needs labels")
    keep = torch.as_tensor(classes, dtype=torch.long)
    relabel = torch.full((data.class_features.shape[0],), -1, dtype=torch.long)
    relabel[keep] = torch.arange(len(classes))
    rows = (relabel[data.labels] >= 0).nonzero().flatten()
    provenance = dict(data.provenance or {})
    provenance["classes"] = {"subset": name, "of": int(data.class_features.shape[0]),
                             "kept": [int(c) for c in classes]}
    return FeatureSet(
        features=data.features[rows],
        labels=relabel[data.labels[rows]],
        class_features=data.class_features[keep],
        class_names=None if data.class_names is None else [data.class_names[c] for c in classes],
        provenance=provenance,
    )


def class_table_sha256(class_features: torch.Tensor) -> str:
    """A digest of a class table's fp32 values (what the solver scores against)."""
    table = class_features.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(table.shape)).encode())
    digest.update(table.numpy())
    return digest.hexdigest()


def class_table_difference(first: torch.Tensor, second: torch.Tensor) -> str | None:
    """None when two class tables are one table up to the rounding of its computation (every
    row within :data:`~fma_fast.core.policy.CLASS_TABLE_TOLERANCE` of its norm, in L2), else what
    differs. Compared in float64, so the comparison adds no rounding of its own."""
    a = first.detach().to("cpu", torch.float64)
    b = second.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not a.numel():
        return None
    scale = torch.maximum(torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1))
    distance = torch.linalg.vector_norm(a - b, dim=1)
    relative = torch.where(distance == 0, 0.0, distance / scale)
    relative = torch.where(torch.isfinite(relative), relative, torch.inf)
    worst = int(relative.argmax())
    if float(relative[worst]) <= CLASS_TABLE_TOLERANCE:
        return None
    return (f"class {worst} differs by {float(relative[worst]):.3g} of its norm, more than the "
            f"{CLASS_TABLE_TOLERANCE:g} of fp32 rounding")


def read_features(path, *, normalize: bool, require_labels: bool = False
                  ) -> tuple[FeatureSet, int]:
    """A feature file, its rows L2-normalised when ``normalize``, and how many rows that
    changed (feature files from ``extract`` are unit already: 0)."""
    data = load_features(path, require_labels=require_labels)
    return normalized(data, str(path)) if normalize else (data, 0)


def file_views(data: FeatureSet, given: int | None) -> int:
    """Views per image of a training file: ``given``, else what its provenance says, else 1."""
    if given is not None:
        return given
    views = (data.provenance or {}).get("views")
    return views if isinstance(views, int) and views >= 1 else 1


def data_record(data: FeatureSet) -> dict[str, Any]:
    """What a model trained on ``data`` keeps of it, so that later inputs can be checked
    against it: the features' source and the class table (its names, its digest and, under
    ``"class_table"``, its values: :func:`fma_fast.save` stores them beside the weights)."""
    return {
        "source": data.source,
        "classes": int(data.class_features.shape[0]),
        "class_table_sha256": class_table_sha256(data.class_features),
        "class_names": data.class_names,
        "class_table": data.class_features.detach().to("cpu", torch.float32).contiguous(),
    }


def table_mismatch(first: dict[str, Any], second: dict[str, Any]) -> str | None:
    """How the class tables of two data records differ ("different class names (class 1:
    ...)"): count, names, then values within the tolerance where both records hold them, else
    their digests. None when they are one table."""
    if first.get("classes") != second.get("classes"):
        return (f"different class tables: {first.get('classes')} vs {second.get('classes')} "
                "classes")
    names = first.get("class_names"), second.get("class_names")
    if None not in names:
        ours, theirs = (list(map(_nfc, found)) for found in names)
        if ours != theirs:
            index = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), 0)
            return (f"different class names (class {index}: {ascii(names[0][index])} vs "
                    f"{ascii(names[1][index])}; compared in Unicode NFC, shown as ascii())")
    tables = first.get("class_table"), second.get("class_table")
    if None not in tables:
        difference = class_table_difference(*tables)
        return None if difference is None else \
            f"different class tables (same size, other values: {difference})"
    if first.get("class_table_sha256") != second.get("class_table_sha256"):
        return ("different class tables (same size, other values; a model that carries no "
                "class table, as fma_fast 0.1 saved them, is compared by its digest, exactly: "
                "retrain it, or set model.trained_on[\"class_table\"] to the table it was "
                "trained with and save it, to compare within fp32 rounding)")
    return None


def _nfc(name: Any) -> Any:
    """A class name in Unicode NFC: "café" typed (one code point) and "café" from a macOS file
    name (e + a combining accent) are one name."""
    return unicodedata.normalize("NFC", name) if isinstance(name, str) else name


def differences(first: Mapping[str, Any], second: Mapping[str, Any]) -> str:
    """The keys on which two records differ, with both values (shortened)."""
    keys = sorted(set(first) | set(second))
    differing = [key for key in keys if first.get(key) != second.get(key)]
    shown = [
        f"{key} {_short(first.get(key))} vs {_short(second.get(key))}" for key in differing[:3]
    ]
    more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
    return "; ".join(shown) + more


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else f"{text[:37]}..."


def check_same_origin(records: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse inputs that must go together but do not: a different source (when both say),
    or a different class table (:func:`table_mismatch`: count, names, values beyond fp32
    rounding). ``records`` maps a name for each input (a file name, "the model") to its
    :func:`data_record`; a record without ``"classes"`` (rows that carry no class table, such
    as a shard ``score`` reads) is compared by its source only. The one rule of ``eval``,
    ``train`` and ``score``."""
    (first_name, first), *rest = records.items()
    for name, record in rest:
        pair = f"{first_name} and {name}"
        sources = first.get("source"), record.get("source")
        if None not in sources and sources[0] != sources[1]:
            raise FeatureFileError(
                f"{pair} come from different sources ({differences(*sources)})"
            )
        mismatch = table_mismatch(first, record) if "classes" in record else None
        if mismatch:
            raise FeatureFileError(f"{pair} have {mismatch}")


def check_feature_files(files: Mapping[str, FeatureSet]) -> None:
    """:func:`check_same_origin` for feature sets loaded together (train, val, test)."""
    check_same_origin({name: data_record(data) for name, data in files.items()})


def recorded_source(folder: Path) -> dict[str, Any] | None:
    """The source ``folder/source.json`` records (:func:`claim_folder`), or None when there is
    none; a file there that is not a source record is refused."""
    record = folder / SOURCE_NAME
    if not record.exists():
        return None
    found = read_json_record(record)
    if found is None or found.get("format") != SOURCE_FORMAT or \
            not isinstance(found.get("source"), dict):
        raise FeatureFileError(f"{record} is not a readable source record")
    return found["source"]


def claim_folder(folder: str | os.PathLike, source: Mapping[str, Any], name: str) -> Path:
    """Tie ``folder`` to one source of features (``folder/source.json``): the first use
    records it, later uses with another source are refused, so features of two models,
    checkpoints, preprocessings or datasets never end up side by side."""
    folder = Path(folder)
    record = folder / SOURCE_NAME
    source = json.loads(json.dumps(dict(source)))  # as it reads back from JSON
    try:
        found = recorded_source(folder)
    except FeatureFileError as error:
        raise FeatureFileError(f"{name} {folder}: {error}") from None
    if found is not None:
        if found != source:
            raise FeatureFileError(
                f"{name} {folder} holds features from another source "
                f"({differences(found, source)}); "
                "use another folder or delete this one"
            )
        return folder
    text = json.dumps({"format": SOURCE_FORMAT, "source": source}, indent=1, sort_keys=True)
    write_text(record, text + "\n")
    return folder
