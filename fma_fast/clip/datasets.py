"""Few-shot datasets in the layouts of the CLIP few-shot literature (docs/method.md §7), plus a
class-per-folder layout and CSV lists; seeded K-shot sampling."""

from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.protocol import draw_split
from ..io.files import read_json
from .prompts import DATASET_TEMPLATES, DEFAULT_TEMPLATE

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
#: CoOp's 50/20/30 per-class split for data that ships without one.
SPLIT_FRACTIONS = (0.5, 0.2)
#: CoOp renames EuroSAT's folder names to phrases a text encoder understands.
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


@dataclass(frozen=True)
class Item:
    """One image: ``path`` relative to the dataset's image folder, and its class index."""

    path: str
    label: int


@dataclass
class Dataset:
    """Class names, the default prompt template, and train/val/test item lists.

    ``val`` is None when the layout has no validation split; :func:`few_shot` then draws the
    validation shots from the training images not picked as training shots.
    """

    name: str
    image_root: Path
    class_names: list[str]
    template: str
    train: list[Item]
    val: list[Item] | None
    test: list[Item]


@dataclass(frozen=True)
class _Layout:
    folder: str
    images: str
    split_file: str | None = None


LAYOUTS: dict[str, _Layout] = {
    "imagenet": _Layout("imagenet", "images"),
    "caltech101": _Layout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": _Layout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": _Layout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": _Layout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": _Layout("food-101", "images", "split_zhou_Food101.json"),
    "fgvc_aircraft": _Layout("fgvc_aircraft", "images"),
    "sun397": _Layout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": _Layout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": _Layout("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": _Layout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
DATASET_NAMES = tuple(LAYOUTS)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# Accept fma_fast's names, CoOp's class names (OxfordPets, DescribableTextures, ...) and spellings.
_ALIASES = {_key(name): name for name in LAYOUTS}
_ALIASES.update({_key(layout.folder): name for name, layout in LAYOUTS.items()})
_ALIASES.update(
    {
        _key(layout.split_file[len("split_zhou_") : -len(".json")]): name
        for name, layout in LAYOUTS.items()
        if layout.split_file
    }
)


def canonical_name(name: str) -> str | None:
    """fma_fast's name for one of the 11 datasets, or None."""
    return _ALIASES.get(_key(name))


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _class_names(named_labels: dict[int, set[str]], source: str) -> list[str]:
    """Names by label 0..C-1; every label needs exactly one name."""
    if not named_labels:
        raise ValueError(f"{source} lists no images")
    count = max(named_labels) + 1
    names = []
    for label in range(count):
        found = named_labels.get(label)
        if not found:
            raise ValueError(
                f"{source}: no image has label {label} (labels must be 0..{count - 1})"
            )
        if len(found) > 1:
            raise ValueError(f"{source}: label {label} has several class names {sorted(found)}")
        names.append(next(iter(found)))
    return names


def _read_zhou(name: str, folder: Path, layout: _Layout) -> Dataset:
    image_root = _require_dir(folder / layout.images, f"{name} image folder")
    split_path = _require_file(
        folder / layout.split_file,
        f"{name} split file (CoOp's {layout.split_file}, to be placed in {folder})",
    )
    splits = read_json(split_path, f"{name} split file")
    try:
        named: dict[int, set[str]] = {}
        items: dict[str, list[Item]] = {}
        for split in ("train", "val", "test"):
            items[split] = []
            for relpath, label, classname in splits[split]:
                items[split].append(Item(str(relpath), int(label)))
                named.setdefault(int(label), set()).add(str(classname))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f'{split_path} must hold {{"train"|"val"|"test": [[relpath, label, classname], ...]}}'
            f": {type(error).__name__}: {error}"
        ) from None
    names = _class_names(named, str(split_path))
    if name == "eurosat":
        names = [EUROSAT_NAMES.get(n, n) for n in names]
    return Dataset(
        name,
        image_root,
        names,
        DATASET_TEMPLATES[name],
        items["train"],
        items["val"],
        items["test"],
    )


def _read_aircraft(folder: Path) -> Dataset:
    image_root = _require_dir(folder / "images", "fgvc_aircraft image folder")
    variants_path = _require_file(folder / "variants.txt", "fgvc_aircraft variants.txt")
    names = [line.strip() for line in variants_path.read_text().splitlines() if line.strip()]
    index = {n: i for i, n in enumerate(names)}
    splits = {}
    for split in ("train", "val", "test"):
        path = _require_file(folder / f"images_variant_{split}.txt", f"fgvc_aircraft {split} list")
        items = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise ValueError(f"{path}:{number}: variant {variant!r} is not in {variants_path}")
            items.append(Item(f"{image_id}.jpg", index[variant]))
        splits[split] = items
    return Dataset(
        "fgvc_aircraft",
        image_root,
        names,
        DATASET_TEMPLATES["fgvc_aircraft"],
        splits["train"],
        splits["val"],
        splits["test"],
    )


def _images_in(folder: Path) -> list[str]:
    """Image file names in ``folder``, sorted, hidden files skipped."""
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if entry.is_file()
        and not entry.name.startswith(".")
        and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
    )


