"""Datasets as in-memory float tensors in [0, 1], plus deterministic splits and k-fold.

Everything here fits in memory (Fashion-MNIST is 47 MB as uint8), so training batches by
indexing tensors instead of a per-sample DataLoader + PIL transform (2-3x faster).
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fcexport.errors import FcxError
from fcexport.preprocess import IMAGE_SUFFIXES, load_image

TORCHVISION_SETS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "kmnist": "KMNIST"}
KNOWN_CLASS_SETS = (*TORCHVISION_SETS, "digits")  # names `--classes` accepts for their class names
# Sets without an official test split get this deterministic share held out as "test".
HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0


@dataclass
class Split:
    """Images (N, 1, H, W) float32 in [0, 1] and integer labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "Split":
        index = torch.as_tensor(index, dtype=torch.long)
        return Split(self.images[index], self.labels[index])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    class_names: list[str]

    @property
    def input_shape(self) -> list[int]:
        return list(self.train.images.shape[1:])


def known_class_names(name: str) -> list[str] | None:
    """Class names of a built-in dataset, without loading it; None for other names."""
    key = name.lower()
    if key == "digits":
        return [str(i) for i in range(10)]
    if key in TORCHVISION_SETS:
        import torchvision.datasets as tvd

        return [str(c) for c in getattr(tvd, TORCHVISION_SETS[key]).classes]
    return None


def default_data_root() -> str:
    return os.environ.get("FCX_DATA_ROOT", "data")


def load_dataset(name: str, root: str | None = None, image_size: int = 28, download: bool = True,
                 test_data: str | None = None, class_names: list[str] | None = None,
                 label_column: str | None = None) -> Dataset:
    """Load a dataset by name (`fashion-mnist`, `mnist`, `kmnist`, `digits`) or path (CSV file, image folder).

    torchvision sets are downloaded into `root` when missing, unless `download=False`. For a CSV file
    or a folder, `test_data` (the same kind) is the test set instead of a held-out 20%, and
    `class_names` names the classes (CSV labels 0..N-1, or the folders in sorted order).
    """
    root = root or default_data_root()
    key = name.lower()
    if key in TORCHVISION_SETS or key == "digits":
        if test_data is not None or class_names is not None or label_column is not None:
            raise FcxError(f"{name} has its own test split and class names; a test set and class names go with a CSV file or a folder")
        return _load_torchvision(key, Path(root), download) if key != "digits" else _load_digits()
    path = Path(name)
    if label_column is not None and path.suffix.lower() != ".csv":
        raise FcxError(f"{name}: a label column is for CSV data; {name} is not a .csv file")
    if path.is_dir():
        dataset = _load_image_folder(path, image_size, Path(test_data) if test_data else None)
    elif path.suffix.lower() == ".csv":
        dataset = _load_csv(path, Path(test_data) if test_data else None, label_column)
    else:
        raise FcxError(
            f"unknown dataset '{name}': use fashion-mnist, mnist, kmnist, digits, a .csv file or a folder of class sub-folders"
        )
    if class_names is not None:
        if len(class_names) != len(dataset.class_names):
            raise FcxError(f"{name}: {len(class_names)} class names given for {len(dataset.class_names)} classes")
        dataset.class_names = list(class_names)
    return dataset


def normalization_stats(images: torch.Tensor) -> tuple[float, float]:
    """Scalar mean and std of the training pixels, used by the model's Normalize layer."""
    mean = float(images.mean())
    std = float(images.std())
    return mean, max(std, 1e-6)


# ---- splits -----------------------------------------------------------------------------


