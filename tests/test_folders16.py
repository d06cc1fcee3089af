"""16-bit PNG/TIFF image folders, and folders whose images differ in size (an error naming the first
mismatch, or an explicit resize): the release is written back at the files' own depth and format,
with the budget on the stored values (floor(eps * 65535) levels)."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from salm_fast import protect
from salm_fast.cli import main
from salm_fast.data import DataError, Dataset, FolderDataset, load_dataset, load_image_folder, make_synthetic, \
    parse_resize
from salm_fast.release import stored_budget_levels

EPS = 8 / 255
LEVELS_16 = stored_budget_levels(EPS, 65535)  # 2056


def save16(path: Path, pixels: np.ndarray, mode: str) -> None:
    fmt = "PNG" if path.suffix == ".png" else "TIFF"
    if mode == "I;16B":
        h, w = pixels.shape
        Image.frombytes("I;16B", (w, h), pixels.astype(">u2").tobytes()).save(path, format=fmt)
    elif mode == "I":
        Image.fromarray(pixels.astype(np.int32)).save(path, format=fmt)
    else:
        Image.fromarray(pixels.astype(np.uint16)).save(path, format=fmt)


def make_folder16(folder: Path, suffix: str, mode: str, n_train: int = 16, n_test: int = 6) -> Path:
    """Synthetic images scaled to 16 bits (with a fine grain an 8-bit file could not hold)."""
    ds = make_synthetic(n_train=n_train, n_val=2, n_test=n_test, seed=5)
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    rows = ["filename,label,split"]
    for split in ("train", "test"):
        for i, (view, label) in enumerate(zip(ds[split].images, ds[split].labels[:, 0])):
            name = f"{split}-{i}{suffix}"
            save16(folder / name, np.clip(view.astype(np.int64) * 257 + rng.integers(-100, 100, view.shape), 0, 65535),
                   mode)
            rows.append(f"{name},{label},{split}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


CASES = {"png": (".png", "I;16"), "tiff": (".tif", "I;16"), "tiff big-endian": (".tif", "I;16B"),
         "tiff 32-bit container": (".tif", "I")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_16bit_folder_round_trip_at_its_own_depth_and_format(tmp_path, case):
    suffix, mode = CASES[case]
    src = make_folder16(tmp_path / "in", suffix, mode)
    ds = load_dataset(src)
    assert isinstance(ds, FolderDataset) and ds.full_depth
    assert ds.describe() == {"format": "png" if suffix == ".png" else "tiff", "bits_stored": [16], "resized": None}
    with Image.open(src / f"train-0{suffix}") as im:
        first = np.array(im).astype(np.int64)
    assert np.array_equal(ds.stored["train"].pixels[0], first)
    assert np.array_equal(ds["train"].images[0], np.rint(first / 65535 * 255).astype(np.uint8))  # the 8-bit view

    result = protect(src, "random", eps=EPS, out=tmp_path / "out", seed=1, figure=False, audit=False, splits="train")
    out = tmp_path / "out" / "images"
    assert (out / "labels.csv").read_text() == (src / "labels.csv").read_text()
    moved = []
    for i in range(16):
        with Image.open(src / f"train-{i}{suffix}") as a, Image.open(out / f"train-{i}{suffix}") as b:
            assert b.format == a.format and b.mode == a.mode  # the same format and depth as read
            moved.append(np.abs(np.array(b).astype(np.int64) - np.array(a).astype(np.int64)))
    moved = np.stack(moved)
    assert 0 < moved.max() <= LEVELS_16 and (moved > 0).mean() > 0.9
    assert moved.max() > 255  # steps finer than 8 bits could never be this large: the 16-bit grid was used
    for i in range(6):  # the clean test split is copied byte for byte
        assert (out / f"test-{i}{suffix}").read_bytes() == (src / f"test-{i}{suffix}").read_bytes()
    stored = result.summary["stored_budget"]["train"]["per_bits"]["16"]
    assert stored["budget_levels"] == LEVELS_16 and stored["linf_levels"] == moved.max()
    back = load_dataset(out)  # and the release reads back as a 16-bit folder
    assert np.abs(back["train"].images.astype(int) - result.release["train"].images).max() <= 1


def test_16bit_values_out_of_range_and_16bit_colour_are_refused(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "labels.csv").write_text("filename,label\na.tif,0\nb.tif,1\n")
    save16(folder / "a.tif", np.full((8, 8), 70000), "I")
    save16(folder / "b.tif", np.zeros((8, 8)), "I")
    with pytest.raises(DataError, match=r"a\.tif: mode I holds values in \[70000, 70000\]; only 16-bit images"):
        load_image_folder(folder)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\0" + bytes(8 * 3 * 2) for _ in range(8))  # 8 x 8 RGB, 16 bits a sample
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    (folder / "c.png").write_bytes(png)
    (folder / "labels.csv").write_text("filename,label\nc.png,0\nb.tif,1\n")
    with pytest.raises(DataError, match=r"c\.png: is 16-bit RGB; 16-bit colour images are not supported"):
        load_image_folder(folder)


def test_8_and_16_bit_images_do_not_mix(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    save16(folder / "b.png", np.zeros((8, 8)), "I;16")
    (folder / "labels.csv").write_text("filename,label\na.png,0\nb.png,1\n")
    with pytest.raises(DataError, match=r"b\.png: is 8x8 16-bit but a\.png is 8x8 L; all images must share size "
                                        r"and mode$"):
        load_image_folder(folder)


# ------------------------------------------------------------------------------ sizes
def _mixed_sizes(folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(20, 20), (20, 20), (24, 30), (20, 20), (16, 12), (20, 20)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "labels.csv").write_text("filename,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(6)))
    return folder


def test_a_size_mismatch_names_the_first_odd_file_and_both_sizes(tmp_path):
    folder = _mixed_sizes(tmp_path / "f")
    with pytest.raises(DataError) as info:
        load_image_folder(folder)
    assert str(info.value) == (f"{folder / '2.png'}: is 30x24 L but 0.png is 20x20 L; all images must share size "
                               "and mode (width x height; resize=(h, w) or --resize HxW resizes every image)")
    rc = main(["protect", "--data", str(folder), "--out", str(tmp_path / "out"), "--method", "random"])
    assert rc == 2 and not (tmp_path / "out").exists()


def test_resize_reads_every_image_at_one_size_and_says_so(tmp_path):
    folder = _mixed_sizes(tmp_path / "f")
    ds = load_image_folder(folder, resize="18x22")
    assert isinstance(ds, FolderDataset) and not ds.full_depth and ds.image_shape == (18, 22)
    assert ds.resized == {"to": [18, 22], "filter": "bilinear", "images_resized": 6, "images": 6,
                          "note": "the release holds the resized images"}
    flat = tmp_path / "flat"  # a flat image resizes to itself: the filter never overshoots
    flat.mkdir()
    for i, value in enumerate((7, 200)):
        Image.fromarray(np.full((12, 9), value, np.uint8)).save(flat / f"{i}.png")
    (flat / "labels.csv").write_text("filename,label\n0.png,0\n1.png,1\n")
    assert load_image_folder(flat, resize=(30, 40))["train"].images[:, 5, 7].tolist() == [7, 200]

    out = tmp_path / "out"
    rc = main(["protect", "--data", str(folder), "--out", str(out), "--method", "random", "--resize", "18x22",
               "--no-figure", "--quiet", "--no-audit"])
    assert rc == 0
    release = load_image_folder(out / "images")  # 8-bit input: a PNG release of the resized images
    assert type(release) is Dataset and release.image_shape == (18, 22)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_files"]["resized"]["to"] == [18, 22] and "audit" not in summary
    assert not (out / "audit.json").exists()


def test_plain_8bit_folders_are_read_as_before(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(folder / "b.png")
    (folder / "labels.csv").write_text("filename,label\na.png,0\nb.png,1\n")
    assert type(load_image_folder(folder)) is Dataset  # no stored copy: the uint8 images are the files


@pytest.mark.parametrize("text, expected", [("28x28", (28, 28)), ("64X48", (64, 48)), ((5, 7), (5, 7)), (None, None)])
def test_parse_resize(text, expected):
    assert parse_resize(text) == expected


@pytest.mark.parametrize("bad", ["28", "28x", "x28", "0x5", "28x28x3", "-3x4", (1.5, 2), (True, 3), "9000x10"])
def test_parse_resize_refuses(bad):
    with pytest.raises(ValueError, match="resize must be"):
        parse_resize(bad)


def test_resize_is_for_image_folders_only(tmp_path):
    with pytest.raises(DataError, match="resize applies to image folders"):
        load_dataset("synthetic", resize=(8, 8))
    with pytest.raises(ValueError, match="resize applies when reading an image folder"):
        protect(make_synthetic(n_train=8, n_val=2, n_test=2), "random", out=tmp_path / "o", resize=(8, 8))
    rc = main(["protect", "--data", "synthetic", "--out", str(tmp_path / "o"), "--resize", "28"])
    assert rc == 2 and not (tmp_path / "o").exists()