def _class_folders(folder: Path) -> list[str]:
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if entry.is_dir() and not entry.name.startswith(".")
    )


def _read_imagenet(folder: Path) -> Dataset:
    images = _require_dir(folder / "images", "imagenet image folder")
    classnames_path = _require_file(folder / "classnames.txt", "imagenet classnames.txt")
    by_wnid = {}
    for line in classnames_path.read_text().splitlines():
        wnid, _, classname = line.strip().partition(" ")
        if wnid:
            by_wnid[wnid] = classname.strip()
    wnids = sorted(by_wnid)
    splits = {}
    for split, subfolder in (("train", "train"), ("test", "val")):
        root = _require_dir(images / subfolder, f"imagenet {subfolder} folder")
        items = []
        for label, wnid in enumerate(wnids):
            if (root / wnid).is_dir():
                items += [Item(f"{subfolder}/{wnid}/{f}", label) for f in _images_in(root / wnid)]
        splits[split] = items
    names = [by_wnid[w] for w in wnids]
    return Dataset(
        "imagenet",
        images,
        names,
        DATASET_TEMPLATES["imagenet"],
        splits["train"],
        None,
        splits["test"],
    )


def _split_per_class(items: list[Item], class_names: list[str]) -> tuple[list[Item], ...]:
    """CoOp's 50/20/30 train/val/test split per class, shuffled with a fixed seed per class so
    that the test split never depends on the run's seed."""
    by_label: dict[int, list[Item]] = {}
    for item in items:
        by_label.setdefault(item.label, []).append(item)
    train, val, test = [], [], []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda item: item.path)
        random.Random(f"fma_fast:split:{class_names[label]}").shuffle(group)
        n_train = max(1, round(len(group) * SPLIT_FRACTIONS[0]))
        n_val = round(len(group) * SPLIT_FRACTIONS[1])
        train += group[:n_train]
        val += group[n_train : n_train + n_val]
        test += group[n_train + n_val :]
    return train, val, test


def _refuse_empty_classes(root: Path, names: list[str], allow_empty: bool) -> None:
    empty = [name for name in names if not _images_in(root / name)]
    if empty and not allow_empty:
        raise ValueError(
            f"{root}: class folder(s) without images: {', '.join(empty[:5])}; pass "
            "allow_empty_classes=True (--allow-empty-classes) to keep them as classes with no "
            "training images"
        )


def _read_folder(folder: Path, allow_empty: bool) -> Dataset:
    """``folder/{train,val,test}/<class>/*`` (val optional), or ``folder/<class>/*`` that is
    split 50/20/30 per class."""
    if (folder / "train").is_dir():
        names = _class_folders(folder / "train")
        _refuse_empty_classes(folder / "train", names, allow_empty)
        splits = {}
        for split in ("train", "val", "test"):
            root = folder / split
            if not root.is_dir():
                if split == "test":
                    raise FileNotFoundError(f"{folder} has train/ but no test/ folder: {root}")
                splits[split] = None
                continue
            unknown = sorted(set(_class_folders(root)) - set(names))
            if unknown:
                raise ValueError(f"{root} has classes not in train/: {unknown[:5]}")
            splits[split] = [
                Item(f"{split}/{n}/{f}", label)
                for label, n in enumerate(names)
                if (root / n).is_dir()
                for f in _images_in(root / n)
            ]
        train, val, test = splits["train"], splits["val"], splits["test"]
    else:
        names = _class_folders(folder)
        _refuse_empty_classes(folder, names, allow_empty)
        items = [
            Item(f"{n}/{f}", label) for label, n in enumerate(names) for f in _images_in(folder / n)
        ]
        if not items:
            raise ValueError(
                f"{folder} holds no class folders with images (expected <class>/<image> or "
                "train/<class>/<image>, test/<class>/<image>)"
            )
        train, val, test = _split_per_class(items, names)
    return Dataset(folder.name, folder, names, DEFAULT_TEMPLATE, train, val, test)


