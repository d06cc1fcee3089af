"""Data layer: MedMNIST .npz and image-folder I/O, validation messages, atomic writes, synthetic data."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import stat
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from salm_fast.data import (
    DataError, Dataset, Split, UnwritableOutputError, atomic_path, atomic_write_bytes, atomic_write_json,
    load_dataset, load_image_folder, load_medmnist, make_synthetic, medmnist_filename, parse_medmnist_filename,
    save_image_folder, save_medmnist, split_from_tensors, to_uint8_images,
)


def _small(channels: int = 1, size: int = 28, seed: int = 0, n_classes: int = 2) -> Dataset:
    return make_synthetic(24, 6, 8, size=size, channels=channels, n_classes=n_classes, seed=seed)


def _assert_same(a: Dataset, b: Dataset) -> None:
    assert list(a.splits) == list(b.splits)
    for name in a.splits:
        assert a[name].images.dtype == b[name].images.dtype == np.uint8
        np.testing.assert_array_equal(a[name].images, b[name].images)
        np.testing.assert_array_equal(a[name].labels, b[name].labels)
    assert a.n_classes == b.n_classes


def _write_npz(path, **arrays) -> str:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


def _medmnist_arrays(n=(6, 2, 3), size=8, rgb=False):
    rng = np.random.default_rng(0)
    out = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, size, size, 3) if rgb else (k, size, size)
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(k) % 2).astype(np.uint8).reshape(k, 1)
    return out


def _files(directory) -> list[str]:
    return sorted(os.listdir(directory))


# --- MedMNIST .npz ------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_npz_round_trip_is_bit_exact(tmp_path, channels):
    ds = _small(channels)
    path = save_medmnist(ds, tmp_path)
    assert path.name == "synthetic.npz"
    with np.load(path, allow_pickle=False) as raw:
        assert raw.files == ["train_images", "val_images", "test_images", "train_labels", "val_labels",
                             "test_labels"]
        assert raw["train_labels"].dtype == np.uint8 and raw["train_labels"].shape == (24, 1)
        assert raw["train_images"].shape == ((24, 28, 28, 3) if channels == 3 else (24, 28, 28))
    back = load_medmnist(path)
    _assert_same(ds, back)
    assert back.name == "synthetic" and back.channels == channels and back.size == 28


def test_npz_keeps_the_input_label_dtype_and_accepts_1d_labels(tmp_path):
    arrays = _medmnist_arrays()
    arrays = {k: (v.astype(np.int64)[:, 0] if k.endswith("labels") else v) for k, v in arrays.items()}
    ds = load_medmnist(_write_npz(tmp_path / "mine.npz", **arrays))
    assert ds.label_dtype == "int64" and ds["train"].labels.shape == (6, 1)
    out = save_medmnist(ds, tmp_path / "out.npz")
    with np.load(out) as raw:
        assert raw["val_labels"].dtype == np.int64 and raw["val_labels"].shape == (2, 1)


def test_medmnist_file_names(tmp_path):
    assert parse_medmnist_filename("a/breastmnist_64.npz") == ("breastmnist", 64)
    assert parse_medmnist_filename("breastmnist.npz") == ("breastmnist", None)
    assert parse_medmnist_filename("dataset.protected.npz") == ("dataset.protected", None)
    assert parse_medmnist_filename("scan_2024.npz") == ("scan_2024", None)
    assert medmnist_filename("pathmnist", 28) == "pathmnist.npz"
    assert medmnist_filename("pathmnist", 224) == "pathmnist_224.npz"
    ds = _small(size=32)
    assert save_medmnist(ds, tmp_path).name == "synthetic_32.npz"
    with pytest.raises(DataError, match="file name means 64 x 64 px.*are 32 x 32"):
        save_medmnist(ds, tmp_path / "breastmnist_64.npz")
    assert _files(tmp_path) == ["synthetic_32.npz"]


def test_npz_size_from_file_name_must_match_images(tmp_path):
    arrays = _medmnist_arrays(size=28)
    with pytest.raises(DataError, match=r"breastmnist_64\.npz: the file name means 64 x 64 px.*28 x 28"):
        load_medmnist(_write_npz(tmp_path / "breastmnist_64.npz", **arrays))
    with pytest.raises(DataError, match=r"means 28 x 28 px .* 8 x 8"):  # a known flag without suffix is 28 px
        load_medmnist(_write_npz(tmp_path / "breastmnist.npz", **_medmnist_arrays(size=8)))
    assert load_medmnist(_write_npz(tmp_path / "mine_64.npz", **_medmnist_arrays(size=64))).size == 64


class _Sentinel:
    """Unpickling this calls _mark_unpickled: proves whether a loader ever unpickled it."""

    def __reduce__(self):
        return (_mark_unpickled, ())


_UNPICKLED: list[bool] = []


def _mark_unpickled():
    _UNPICKLED.append(True)
    return "unpickled"


def test_pickled_npz_is_rejected_without_unpickling(tmp_path):
    arrays = _medmnist_arrays()
    path = _write_npz(tmp_path / "evil.npz", obj=np.array([{"a": 1}], dtype=object), **arrays)
    with pytest.raises(DataError, match=r"evil\.npz: 'obj' is a pickled object array; refused"):
        load_medmnist(path)
    arrays["train_labels"] = np.array([_Sentinel()] * 6, dtype=object).reshape(6, 1)
    path = _write_npz(tmp_path / "evil2.npz", **arrays)
    _UNPICKLED.clear()
    with pytest.raises(DataError, match="'train_labels' is a pickled object array"):
        load_medmnist(path)
    assert _UNPICKLED == []
    (tmp_path / "p.npz").write_bytes(pickle.dumps(_Sentinel()))  # a bare pickle file
    with pytest.raises(DataError, match="not a readable .npz archive"):
        load_medmnist(tmp_path / "p.npz")
    assert _UNPICKLED == []


def _replace(**changes):
    arrays = _medmnist_arrays()
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    return arrays


BAD_NPZ = {
    "missing labels": (_replace(train_labels=None), r"missing key\(s\) train_labels"),
    "missing a split pair": (_replace(test_images=None), r"missing key\(s\) test_images"),
    "no train": (_replace(train_images=None, train_labels=None), r"missing key\(s\) train_images, train_labels"),
    "unexpected key": (_replace(train_ids=np.arange(6)), "unexpected key.*train_ids"),
    "float images": (_replace(train_images=np.zeros((6, 8, 8), np.float32)),
                     "train_images: has dtype float32; images must be uint8"),
    "float images with NaN": (_replace(val_images=np.full((2, 8, 8), np.nan)),
                              "val_images: has dtype float64; images must be uint8"),
    "flat images": (_replace(train_images=np.zeros((6, 64), np.uint8)), r"train_images: has shape \(6, 64\)"),
    "volumes": (_replace(train_images=np.zeros((6, 8, 8, 8), np.uint8)), "3-D volumes are not supported"),
    "empty split": (_replace(val_images=np.zeros((0, 8, 8), np.uint8), val_labels=np.zeros((0, 1), np.uint8)),
                    "val_images: is empty"),
    "count mismatch": (_replace(test_labels=np.zeros((2, 1), np.uint8)),
                       "test_labels: has 2 labels but there are 3 images"),
    "float labels": (_replace(train_labels=np.zeros((6, 1), np.float32)),
                     "train_labels: has dtype float32; labels must be integer"),
    "bool labels": (_replace(train_labels=np.zeros((6, 1), bool)), "labels must be integer"),
    "negative labels": (_replace(train_labels=np.array([[0], [1], [-1], [0], [1], [0]])), "negative label -1"),
    "multi-label": (_replace(train_labels=np.zeros((6, 3), np.uint8)), r"\(N x L, a multi-label task\)"),
    "bad label rank": (_replace(train_labels=np.zeros((6, 1, 1), np.uint8)), "expected N x 1"),
    "H/W differ": (_replace(val_images=np.zeros((2, 9, 9), np.uint8)),
                   "val_images are 9 x 9 grayscale but train_images are 8 x 8 grayscale"),
    "gray vs RGB": (_replace(test_images=np.zeros((3, 8, 8, 3), np.uint8)),
                    "test_images are 8 x 8 RGB but train_images are 8 x 8 grayscale"),
    "one class": (_replace(**{f"{s}_labels": np.zeros((n, 1), np.uint8) for s, n in
                              (("train", 6), ("val", 2), ("test", 3))}), "needs at least 2 classes"),
}


@pytest.mark.parametrize("case", list(BAD_NPZ))
def test_bad_npz_is_rejected_with_a_one_line_message(tmp_path, case):
    arrays, message = BAD_NPZ[case]
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as info:
        load_medmnist(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(path)
    assert isinstance(info.value, ValueError)


def test_unreadable_npz_files(tmp_path):
    with pytest.raises(DataError, match="missing.npz: no such file"):
        load_medmnist(tmp_path / "missing.npz")
    with pytest.raises(DataError, match="is a directory"):
        load_medmnist(tmp_path)
    (tmp_path / "text.npz").write_text("hello, not a zip\n")
    with pytest.raises(DataError, match=r"text\.npz: not a readable \.npz archive"):
        load_medmnist(tmp_path / "text.npz")
    np.save(tmp_path / "one.npy", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="single .npy array"):
        load_medmnist(tmp_path / "one.npy")
    with zipfile.ZipFile(tmp_path / "zip.npz", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(DataError, match="'readme.txt' is not a .npy array"):
        load_medmnist(tmp_path / "zip.npz")
    good = save_medmnist(_small(), tmp_path / "good.npz")
    data = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.npz: "):
        load_medmnist(tmp_path / "cut.npz")


# --- medmnist's own dataset classes ---------------------------------------------------------

def _medmnist_class(name: str):
    with contextlib.redirect_stdout(io.StringIO()):  # medmnist's __init__ prints when pandas is missing
        module = pytest.importorskip("medmnist.dataset", reason="medmnist is not installed (optional)")
    return getattr(module, name)


@pytest.mark.parametrize("cls_name, flag, sizes, channels, n_classes, size", [
    ("BreastMNIST", "breastmnist", (546, 78, 156), 1, 2, 28),
    ("BreastMNIST", "breastmnist", (546, 78, 156), 1, 2, 64),
    ("RetinaMNIST", "retinamnist", (1080, 120, 400), 3, 5, 28),
])
def test_saved_file_loads_with_medmnist_classes(tmp_path, cls_name, flag, sizes, channels, n_classes, size):
    cls = _medmnist_class(cls_name)
    syn = make_synthetic(*sizes, size=size, channels=channels, n_classes=n_classes, seed=3)
    ds = Dataset(flag, syn.splits, n_classes)
    path = save_medmnist(ds, tmp_path)
    assert path.name == medmnist_filename(flag, size)
    for split in ("train", "test"):
        theirs = cls(split=split, root=str(tmp_path), download=False, size=size)
        assert len(theirs) == sizes[0 if split == "train" else 2]
        img, target = theirs[7]
        assert img.mode == ("RGB" if channels == 3 else "L") and img.size == (size, size)
        np.testing.assert_array_equal(np.asarray(img), ds[split].images[7])
        assert int(target[0]) == int(ds[split].labels[7, 0])
    assert load_medmnist(path).label_names is not None  # a known flag gets medmnist's class names


# --- class counts and labels across splits -----------------------------------------------------

def test_class_table_matches_medmnist_info():
    with contextlib.redirect_stdout(io.StringIO()):  # medmnist's __init__ prints when pandas is missing
        info = pytest.importorskip("medmnist.info", reason="medmnist is not installed (optional)").INFO
    from salm_fast.data.medmnist_io import MEDMNIST_2D_CLASSES, MEDMNIST_MULTI_LABEL

    flags_2d = {f for f in info if not f.endswith("3d")}
    assert set(MEDMNIST_2D_CLASSES) == flags_2d
    assert MEDMNIST_2D_CLASSES == {f: len(info[f]["label"]) for f in flags_2d}
    assert MEDMNIST_MULTI_LABEL == {f for f in flags_2d if info[f]["task"].startswith("multi-label")}


def _labelled(train, test, dtype=np.int64):
    arrays = _medmnist_arrays(n=(len(train), 2, len(test)), size=28)
    arrays.update(train_labels=np.array(train, dtype).reshape(-1, 1), test_labels=np.array(test, dtype).reshape(-1, 1),
                  val_labels=np.array([0, 1], dtype).reshape(-1, 1))
    return arrays


@pytest.fixture
def without_medmnist(monkeypatch):
    """The optional medmnist package made unimportable: the class counts must not depend on it."""
    for name in ("medmnist", "medmnist.info", "medmnist.dataset"):
        monkeypatch.setitem(sys.modules, name, None)


LABEL_CASES = {  # file name, train labels, test labels -> message
    "stray label in a MedMNIST file": ("breastmnist.npz", [0, 1, 999, 0], [0, 1],
                                       "train label 999 is out of range: breastmnist has 2 classes"),
    "test label beyond a MedMNIST flag": ("octmnist.npz", [0, 1, 2, 3], [0, 4], "test label 4 is out of range"),
    "test label beyond the train classes": ("mine.npz", [0, 1, 0, 1], [0, 2],
                                            r"test label 2 is not a class of the train split \(its labels are 0..1\)"),
    "stray label in another file": ("mine.npz", [0, 1, 999, 0], [0, 1], "no image has label 2..998"),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_labels_are_checked_against_the_class_count_in_every_split(tmp_path, without_medmnist, case):
    name, train, test, message = LABEL_CASES[case]
    path = _write_npz(tmp_path / name, **_labelled(train, test))
    with pytest.raises(DataError, match=message) as info:
        load_medmnist(path)
    assert "\n" not in str(info.value)


def test_class_count_of_a_medmnist_flag_needs_no_medmnist_package(tmp_path, without_medmnist):
    ds = load_medmnist(_write_npz(tmp_path / "octmnist.npz", **_labelled([0, 1, 0, 1], [1, 0])))
    assert ds.n_classes == 4 and ds.label_names is None  # names are medmnist's; the count is ours
    assert load_medmnist(_write_npz(tmp_path / "mine.npz", **_labelled([0, 1, 2, 1], [1, 0]))).n_classes == 3


def test_chestmnist_is_refused_as_multi_label(tmp_path):
    arrays = _medmnist_arrays(size=28)
    arrays = {k: (np.zeros((len(v), 14), np.uint8) if k.endswith("labels") else v) for k, v in arrays.items()}
    with pytest.raises(DataError, match="chestmnist is a multi-label task .*single-label multi-class data only"):
        load_medmnist(_write_npz(tmp_path / "chestmnist.npz", **arrays))


# --- image folders ----------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_folder_round_trip_is_bit_exact(tmp_path, channels):
    ds = _small(channels, size=20)
    out = save_image_folder(ds, tmp_path / "release")
    assert sorted(os.listdir(out)) == ["labels.csv", "test", "train", "val"]
    assert (out / "labels.csv").read_text().splitlines()[0] == "filename,label,split"
    assert all(p.suffix == ".png" for p in (out / "train").iterdir())
    back = load_image_folder(out)
    _assert_same(ds, back)
    assert back.name == "release" and back.channels == channels
    assert _files(tmp_path) == ["release"]  # no temporary folder left beside it
    assert stat.S_IMODE(out.stat().st_mode) != 0o700  # not mkdtemp's private mode


def _write_folder(folder, csv_text, images):
    folder.mkdir(exist_ok=True)
    for name, arr in images.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(arr, bytes):
            (folder / name).write_bytes(arr)
        else:
            Image.fromarray(arr).save(folder / name)
    (folder / "labels.csv").write_text(csv_text)
    return folder


def test_folder_reads_jpeg_and_defaults_to_train(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {f"img{i}.jpg": rng.integers(0, 256, (12, 10), dtype=np.uint8) for i in range(4)}
    folder = _write_folder(tmp_path / "f", "filename,label,patient\n" +
                           "".join(f"img{i}.jpg,{i % 2},p{i}\n" for i in range(4)), imgs)
    ds = load_image_folder(folder)
    assert list(ds.splits) == ["train"] and len(ds["train"]) == 4 and ds.image_shape == (12, 10)
    assert ds.size is None and ds["train"].labels[:, 0].tolist() == [0, 1, 0, 1]
    other_csv = tmp_path / "other.csv"
    other_csv.write_text("filename,label,split\nimg0.jpg,1,test\nimg1.jpg,0,test\nimg2.jpg,1,train\n")
    ds = load_image_folder(folder, labels_csv=other_csv)
    assert list(ds.splits) == ["train", "test"] and ds["test"].labels[:, 0].tolist() == [1, 0]


GRAY = np.zeros((8, 8), np.uint8)
BAD_FOLDERS = {
    "no header": ("a.png,0\n", {"a.png": GRAY}, "header 'a.png,0' has no 'filename' column"),
    "empty csv": ("", {}, "is empty; expected a header"),
    "no rows": ("filename,label\n", {}, "has a header but no rows"),
    "bad label": ("filename,label\na.png,benign\n", {"a.png": GRAY}, r"labels\.csv:2: label 'benign' is not a class"),
    "negative label": ("filename,label\na.png,-1\n", {"a.png": GRAY}, "label '-1' is not a class index"),
    "bad split": ("filename,label,split\na.png,0,holdout\n", {"a.png": GRAY}, "split 'holdout' is not one of"),
    "short row": ("filename,label,split\na.png\n", {"a.png": GRAY}, "has 1 fields, the header has 3"),
    "missing image": ("filename,label\na.png,0\nb.png,1\n", {"a.png": GRAY}, r"b\.png: no such image file"),
    "duplicate": ("filename,label\na.png,0\na.png,1\n", {"a.png": GRAY}, "'a.png' is listed twice"),
    "odd size": ("filename,label\na.png,0\nb.png,1\n", {"a.png": GRAY, "b.png": np.zeros((9, 8), np.uint8)},
                 r"b\.png: is 8x9 L but a\.png is 8x8 L; all images must share size and mode"),
    "odd mode": ("filename,label\na.png,0\nb.png,1\n", {"a.png": GRAY, "b.png": np.zeros((8, 8, 3), np.uint8)},
                 r"b\.png: is 8x8 RGB but a\.png is 8x8 L"),
    "rgba": ("filename,label\na.png,0\n", {"a.png": np.zeros((8, 8, 4), np.uint8)},
             "image mode 'RGBA' is not supported"),
    "corrupt": ("filename,label\na.png,0\n", {"a.png": b"\x89PNG garbage"}, r"a\.png: cannot read the image"),
    "one class": ("filename,label\na.png,0\n", {"a.png": GRAY}, "every label is 0"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folder_is_rejected_with_a_one_line_message(tmp_path, case):
    csv_text, images, message = BAD_FOLDERS[case]
    folder = _write_folder(tmp_path / "f", csv_text, images)
    with pytest.raises(DataError, match=message) as info:
        load_image_folder(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlink", "symlinked folder"])
def test_folder_refuses_file_names_that_leave_it(tmp_path, how):
    Image.fromarray(GRAY).save(tmp_path / "outside.png")  # a readable image, outside the dataset folder
    folder = _write_folder(tmp_path / "f", "", {"a.png": GRAY})
    (folder / "sub").mkdir()
    name = {"dot-dot": "../outside.png", "absolute": str(tmp_path / "outside.png"), "symlink": "link.png",
            "symlinked folder": "out/outside.png"}[how]
    if how == "symlink":
        (folder / "link.png").symlink_to(tmp_path / "outside.png")
    if how == "symlinked folder":
        (folder / "out").symlink_to(tmp_path)
    (folder / "labels.csv").write_text(f"filename,label\na.png,0\n{name},1\n")
    with pytest.raises(DataError, match=r"labels\.csv:3: .*(not a path inside|symbolic link leading out)") as info:
        load_image_folder(folder)
    assert "\n" not in str(info.value)


def test_folder_refuses_dot_dot_but_takes_a_link_that_stays_inside(tmp_path):
    folder = _write_folder(tmp_path / "f", "filename,label\na.png,0\nsub/../b.png,1\n",
                           {"a.png": GRAY, "b.png": GRAY + 1})
    with pytest.raises(DataError, match="labels.csv:3: 'sub/../b.png' is not a path inside"):  # '..' is refused
        load_image_folder(folder)
    (folder / "alias.png").symlink_to(folder / "b.png")
    (folder / "labels.csv").write_text("filename,label\na.png,0\nalias.png,1\n")
    assert load_image_folder(folder)["train"].labels[:, 0].tolist() == [0, 1]


def test_folder_labels_are_checked_across_splits(tmp_path):
    images = {f"{i}.png": GRAY for i in range(4)}
    folder = _write_folder(tmp_path / "f", "filename,label,split\n0.png,0,train\n1.png,1,train\n2.png,0,test\n"
                                           "3.png,2,test\n", images)
    with pytest.raises(DataError, match=r"labels\.csv: test label 2 is not a class of the train split"):
        load_image_folder(folder)
    (folder / "labels.csv").write_text("filename,label\n0.png,0\n1.png,1\n2.png,999\n")
    with pytest.raises(DataError, match="no image has label 2..998"):
        load_image_folder(folder)


def test_folder_missing_pieces(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"labels\.csv: no labels CSV"):
        load_image_folder(tmp_path / "empty")


def test_save_folder_refuses_non_empty_and_overwrites_on_request(tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    save_image_folder(_small(), out)  # an empty folder is fine
    with pytest.raises(UnwritableOutputError, match="exists and is not empty"):
        save_image_folder(_small(seed=1), out)
    _assert_same(load_image_folder(out), _small())
    (out / "stale.txt").write_text("old")
    new = _small(channels=3, seed=1)
    save_image_folder(new, out, overwrite=True)
    _assert_same(load_image_folder(out), new)
    assert not (out / "stale.txt").exists() and _files(tmp_path) == ["release"]


def test_save_folder_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def flaky_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 5:
            raise OSError("disk full")
        return original(self, fp, *args, **kwargs)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        save_image_folder(_small(), tmp_path / "release")
    assert _files(tmp_path) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("keep")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_image_folder(_small(), old, overwrite=True)
    assert _files(tmp_path) == ["old"] and (old / "keep.txt").read_text() == "keep"


# --- atomic writes ----------------------------------------------------------------------------

def test_failed_npz_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = save_medmnist(_small(), tmp_path / "out.npz")
    before = path.read_bytes()

    def half_write(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(np, "savez_compressed", half_write)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        save_medmnist(_small(seed=1), path, overwrite=True)
    assert path.read_bytes() == before and _files(tmp_path) == ["out.npz"]
    with pytest.raises(RuntimeError):
        save_medmnist(_small(seed=1), tmp_path / "new.npz")
    assert _files(tmp_path) == ["out.npz"]


def test_save_npz_refuses_to_overwrite_by_default(tmp_path):
    path = save_medmnist(_small(), tmp_path / "out.npz")
    with pytest.raises(UnwritableOutputError, match="already exists"):
        save_medmnist(_small(seed=1), path)
    save_medmnist(_small(seed=1), path, overwrite=True)
    _assert_same(load_medmnist(path), _small(seed=1))


def test_atomic_helpers(tmp_path):
    target = atomic_write_json(tmp_path / "r.json", {"auc": 0.5, "name": "x"})
    assert json.loads(target.read_text()) == {"auc": 0.5, "name": "x"}
    assert stat.S_IMODE(target.stat().st_mode) != 0o600  # the usual mode, not mkstemp's
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    nan = atomic_write_json(tmp_path / "nan.json", {"x": float("nan"), "y": [float("inf"), 1.5]})
    assert json.loads(nan.read_text()) == {"x": None, "y": [None, 1.5]}  # strict JSON: null, never NaN
    atomic_write_bytes(tmp_path / "b.bin", b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "b.bin") as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".bin"
            tmp.write_bytes(b"new, half")
            raise KeyboardInterrupt
    assert (tmp_path / "b.bin").read_bytes() == b"old"
    with atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "b.bin").read_bytes() == b"new"
    assert _files(tmp_path) == ["b.bin", "nan.json", "r.json"]


def test_unwritable_output_is_refused_up_front(tmp_path, monkeypatch):
    ds = _small()
    with pytest.raises(UnwritableOutputError, match="output directory .*nope does not exist"):
        save_medmnist(ds, tmp_path / "nope" / "x.npz")
    (tmp_path / "file").write_text("")
    with pytest.raises(UnwritableOutputError, match="file is not a directory"):
        atomic_write_json(tmp_path / "file" / "x.json", {})
    (tmp_path / "adir").mkdir()
    with pytest.raises(UnwritableOutputError, match="adir: is a directory"):
        atomic_write_bytes(tmp_path / "adir", b"")
    with pytest.raises(UnwritableOutputError, match="does not exist"):
        save_image_folder(ds, tmp_path / "nope" / "release")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", denied)
    monkeypatch.setattr("tempfile.mkdtemp", denied)
    with pytest.raises(UnwritableOutputError, match=r"x\.npz: cannot create a file in .*Permission denied"):
        save_medmnist(ds, tmp_path / "x.npz")
    with pytest.raises(UnwritableOutputError, match="release: cannot create a folder"):
        save_image_folder(ds, tmp_path / "release")
    assert _files(tmp_path) == ["adir", "file"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="directory permissions do not bind root (or non-POSIX)")
def test_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UnwritableOutputError, match="is not writable"):
            save_medmnist(_small(), ro / "x.npz")
        assert _files(ro) == []
    finally:
        ro.chmod(0o755)


# --- the in-memory type -----------------------------------------------------------------------

def test_tensors_round_trip_and_release_split(tmp_path):
    ds = _small(channels=3)
    x, y = ds["train"].to_tensors()
    assert x.shape == (24, 3, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (24,)
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(to_uint8_images(x), ds["train"].images)
    # A +-2/255 perturbation survives quantization exactly.
    delta = torch.where(torch.rand_like(x) < 0.5, -2.0, 2.0) / 255
    perturbed = (x + delta).clamp(0, 1)
    released = ds.replace_split("train", perturbed)
    expected = np.clip(ds["train"].images.astype(int) + np.rint(delta.permute(0, 2, 3, 1).numpy() * 255), 0, 255)
    np.testing.assert_array_equal(released["train"].images, expected)
    assert released["test"] is ds["test"] and ds["train"].images is not released["train"].images
    np.testing.assert_array_equal(released["train"].labels, ds["train"].labels)
    np.testing.assert_array_equal(ds["train"].images, to_uint8_images(x))  # the clean dataset is untouched
    with pytest.raises(ValueError, match="read-only"):
        ds["train"].images[0, 0, 0, 0] = 1
    s = split_from_tensors(x[:4], y[:4])
    np.testing.assert_array_equal(s.images, ds["train"].images[:4])
    gray = _small()
    xg, _ = gray["val"].to_tensors()
    assert xg.shape == (6, 1, 28, 28)
    assert gray.replace_split("val", gray["val"].images.copy())["val"].images.shape == (6, 28, 28)


@pytest.mark.parametrize("bad, message", [
    (torch.full((2, 1, 1, 1), float("nan")), "2 NaN/inf values"),
    (torch.full((2, 1, 4, 4), 1.5), r"must lie in \[0, 1\], got values in \[1.5, 1.5\]"),
    (torch.zeros(2, 4, 4), "N x C x H x W with C = 1 or 3"),
    (torch.zeros(2, 1, 4, 4, dtype=torch.int32), "dtype int32"),
    ([[0.5]], "got list"),
])
def test_to_uint8_rejects_bad_floats(bad, message):
    with pytest.raises(DataError, match=message):
        to_uint8_images(bad)


def test_dataset_validation():
    ds = _small()
    with pytest.raises(DataError, match="new images have shape"):
        ds.replace_split("train", np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DataError, match="has no split 'holdout'"):
        ds["holdout"]
    with pytest.raises(DataError, match="unknown split name 'holdout'"):
        Dataset("x", {"holdout": ds["train"]}, 2)
    with pytest.raises(DataError, match="needs at least 2 classes"):
        Dataset("x", dict(ds.splits), 1)
    with pytest.raises(DataError, match="label 3 is out of range for n_classes=2"):
        Dataset("x", dict(_small(n_classes=4).splits), 2)
    with pytest.raises(DataError, match="3 label names for 2 classes"):
        Dataset("x", dict(ds.splits), 2, label_names=("a", "b", "c"))
    with pytest.raises(DataError, match="split 'val' has images of shape"):
        Dataset("x", {"train": ds["train"], "val": _small(size=20)["val"]}, 2)
    with pytest.raises(DataError, match="labels: has 2 labels but there are 3 images"):
        Split(np.zeros((3, 4, 4), np.uint8), np.zeros(2, np.int64))


# --- load_dataset -----------------------------------------------------------------------------

def test_load_dataset_specs(tmp_path):
    ds = load_dataset("synthetic:channels=3,classes=3,n=600,size=32,seed=1")
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == (420, 60, 120)
    assert ds.channels == 3 and ds.n_classes == 3 and ds.size == 32
    assert load_dataset("synthetic").n_classes == 2
    _assert_same(load_dataset("synthetic:n_train=24,n_val=6,n_test=8"), _small())
    npz = save_medmnist(_small(), tmp_path / "x.npz")
    _assert_same(load_dataset(str(npz)), _small())
    folder = save_image_folder(_small(), tmp_path / "folder")
    _assert_same(load_dataset(folder), _small())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: unknown dataset format"):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="missing.npz: no such file or directory"):
        load_dataset(tmp_path / "missing.npz")
    with pytest.raises(DataError, match="unknown key 'colour'"):
        load_dataset("synthetic:colour=3")
    with pytest.raises(DataError, match="size='big' is not an integer"):
        load_dataset("synthetic:size=big")
    with pytest.raises(DataError, match="n_classes must be an int in"):
        load_dataset("synthetic:classes=11")
    with pytest.raises(DataError, match="either n or n_train"):
        load_dataset("synthetic:n=100,n_train=5")


# --- the synthetic dataset ----------------------------------------------------------------------

def test_synthetic_is_deterministic():
    a, b = make_synthetic(200, 20, 50, seed=7), make_synthetic(200, 20, 50, seed=7)
    for s in ("train", "val", "test"):
        assert a[s].images.tobytes() == b[s].images.tobytes()
        assert a[s].labels.tobytes() == b[s].labels.tobytes()
    c = make_synthetic(200, 20, 50, seed=8)
    assert not np.array_equal(a["train"].images, c["train"].images)
    # Each split has its own stream: the test split does not depend on n_train.
    d = make_synthetic(300, 20, 50, seed=7)
    assert d["test"].images.tobytes() == a["test"].images.tobytes()
    rgb = make_synthetic(20, 5, 5, channels=3, n_classes=10, size=64, seed=7)
    assert rgb["train"].images.shape == (20, 64, 64, 3) and rgb.label_names[3] == "foci"


@pytest.mark.parametrize("channels, digest", [
    (1, "19fcb791402e792d7623925e75ffc12f0f4da1ba1f80f67f008333afc4753c34"),
    (3, "b4252216b27291c28de86c9d281032a20a712f7a95884024e13b6b0a669a739e")])
def test_synthetic_bytes_do_not_depend_on_chunking(monkeypatch, channels, digest):
    # The digests are those of the version that drew the whole pixel noise at once: drawing it chunk
    # by chunk (bounded memory) gives the same bytes, whatever the chunk.
    import salm_fast.data.synthetic as synthetic

    def digest_of(ds):
        h = hashlib.sha256()
        for s in ds.splits:
            h.update(ds[s].images.tobytes())
            h.update(ds[s].labels.tobytes())
        return h.hexdigest()

    assert digest_of(make_synthetic(30, 5, 5, size=40, channels=channels, n_classes=3, seed=11)) == digest
    monkeypatch.setattr(synthetic, "_CHUNK_ELEMS", 40 * 40 * synthetic._MAX_FOCI * 7)  # chunks of 7 images
    assert digest_of(make_synthetic(30, 5, 5, size=40, channels=channels, n_classes=3, seed=11)) == digest


def test_synthetic_holds_no_float_copy_of_the_set():
    # Peak traced memory grows with n by the uint8 images only (the pixel noise is drawn per chunk;
    # drawn whole it added 4 float32 bytes per value: 5x the uint8 growth).
    import tracemalloc

    peaks = {}
    for n in (150, 450):
        tracemalloc.start()
        try:
            ds = make_synthetic(n, 1, 1, size=224, channels=3, seed=0)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert ds["train"].images.dtype == np.uint8
    uint8_growth = 300 * 224 * 224 * 3
    assert peaks[450] - peaks[150] < 1.5 * uint8_growth


@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_is_sparse_and_balanced(channels):
    ds = make_synthetic(400, 20, 20, channels=channels, n_classes=4, seed=0)
    images = ds["train"].images
    gray = images if channels == 1 else images.max(axis=-1)
    assert np.median(gray) < 40  # dark background
    # Lesion pixels: clearly above the image's own background (low-contrast, like ultrasound).
    background = np.median(gray.reshape(len(gray), -1), axis=1)[:, None, None]
    bright = (gray > background + 20).reshape(len(gray), -1).mean(axis=1)
    assert 0.002 < bright.min() and bright.max() < 0.2 and 0.02 < bright.mean() < 0.1
    assert np.bincount(ds["train"].labels[:, 0]).tolist() == [100] * 4


def _fit_linear(features: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 200) -> nn.Linear:
    """Multinomial logistic regression, full batch (features standardized by the caller)."""
    torch.manual_seed(0)
    model = nn.Linear(features.shape[1], n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(features), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()




@pytest.mark.slow
@pytest.mark.parametrize("channels, n_classes, n_train, epochs", [(1, 2, 1500, 10), (3, 4, 2000, 10)])
def test_synthetic_is_learnable_by_shape_not_by_brightness(channels, n_classes, n_train, epochs):
    ds = make_synthetic(n_train, 10, 500, channels=channels, n_classes=n_classes, seed=0)
    x, y = ds["train"].to_tensors()
    xt, yt = ds["test"].to_tensors()

    torch.manual_seed(0)
    bn = nn.BatchNorm2d
    cnn = nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), bn(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), bn(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), bn(32), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(32, n_classes))
    opt = torch.optim.Adam(cnn.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 50):
            batch = perm[i:i + 50]
            loss = nn.functional.cross_entropy(cnn((x[batch] - 0.5) / 0.25), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    cnn.eval()
    cnn_acc = _accuracy(cnn, (xt - 0.5) / 0.25, yt)
    assert cnn_acc > 0.90

    # Not a brightness or colour cue: the per-channel mean intensity alone is at chance level.
    mean, mean_t = x.mean((2, 3)), xt.mean((2, 3))
    mu, sd = mean.mean(0), mean.std(0)
    brightness = _fit_linear((mean - mu) / sd, y, n_classes)
    assert _accuracy(brightness, (mean_t - mu) / sd, yt) < 1 / n_classes + 0.1
    # Nor a fixed pixel pattern: a linear model on raw pixels does far worse than the CNN.
    linear = _fit_linear(x.flatten(1), y, n_classes)
    linear_acc = _accuracy(linear, xt.flatten(1), yt)
    assert linear_acc < cnn_acc - 0.25


# --- real MedMNIST data -----------------------------------------------------------------------

@pytest.mark.realdata
@pytest.mark.parametrize("flag, sizes", [("breastmnist", (546, 78, 156)), ("pneumoniamnist", (4708, 524, 624))])
def test_real_medmnist_files(real_data_dir, flag, sizes):
    path = real_data_dir / f"{flag}.npz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    ds = load_medmnist(path)
    assert (len(ds["train"]), len(ds["val"]), len(ds["test"])) == sizes
    assert ds.name == flag and ds.channels == 1 and ds.size == 28 and ds.n_classes == 2
    assert ds.label_dtype == "uint8" and set(np.unique(ds["train"].labels)) == {0, 1}
    assert load_dataset(str(path))["test"].images.shape == (sizes[2], 28, 28)


@pytest.mark.realdata
def test_real_release_loads_with_medmnist(real_data_dir, tmp_path):
    cls = _medmnist_class("BreastMNIST")
    clean = load_medmnist(real_data_dir / "breastmnist.npz")
    x, _ = clean["train"].to_tensors()
    release = clean.replace_split("train", (x + 3 / 255).clamp(0, 1))
    path = save_medmnist(release, tmp_path)
    theirs = cls(split="train", root=str(tmp_path), download=False, size=28)
    np.testing.assert_array_equal(theirs.imgs, release["train"].images)
    np.testing.assert_array_equal(theirs.labels, clean["train"].labels.astype(np.uint8))
    assert not np.array_equal(theirs.imgs, clean["train"].images)
    _assert_same(load_medmnist(path), release)
