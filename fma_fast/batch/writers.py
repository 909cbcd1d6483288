"""Writing a part's top-k outputs: safetensors, one .npy per array, or CSV / JSON lines with
class names (small jobs). Parts of images (``fma-fast predict``) carry each row's image path:
in the safetensors metadata (with the class names), as ``<part>.paths.npy`` (a unicode array)
or as a ``path`` column / key."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.files import atomic_write, save_safetensors, write_text
from .reader import Part

FORMATS = ("safetensors", "npy", "csv", "jsonl")
"""Output formats: binary arrays per part (safetensors, or one .npy per array), or text with
class names (CSV, JSON lines) for small outputs (``policy.SCORE_TEXT_ENTRIES``)."""


def _text_rows(indices, values, ids, labels, names, paths) -> Iterator[dict[str, Any]]:
    for row in range(indices.shape[0]):
        entry: dict[str, Any] = {"row": int(ids[row])}
        if paths is not None:
            entry["path"] = paths[row]
        if labels is not None:
            entry["label"] = int(labels[row])
        entry["topk"] = [[int(c), None if names is None else names[int(c)],
                          round(float(v), 6)] for c, v in zip(indices[row], values[row])]
        yield entry


def _save_npy(path: Path, array: np.ndarray) -> Path:
    def save(temp: Path) -> None:
        with open(temp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return atomic_write(path, save)


def write_part(out: Path, part: Part, arrays: dict[str, torch.Tensor], output_format: str,
               names, job: str, paths: list[str] | None = None) -> list[Path]:
    """The part's output files, each written atomically; their paths. ``paths``: the image of
    each row, when the rows are images."""
    stem = out / part.stem
    if output_format == "safetensors":
        meta = {"fma_fast_score": json.dumps({"job": job, "input": part.shard.path.name,
                                              "rows": [part.start, part.stop]}, sort_keys=True)}
        if paths is not None:
            meta.update(paths=json.dumps(paths), class_names=json.dumps(names))
        return [save_safetensors(f"{stem}.safetensors", arrays, meta)]
    if output_format == "npy":
        written = [_save_npy(Path(f"{stem}.{name}.npy"), array.numpy())
                   for name, array in arrays.items()]
        if paths is not None:  # fixed-width unicode: no pickle needed to read it back
            written.append(_save_npy(Path(f"{stem}.paths.npy"),
                                     np.array(paths, dtype=str if paths else "<U1")))
        return written
    rows = _text_rows(arrays["topk_indices"], arrays["topk_values"], arrays["row_ids"],
                      arrays.get("labels"), names, paths)
    if output_format == "jsonl":
        text = "".join(json.dumps(entry) + "\n" for entry in rows)
        return [write_text(f"{stem}.jsonl", text)]
    k = arrays["topk_indices"].shape[1]
    header = ["row"] + (["path"] if paths is not None else []) + \
        (["label"] if "labels" in arrays else [])
    header += [f"{field}_{r + 1}" for r in range(k) for field in ("class", "name", "cosine")]
    text = io.StringIO()
    writer = csv.writer(text)  # RFC 4180: CRLF rows, fields with , " CR or LF quoted
    writer.writerow(header)
    for entry in rows:
        cells = [entry[key] for key in ("row", "path", "label") if key in entry]
        for c, name, v in entry["topk"]:
            cells += [c, "" if name is None else name, f"{v:.6f}"]
        writer.writerow(cells)
    return [atomic_write(f"{stem}.csv", lambda temp: temp.write_text(text.getvalue(),
                                                                    newline=""))]
