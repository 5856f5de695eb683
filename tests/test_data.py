"""Dataset loaders, splits and k-fold, on files made here."""

import numpy as np
import pytest
import torch

from fcexport.data import kfold_splits, load_dataset, normalization_stats, train_val_split
from fcexport.errors import FcxError


def test_idx_files_load_through_torchvision(idx_root):
    ds = load_dataset("fashion-mnist", str(idx_root))
    assert ds.train.images.shape == (300, 1, 28, 28) and ds.test.images.shape == (100, 1, 28, 28)
    assert ds.train.images.dtype == torch.float32 and 0 <= ds.train.images.min() and ds.train.images.max() <= 1
    assert ds.class_names[0] == "T-shirt/top" and len(ds.class_names) == 10
    assert ds.train.labels.tolist()[:3] == [0, 1, 2]


def test_missing_torchvision_data_without_download_names_the_folder(tmp_path):
    with pytest.raises(FcxError, match=r"FashionMNIST/raw"):
        load_dataset("fashion-mnist", str(tmp_path), download=False)


def test_digits_are_8x8_with_a_fixed_holdout():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.input_shape == [1, 8, 8] and len(a.class_names) == 10
    assert len(a.test) == round(1797 * 0.2)
    assert torch.equal(a.test.labels, b.test.labels)


def test_csv_with_header(csv_file):
    ds = load_dataset(str(csv_file))
    assert ds.input_shape == [1, 28, 28]
    assert ds.class_names == ["0", "1", "2", "3"]
    assert len(ds.train) + len(ds.test) == 120


def test_csv_without_header_and_sparse_labels(tmp_path):
    rows = [f"{lab}," + ",".join(["255"] * 16) for lab in (3, 7, 3, 7, 3, 7)]
    path = tmp_path / "tiny.csv"
    path.write_text("\n".join(rows))
    ds = load_dataset(str(path))
    assert ds.input_shape == [1, 4, 4] and ds.class_names == ["3", "7"]
    assert float(ds.train.images.max()) == 1.0


@pytest.mark.parametrize(
    "content, message",
    [
        ("label,p1,p2,p3,p4\n1,0,0,0,0\n2,0,0,0\n", "line 3 has 4 columns, expected 5"),
        ("1,0,0,0,0\n2,0,x,0,0\n", "line 2 holds a non-numeric pixel value"),
        ("1,0,0,0\n2,0,0,0\n", "not a square image"),
        ("1,0,0,0,999\n2,0,0,0,0\n", "pixel values must lie in 0-255"),
        ("", "empty"),
        # label last (a common export layout): the header says so, or the first column is one value throughout
        ("p1,p2,p3,p4,label\n0,0,0,0,1\n0,0,0,0,2\n", "the label column 'label' is column 5 of 5"),
        ("0,10,20,30,1\n0,40,50,60,2\n0,70,80,90,1\n", "the first column has one value in every row, and the last \\(column 5\\)"),
    ],
)
def test_bad_csv_names_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(FcxError, match=message):
        load_dataset(str(path))


def test_image_folder(image_folder):
    ds = load_dataset(str(image_folder))
    assert ds.class_names == ["class0", "class1", "class2"]
    assert ds.input_shape == [1, 28, 28] and len(ds.train) + len(ds.test) == 60


def test_unknown_dataset_is_a_user_error():
    with pytest.raises(FcxError, match="unknown dataset"):
        load_dataset("imagenet")


def test_val_split_is_deterministic_and_disjoint():
    ds = load_dataset("digits")
    tr1, va1 = train_val_split(ds.train, 0.1, seed=5)
    tr2, va2 = train_val_split(ds.train, 0.1, seed=5)
    _, va3 = train_val_split(ds.train, 0.1, seed=6)
    assert torch.equal(va1.images, va2.images) and not torch.equal(va1.images, va3.images)
    assert len(tr1) + len(va1) == len(ds.train)


def test_kfold_validates_every_image_once():
    ds = load_dataset("digits")
    folds = kfold_splits(ds.train, 4, seed=0)
    assert len(folds) == 4
    assert sum(len(v) for _, v in folds) == len(ds.train)
    with pytest.raises(FcxError):
        kfold_splits(ds.train, 1, seed=0)


def test_normalization_stats_match_numpy():
    x = torch.rand(50, 1, 4, 4)
    mean, std = normalization_stats(x)
    assert mean == pytest.approx(float(np.mean(x.numpy())), rel=1e-5)
    assert std == pytest.approx(float(np.std(x.numpy(), ddof=1)), rel=1e-4)