def permutation(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def train_val_split(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Deterministic shuffle-split: the same seed always yields the same validation images."""
    if val_fraction <= 0:
        return split, None
    order = permutation(len(split), seed)
    n_val = max(1, int(round(len(split) * val_fraction)))
    if n_val >= len(split):
        raise FcxError(f"validation split {val_fraction} leaves no training images ({len(split)} in total)")
    return split.subset(order[n_val:]), split.subset(order[:n_val])


def kfold_splits(split: Split, folds: int, seed: int) -> list[tuple[Split, Split]]:
    """K shuffled folds (scikit-learn's KFold): each image is validated on exactly once."""
    from sklearn.model_selection import KFold

    if folds < 2 or folds > len(split):
        raise FcxError(f"folds must be between 2 and the number of training images ({len(split)}), got {folds}")
    kfold = KFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(split.subset(tr), split.subset(va)) for tr, va in kfold.split(np.zeros(len(split)))]


def _holdout(images: torch.Tensor, labels: torch.Tensor) -> tuple[Split, Split]:
    order = permutation(len(labels), HOLDOUT_SEED)
    n_test = max(1, int(round(len(labels) * HOLDOUT_FRACTION)))
    full = Split(images, labels)
    return full.subset(order[n_test:]), full.subset(order[:n_test])


# ---- loaders ----------------------------------------------------------------------------


def dataset_source(name: str) -> str:
    """How to find the data again later (fcx verify): a built-in name, or an absolute path."""
    return name.lower() if name.lower() in (*TORCHVISION_SETS, "digits") else str(Path(name).resolve())


def _load_torchvision(key: str, root: Path, download: bool) -> Dataset:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION_SETS[key])
    raw = root / cls.__name__ / "raw"
    _extract_downloaded_archives(raw)
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError as exc:
        if not download:
            raise FcxError(f"{cls.__name__} is not under {raw}/", hint="data-root") from exc
        train, test = _download(cls, root, raw)
    return Dataset(
        name=key,
        train=_from_uint8(train.data, train.targets),
        test=_from_uint8(test.data, test.targets),
        class_names=[str(c) for c in cls.classes],
    )


def _extract_downloaded_archives(raw: Path) -> None:
    """The IDX files are published gzipped; torchvision only reads them unpacked. Unpack what is there."""
    import gzip
    import shutil

    for archive in raw.glob("*-ubyte.gz") if raw.is_dir() else []:
        target = archive.with_suffix("")
        if not target.exists():
            try:
                with gzip.open(archive, "rb") as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as exc:
                target.unlink(missing_ok=True)
                raise FcxError(f"{archive}: cannot unpack ({type(exc).__name__}: {exc}); download it again") from exc


def _download(cls, root: Path, raw: Path):
    # Downloads hang forever on a blackholed network; a short socket timeout turns that into an error.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    made = [p for p in (raw, *raw.parents) if not p.exists()]  # deepest first: what the download may create
    try:
        return cls(str(root), train=True, download=True), cls(str(root), train=False, download=True)
    except Exception as exc:  # network errors come in many types (URLError, timeout, HTTPError)
        for folder in made:  # leave nothing behind: only folders this attempt made, if empty
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise FcxError(
            f"{cls.__name__} is not under {raw}/ and could not be downloaded ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}). "
            f"Put the IDX files (train-images-idx3-ubyte, ...) in {raw}/", hint="offline-data"
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


def _from_uint8(images: torch.Tensor, labels) -> Split:
    images = images.to(torch.float32).div_(255.0)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    return Split(images.contiguous(), torch.as_tensor(labels, dtype=torch.long))


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    train, test = _holdout(images, labels)
    return Dataset("digits", train, test, [str(int(c)) for c in bunch.target_names])


MAX_CSV_CLASSES = 1000


def _load_csv(path: Path, test_path: Path | None = None, label_column: str | None = None) -> Dataset:
    """Label column (integer class labels or names) then pixels (0-255, or 0-1 floats), with or without a header
    row (Kaggle layout); `label_column` (its 1-based number, or its name in the header) when it is not the first.
    With `test_path`, that CSV is the test set; else 20% are held out."""
    images, raw_labels = _read_csv(path, label_column)
    test_images, test_raw = _read_csv(test_path, label_column) if test_path is not None else (None, None)
    if test_images is not None and test_images.shape[1:] != images.shape[1:]:
        raise FcxError(f"{test_path}: images are {list(test_images.shape[1:])}, the training CSV's are {list(images.shape[1:])}")
    # classes are the label values present (in either file), in order; labels become their indices
    if test_raw is not None and raw_labels.dtype.kind != test_raw.dtype.kind:  # names in one file, numbers in the other
        raw_labels, test_raw = raw_labels.astype(str), test_raw.astype(str)
    values = np.unique(np.concatenate([raw_labels, test_raw]) if test_raw is not None else raw_labels)
    if len(values) < 2:
        where = "the first column" if label_column is None else f"label column {label_column}"
        raise FcxError(f"{path}: {where} holds one value ({values[0]}) in every row, so it cannot be the label; "
                       "put the label column first, or name it", hint="label-column")
    labels = torch.from_numpy(np.searchsorted(values, raw_labels))
    if test_images is None:
        train, test = _holdout(images, labels)
    else:
        train, test = Split(images, labels), Split(test_images, torch.from_numpy(np.searchsorted(values, test_raw)))
    return Dataset(path.name, train, test, [str(v) for v in values])


MAX_CSV_LINE = 1 << 20  # 1 MB: a 1024x1024 image of 3-digit pixels; longer lines are refused before parsing


def _read_csv(path: Path, label_column: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """(images, labels) of one CSV; labels are integers, or strings when any label is not a number."""
    if not path.is_file():
        raise FcxError(f"{path}: file not found; pass an existing CSV file")
    column = _label_index(path, label_column)
    header, labels = _scan_csv(path, column)
    if len(labels) < 2:
        raise FcxError(f"{path}: needs at least 2 data rows, found {len(labels)}")
    columns = _columns(path, header)
    if column >= columns:
        raise FcxError(f"{path}: has {columns} columns, so there is no label column {column + 1}")
    try:
        pixels = np.loadtxt(path, delimiter=",", skiprows=header, usecols=[c for c in range(columns) if c != column],
                            dtype=np.float64, ndmin=2, encoding="utf-8-sig")
    except ValueError:
        _raise_first_bad_row(path, header)
        raise
    if not np.all(np.isfinite(pixels)):
        raise FcxError(f"{path}: contains NaN or infinite values")
    if label_column is None:
        _check_first_column_is_labels(path, labels, pixels[:, -1], columns)
    side = math.isqrt(pixels.shape[1])
    if side * side != pixels.shape[1] or side == 0:
        raise FcxError(f"{path}: {pixels.shape[1]} pixel columns is not a square image (e.g. 784 = 28x28)")
    if pixels.min() < 0 or pixels.max() > 255:
        raise FcxError(f"{path}: pixel values must lie in 0-255 (or 0-1), found {pixels.min()}..{pixels.max()}")
    scale = 1.0 if pixels.max() <= 1.0 else 255.0
    images = torch.tensor(pixels / scale, dtype=torch.float32).reshape(-1, 1, side, side)
    return images, _labels(path, labels)


def _label_index(path: Path, label_column: str | None) -> int:
    """The 0-based label column: `label_column` is its 1-based number or its name in the header row."""
    if label_column is None:
        return 0
    text = str(label_column).strip()
    if text.isdigit():
        if int(text) < 1:
            raise FcxError(f"label column numbers start at 1, got {text}")
        return int(text) - 1
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        cells = [c.strip().strip('"') for c in f.readline(MAX_CSV_LINE + 1).split(",")]
    if text not in cells:
        near = [c for c in cells if c.lower() == text.lower()] or [c for c in cells if c.lower() in LABEL_NAMES]
        raise FcxError(f"{path}: no column named '{text[:100]}' in its header row"
                       + (f" (did you mean '{near[0]}', column {cells.index(near[0]) + 1}?)" if near else
                          f" (it starts {', '.join(cells[:4])}, ...)")
                       + "; name the label column as the header does, or give its number (1 = the first)")
    return cells.index(text)


def _check_named_label(path: Path, column: int, header_line: str) -> None:
    """A label column given by the user while the header names another one `label` (or `class`, ...): a pixel
    column would be read as the label."""
    cells = [c.strip().strip('"') for c in header_line.split(",")]
    named = next((i for i, c in enumerate(cells) if c.lower() in LABEL_NAMES), None)
    if named is not None and named != column:
        raise FcxError(f"{path}: label column {column + 1} ('{cells[column][:40]}' in the header) was given, but column "
                       f"{named + 1} is named '{cells[named][:40]}'; give that one (its name or {named + 1})")


def _scan_csv(path: Path, column: int = 0) -> tuple[int, list[str]]:
    """(header rows, label cells of `column`), reading line by line with a bounded line length. The first row is a
    header only when its pixel cells are not numbers (a class name as a label is data)."""
    labels, header = [], 0
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: a byte-order mark is dropped
            for number, line in enumerate(iter(lambda: f.readline(MAX_CSV_LINE + 1), ""), start=1):
                if len(line) > MAX_CSV_LINE:
                    raise FcxError(f"{path}: line {number} is longer than {MAX_CSV_LINE:,} characters; is this a CSV of pixels?")
                if not line.strip():
                    continue
                cells = line.split(",")
                label = cells[column] if column < len(cells) else ""
                rest = ",".join(cells[:column] + cells[column + 1 :])
                if number == 1 and not _is_numeric_row(rest):
                    header = 1
                    if column == 0:
                        _check_label_first(path, line)
                    else:
                        _check_named_label(path, column, line)
                    continue
                labels.append(label.strip())
    except (UnicodeDecodeError, OSError) as exc:
        raise FcxError(f"{path}: cannot read as a text CSV ({type(exc).__name__}); expected a label column then pixel columns") from exc
    if not labels and not header:
        raise FcxError(f"{path}: the file is empty; expected a label column then pixel columns")
    return header, labels


def _check_first_column_is_labels(path: Path, labels: list[str], last: np.ndarray, columns: int) -> None:
    """A CSV without a header whose first column varies like pixels while its last holds a few whole numbers (the
    label written last): training on it would silently learn nonsense."""
    distinct, rows = len(set(labels)), len(labels)
    if 1 < distinct <= max(20, rows // 2):
        return  # it can be the label
    last_distinct = len(np.unique(last))
    if np.all(last == np.round(last)) and 2 <= last_distinct <= min(MAX_CSV_CLASSES, max(2, rows // 4)):
        first = "one value in every row" if distinct == 1 else f"{distinct} different values in {rows} rows, like pixels"
        raise FcxError(f"{path}: the first column has {first}, and the last (column {columns}) "
                       f"{last_distinct} whole numbers, like labels; fcx reads the label from the first column: move the label "
                       f"column to the front, or name it", hint="label-column")


LABEL_NAMES = ("label", "labels", "class", "target", "y", "category")


def _check_label_first(path: Path, header_line: str) -> None:
    """A header that names its label column elsewhere than first: training would read a pixel as the label."""
    cells = [c.strip().strip('"').lower() for c in header_line.split(",")]
    named = next((i for i, c in enumerate(cells) if c in LABEL_NAMES), None)
    if named not in (None, 0):
        raise FcxError(f"{path}: the label column '{header_line.split(',')[named].strip()}' is column {named + 1} of "
                       f"{len(cells)}, but fcx reads the label from the first column; move that column to the front, "
                       f"or name it", hint="label-column")


def _columns(path: Path, header: int) -> int:
    with open(path, encoding="utf-8-sig") as f:
        for _ in range(header):
            f.readline(MAX_CSV_LINE + 1)
        return len(f.readline(MAX_CSV_LINE + 1).split(","))


def _labels(path: Path, cells: list[str]) -> np.ndarray:
    """Integer labels 0..MAX_CSV_CLASSES-1, or class names when any label is not a number."""
    try:
        values = np.array([float(c) for c in cells])
    except ValueError:
        names = np.array(cells)
        if len(np.unique(names)) > MAX_CSV_CLASSES:
            raise FcxError(f"{path}: more than {MAX_CSV_CLASSES} distinct labels") from None
        return names
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values != np.round(values)) or values.max() >= MAX_CSV_CLASSES:
        raise FcxError(f"{path}: the first column must hold integer class labels 0..{MAX_CSV_CLASSES - 1} (or class names)")
    return values.astype(np.int64)


def _is_numeric_row(line: str) -> bool:
    try:
        [float(v) for v in line.strip().split(",")]
        return True
    except ValueError:
        return False


def _raise_first_bad_row(path: Path, header: int) -> None:
    width = None
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if number <= header or not line.strip():
                continue
            cells = line.strip().split(",")
            if width is None:
                width = len(cells)
            if len(cells) != width:
                raise FcxError(f"{path}: line {number} has {len(cells)} columns, expected {width}; fix or remove that row")
            if not _is_numeric_row(line.partition(",")[2]):
                raise FcxError(f"{path}: line {number} holds a non-numeric pixel value; fix or remove that row")


def _load_image_folder(folder: Path, image_size: int, test_folder: Path | None = None) -> Dataset:
    """A folder of class sub-folders of images, each preprocessed exactly as `fcx predict` does; with
    `test_folder` (the same class sub-folders), that is the test set, else 20% are held out."""
    class_names, images, labels = _read_image_folder(folder, image_size)
    if test_folder is None:
        train, test = _holdout(images, labels)
    else:
        test_names, test_images, test_labels = _read_image_folder(test_folder, image_size)
        if test_names != class_names:
            raise FcxError(f"{test_folder}: class folders {test_names} differ from the training folder's {class_names}")
        train, test = Split(images, labels), Split(test_images, test_labels)
    return Dataset(folder.name, train, test, class_names)


def _read_image_folder(folder: Path, image_size: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    if not folder.is_dir():
        raise FcxError(f"{folder}: folder not found")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for index, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(load_image(file, (image_size, image_size)))
                labels.append(index)
    if len(class_dirs) < 2 or len(images) < 2:
        raise FcxError(
            f"{folder}: expected at least 2 class sub-folders holding images ({', '.join(IMAGE_SUFFIXES)})"
        )
    stacked = torch.from_numpy(np.stack(images)).unsqueeze(1)
    return [d.name for d in class_dirs], stacked, torch.tensor(labels, dtype=torch.long)