def _read_csv_rows(path: Path, allow_unnamed: bool) -> tuple[list[Item], dict[int, set[str]]]:
    items, named = [], {}
    with open(path, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) not in (2, 3):
                raise ValueError(f"{path}:{number}: expected path,label[,classname], got {row}")
            try:
                label = int(row[1])
            except ValueError:
                if number == 1:  # a header line
                    continue
                raise ValueError(f"{path}:{number}: label {row[1]!r} is not an integer") from None
            if label < 0:
                raise ValueError(f"{path}:{number}: label {label} is negative")
            if len(row) == 2 and not allow_unnamed:
                raise ValueError(
                    f"{path}:{number}: no class name (expected path,label,classname): the "
                    "prompts need names; pass allow_unnamed=True (--allow-unnamed-classes) to "
                    "name classes by their label numbers"
                )
            items.append(Item(row[0].strip(), label))
            named.setdefault(label, set()).add(row[2].strip() if len(row) == 3 else str(label))
    return items, named


def _read_csv(path: Path, allow_unnamed: bool) -> Dataset:
    """One CSV (split 50/20/30 per class) or a folder with train.csv, test.csv [, val.csv]."""
    if path.is_dir():
        splits, named = {}, {}
        for split in ("train", "val", "test"):
            file = path / f"{split}.csv"
            if not file.is_file():
                if split == "test":
                    raise FileNotFoundError(f"{path} has train.csv but no test.csv")
                splits[split] = None
                continue
            splits[split], found = _read_csv_rows(file, allow_unnamed)
            for label, names in found.items():
                named.setdefault(label, set()).update(names)
        names = _class_names(named, str(path))
        return Dataset(
            path.name, path, names, DEFAULT_TEMPLATE, splits["train"], splits["val"], splits["test"]
        )
    items, named = _read_csv_rows(path, allow_unnamed)
    names = _class_names(named, str(path))
    train, val, test = _split_per_class(items, names)
    return Dataset(path.stem, path.parent, names, DEFAULT_TEMPLATE, train, val, test)


def load_dataset(
    dataset: str | os.PathLike,
    root: str | os.PathLike | None = None,
    *,
    allow_empty_classes: bool = False,
    allow_unnamed: bool = False,
) -> Dataset:
    """One of the 11 few-shot datasets under ``root`` by name (``oxford_pets``, ``OxfordPets``,
    ``fgvc_aircraft`` ...), or a path (under ``root`` or as given) to a class-per-folder
    directory, a CSV list (path,label,classname) or a folder with train/val/test CSVs.

    A folder or CSV without its own splits is split 50/20/30 per class (CoOp's fractions,
    shuffled with a fixed seed per class name, so the test split never depends on the run's
    seed). A class folder without images, or a CSV row without a class name, is refused unless
    ``allow_empty_classes`` / ``allow_unnamed`` say to keep it."""
    name = canonical_name(str(dataset))
    base = Path(root) if root is not None else Path(".")
    if name is not None:
        layout = LAYOUTS[name]
        folder = _require_dir(base / layout.folder, f"dataset folder for {name}")
        if name == "imagenet":
            return _read_imagenet(folder)
        if name == "fgvc_aircraft":
            return _read_aircraft(folder)
        return _read_zhou(name, folder, layout)
    candidates = [base / dataset, Path(dataset)] if root is not None else [Path(dataset)]
    for path in candidates:
        if path.is_file() and path.suffix.lower() == ".csv":
            return _read_csv(path, allow_unnamed)
        if path.is_dir():
            if (path / "train.csv").is_file():
                return _read_csv(path, allow_unnamed)
            return _read_folder(path, allow_empty_classes)
    raise ValueError(
        f"unknown dataset {str(dataset)!r}: use one of {', '.join(DATASET_NAMES)} (under --root), "
        "or a path to a class-per-folder directory or a CSV file "
        f"(looked for {', '.join(str(p) for p in candidates)})"
    )


def few_shot(dataset: Dataset, shots: int, seed: int) -> tuple[list[Item], list[Item]]:
    """K random training images per class and min(K, 4) validation images per class, seeded
    (:func:`fma_fast.core.protocol.draw_split`; a class with fewer images gives all it has).

    Without a validation split the validation shots come from the training images left over,
    so M is never chosen on test images (CoOp reuses ImageNet's test set as its val).
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be an int >= 1, got {shots!r}")
    val_pool = dataset.val
    train_rows, val_rows, from_train = draw_split(
        [item.label for item in dataset.train],
        None if val_pool is None else [item.label for item in val_pool],
        shots, seed, strict=False,
    )
    train = [dataset.train[i] for i in train_rows.tolist()]
    val = [(dataset.train if from_train else val_pool)[i] for i in val_rows.tolist()]
    return train, val
