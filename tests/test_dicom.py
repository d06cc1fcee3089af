"""DICOM in and out: files generated here with pydicom (8-bit, 12-bit in 16-bit containers, 16-bit,
MONOCHROME1, signed pixels with a rescale slope/intercept), protected and written back as derived images.

What is checked: the round trip (same names, labels, every other element kept), the budget on the
stored values (floor(eps * (2**BitsStored - 1)) levels), the direction a viewer sees, new SOP
Instance UIDs and the derivation, padding pixels untouched, clear errors for what is not supported,
and that no identifying value of the files reaches the summary, the round log or the audit.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset as DicomDataset, FileMetaDataset
from pydicom.datadict import dictionary_VR
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

from salm_fast import protect
from salm_fast.cli import main
from salm_fast.bilevel import BiLevelConfig
from salm_fast.data import DataError, FolderDataset, load_dataset, make_synthetic
from salm_fast.data.dicom_io import IDENTIFYING_KEYWORDS, read_dicom
from salm_fast.release import stored_budget_levels

EPS = 8 / 255
#: name -> (BitsAllocated, BitsStored, PhotometricInterpretation, signed, RescaleSlope, RescaleIntercept)
KINDS = {
    "8bit": (8, 8, "MONOCHROME2", False, None, None),
    "12bit": (16, 12, "MONOCHROME2", False, None, None),
    "16bit": (16, 16, "MONOCHROME2", False, None, None),
    "mono1": (16, 12, "MONOCHROME1", False, None, None),
    "rescaled": (16, 12, "MONOCHROME2", True, 0.5, -1024.0),
    "negative slope": (16, 12, "MONOCHROME2", False, -1.0, 4095.0),
}
#: What salm-fast itself changes in a derived image; every other element must be kept.
CHANGED = {"PixelData", "SOPInstanceUID", "ImageType", "DerivationDescription", "SourceImageSequence"}


def identifying_values(i: int) -> dict[str, str]:
    """Distinctive values for the PS3.15 attributes (one set per file), valid for their VR."""
    by_vr = {"PN": f"Marker{i}^Jane", "LO": f"LO-marker-{i}-x", "SH": f"SH-mark-{i}", "DA": f"1971{i % 12 + 1:02d}17",
             "TM": f"10{i % 60:02d}37", "AS": f"0{40 + i % 50}Y", "CS": "O", "ST": f"ST-marker-{i}-y", "UI": None}
    values = {}
    for keyword in IDENTIFYING_KEYWORDS:
        value = by_vr[dictionary_VR(keyword)]
        values[keyword] = generate_uid() if value is None else value
    return values


def write_dcm(path: Path, pixels: np.ndarray, kind: str, i: int = 0, **extra) -> DicomDataset:
    allocated, bits, photometric, signed, slope, intercept = KINDS[kind]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    for keyword, value in identifying_values(i).items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "OT"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelSpacing = ["0.5", "0.25"]
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(f"<{'i' if signed else 'u'}{allocated // 8}").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def stored_from_view(view: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Stored values whose view is about ``view``: the full range, MONOCHROME1 inverted, some fine grain."""
    _, bits, photometric, signed, slope, _ = KINDS[kind]
    maxval = (1 << bits) - 1
    low = -(1 << (bits - 1)) if signed else 0
    invert = (photometric == "MONOCHROME1") != (slope is not None and slope < 0)
    display = 1 - view / 255.0 if invert else view / 255.0
    grain = rng.integers(0, max(1, maxval // 255), view.shape)
    return np.clip(np.rint(display * maxval) + grain, 0, maxval).astype(np.int64) + low


def make_dicom_folder(folder: Path, kind: str, n_train: int = 16, n_test: int = 8, seed: int = 0) -> Path:
    ds = make_synthetic(n_train=n_train, n_val=2, n_test=n_test, seed=seed)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    rows, i = ["filename,label,split"], 0
    for split in ("train", "test"):
        (folder / split).mkdir()
        for view, label in zip(ds[split].images, ds[split].labels[:, 0]):
            name = f"{split}/img{i:03d}.dcm"
            write_dcm(folder / name, stored_from_view(view, kind, rng), kind, i)
            rows.append(f"{name},{label},{split}")
            i += 1
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def elements(ds: DicomDataset) -> dict[str, object]:
    return {e.keyword or str(e.tag): e.value for e in ds if e.keyword not in CHANGED}


def meta(ds: DicomDataset) -> dict[str, object]:
    """The file meta information but the instance UID (new) and the group length (follows the UID's length)."""
    return {e.keyword: e.value for e in ds.file_meta
            if e.keyword not in ("MediaStorageSOPInstanceUID", "FileMetaInformationGroupLength")}


# ------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_read_keeps_the_stored_values_and_views_what_a_reader_sees(tmp_path, kind):
    rng = np.random.default_rng(1)
    view = rng.integers(0, 256, (9, 7))
    stored = stored_from_view(view, kind, rng)
    write_dcm(tmp_path / "a.dcm", stored, kind)
    image = read_dicom(tmp_path / "a.dcm")
    allocated, bits, photometric, signed, slope, _ = KINDS[kind]
    assert np.array_equal(image.pixels, stored) and image.bits == bits and image.fmt == "dicom"
    assert image.low == (-(1 << (bits - 1)) if signed else 0)
    assert image.invert == ((photometric == "MONOCHROME1") != (slope is not None and slope < 0))
    # The models' view: bright where a viewer shows bright (MONOCHROME1: low stored values), within rounding.
    (tmp_path / "labels.csv").write_text("filename,label\na.dcm,0\nb.dcm,1\n")
    write_dcm(tmp_path / "b.dcm", stored, kind)
    ds = load_dataset(tmp_path)
    assert isinstance(ds, FolderDataset) and ds.full_depth
    assert np.abs(ds["train"].images[0].astype(int) - view).max() <= 1


# ------------------------------------------------------------------------------ the round trip
@pytest.fixture(scope="module", params=sorted(KINDS))
def protected(request, tmp_path_factory):
    """(kind, input folder, output folder, result) of a `random` protection of a DICOM folder."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    src = make_dicom_folder(root / "in", kind)
    result = protect(src, "random", eps=EPS, out=root / "out", seed=3, figure=False, splits="train")
    return kind, src, root / "out", result


def test_release_is_the_same_files_with_the_same_labels(protected):
    _, src, out, result = protected
    assert result.release_path == out / "images"
    assert (out / "images" / "labels.csv").read_text().splitlines() == (src / "labels.csv").read_text().splitlines()
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.dcm"))
    assert sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.dcm")) == names
    for p in (src / "test").iterdir():  # an unperturbed split is copied byte for byte
        assert (out / "images" / "test" / p.name).read_bytes() == p.read_bytes()


def test_budget_holds_on_the_stored_values(protected):
    kind, src, out, result = protected
    _, bits, _, _, _, _ = KINDS[kind]
    maxval = (1 << bits) - 1
    levels = stored_budget_levels(EPS, maxval)
    assert levels == int(np.floor(8 / 255 * maxval))  # e.g. 128 of 4095 for 12 bits
    moved = []
    for p in sorted((src / "train").iterdir()):
        a = pydicom.dcmread(p).pixel_array.astype(np.int64)
        b = pydicom.dcmread(out / "images" / "train" / p.name).pixel_array.astype(np.int64)
        low = -(1 << (bits - 1)) if KINDS[kind][3] else 0
        assert b.min() >= low and b.max() <= low + maxval  # within the stored range
        moved.append(np.abs(b - a))
    moved = np.stack(moved)
    assert moved.max() <= levels
    assert moved.max() >= levels // 2  # uniform noise in [-eps, eps] reaches near the budget
    assert (moved > 0).mean() > 0.9  # random noise changes (nearly) every pixel by >= 1 stored level
    per_bits = result.summary["stored_budget"]["train"]["per_bits"][str(bits)]
    assert per_bits["budget_levels"] == levels and per_bits["linf_levels"] == moved.max()
    assert result.summary["input_files"] == {"format": "dicom", "bits_stored": [bits], "resized": None}


def test_perturbation_follows_what_a_viewer_shows(protected):
    kind, src, out, result = protected
    clean, release = load_dataset(src), load_dataset(out / "images")
    invert = bool(clean.stored["train"].invert[0])
    assert invert == (kind in ("mono1", "negative slope"))
    stored_diff = release.stored["train"].pixels.astype(np.int64) - clean.stored["train"].pixels
    view_diff = release["train"].images.astype(np.int64) - clean["train"].images
    both = (stored_diff != 0) & (view_diff != 0)
    assert both.sum() > 100
    shown = -np.sign(stored_diff) if invert else np.sign(stored_diff)
    assert np.array_equal(shown[both], np.sign(view_diff[both]))
    # The 8-bit view released equals the perturbation the method computed, within a view level.
    assert np.abs(release["train"].images.astype(int) - result.release["train"].images).max() <= 1


def test_every_other_element_is_kept_and_the_image_is_derived(protected):
    kind, src, out, _ = protected
    uids = set()
    for p in sorted((src / "train").iterdir()):
        before, after = pydicom.dcmread(p), pydicom.dcmread(out / "images" / "train" / p.name)
        assert elements(after) == elements(before)
        assert meta(after) == meta(before)
        assert after.SOPInstanceUID != before.SOPInstanceUID and UID(after.SOPInstanceUID).is_valid
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        uids.add(after.SOPInstanceUID)
        assert list(after.ImageType) == ["DERIVED", "PRIMARY"]
        assert after.DerivationDescription.startswith("salm-fast ")
        levels = stored_budget_levels(EPS, (1 << KINDS[kind][1]) - 1)
        assert f"at most {levels} of {(1 << KINDS[kind][1]) - 1} stored levels" in after.DerivationDescription
        ref = after.SourceImageSequence[-1]
        assert ref.ReferencedSOPInstanceUID == before.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == before.SOPClassUID
        if KINDS[kind][4] is not None:
            assert (after.RescaleSlope, after.RescaleIntercept) == KINDS[kind][4:]
    assert len(uids) == 16  # one new UID per file


def test_no_identifying_value_reaches_the_summary_round_log_or_audit(tmp_path):
    src = make_dicom_folder(tmp_path / "in", "12bit", n_train=24, n_test=8)
    loop = BiLevelConfig(max_rounds=1, surrogate_steps=2, batch_size=16, min_rounds=1, precision="fp32")
    out = tmp_path / "out"
    result = protect(src, "salm", k=0.2, out=out, loop=loop, mask_epochs=1, generator_steps=2, width=8)
    written = {name: (out / name).read_text() for name in ("summary.json", "rounds.jsonl", "audit.json")}
    written["table"] = result.table()
    values = [v for i in range(32) for v in identifying_values(i).values()]
    values += [str(pydicom.dcmread(p).SOPInstanceUID) for p in src.rglob("*.dcm")]
    checked = [v for v in values if len(v) >= 4]  # a 1-letter code (PatientSex) is in any text
    assert len(checked) > 500
    for name, text in written.items():
        found = [v for v in checked if v in text]
        assert not found, f"{name} holds identifying values {found[:3]}"
    assert json.loads(written["audit.json"])["status"] == "inconclusive"  # 24 images: no victim


def test_padding_pixels_are_never_changed(tmp_path):
    src = make_dicom_folder(tmp_path / "in", "12bit", n_train=8, n_test=2)
    pad = 0
    for p in src.rglob("*.dcm"):  # a padded border (stored 0), and PixelPaddingValue naming it
        ds = pydicom.dcmread(p)
        a = ds.pixel_array.copy()
        a[:3] = pad
        a[3:] = np.maximum(a[3:], 1)
        ds.add_new(0x00280120, "US", pad)  # PixelPaddingValue: US for unsigned pixels
        ds.PixelData = a.astype("<u2").tobytes()
        ds.save_as(p)
    protect(src, "random", eps=EPS, out=tmp_path / "out", figure=False, audit=False)
    for p in sorted((src / "train").iterdir()):
        a = pydicom.dcmread(p).pixel_array
        b = pydicom.dcmread(tmp_path / "out" / "images" / "train" / p.name).pixel_array
        assert np.array_equal(b[:3], a[:3])  # padding kept
        assert (b[3:] != pad).all()  # nothing moved onto the padding value
        assert (b[3:] != a[3:]).mean() > 0.8


def test_resize_updates_rows_columns_and_spacing(tmp_path):
    src = make_dicom_folder(tmp_path / "in", "16bit", n_train=8, n_test=2)
    big = np.full((40, 30), 1000, np.int64)
    write_dcm(src / "train" / "img000.dcm", big, "16bit")  # one file of another size
    with pytest.raises(DataError, match=r"img001\.dcm: is 28x28 MONOCHROME2 16-bit but train/img000\.dcm is 30x40 "
                                        r"MONOCHROME2 16-bit; all images must share size and mode \(width x height; "
                                        r"resize=\(h, w\) or --resize HxW"):
        load_dataset(src)  # the first file in labels.csv, img000, is the odd one: the next is named against it
    result = protect(src, "random", eps=EPS, out=tmp_path / "out", figure=False, audit=False, resize=(28, 28),
                     splits="train")
    after = pydicom.dcmread(tmp_path / "out" / "images" / "train" / "img000.dcm")
    assert (after.Rows, after.Columns) == (28, 28) and after.pixel_array.shape == (28, 28)
    assert [float(v) for v in after.PixelSpacing] == pytest.approx([0.5 * 40 / 28, 0.25 * 30 / 28])
    assert "resized to 28x28 (bilinear)" in after.DerivationDescription
    assert "resized" not in pydicom.dcmread(tmp_path / "out" / "images" / "train" / "img001.dcm").DerivationDescription
    resized = result.summary["input_files"]["resized"]
    assert resized["to"] == [28, 28] and resized["images_resized"] == 1 and "resized images" in resized["note"]
    moved = np.abs(after.pixel_array.astype(int) - 1000)  # a flat image resizes to itself, then is perturbed
    assert 0 < moved.max() <= stored_budget_levels(EPS, 65535)
    # A file neither resized nor perturbed (the test split's) is copied as it is.
    name = "test/img008.dcm"
    assert (tmp_path / "out" / "images" / name).read_bytes() == (src / name).read_bytes()


# ------------------------------------------------------------------------------ what is refused
def _retag(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if keyword == "TransferSyntaxUID":  # a compressed syntax holds its pixel data in fragments
            ds.file_meta.TransferSyntaxUID = value
            ds.PixelData = encapsulate([ds.PixelData])
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


BAD = {
    "compressed": (dict(TransferSyntaxUID=JPEGBaseline8Bit), "transfer syntax JPEG Baseline .* is not supported"),
    "multi-frame": (dict(NumberOfFrames=2), "has 2 frames; only single-frame images"),
    "colour model": (dict(PhotometricInterpretation="PALETTE COLOR"), "PhotometricInterpretation PALETTE COLOR is not"),
    "32-bit": (dict(BitsAllocated=32, BitsStored=32, HighBit=31), "BitsAllocated 32 / BitsStored 32 is not supported"),
    "6-bit": (dict(BitsStored=6, HighBit=5), "BitsAllocated 16 / BitsStored 6 is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsupported_dicom_is_refused_in_one_line_naming_the_file(tmp_path, case):
    src = make_dicom_folder(tmp_path / "in", "12bit", n_train=4, n_test=2)
    changes, message = BAD[case]
    _retag(src / "train" / "img002.dcm", **changes)
    with pytest.raises(DataError, match=r"train/img002\.dcm: " + message) as info:
        load_dataset(src)
    assert "\n" not in str(info.value)
    assert "Marker" not in str(info.value)


def test_other_bad_folders(tmp_path):
    src = make_dicom_folder(tmp_path / "in", "8bit", n_train=4, n_test=2)
    (src / "train" / "img001.dcm").write_bytes(b"not a dicom file at all")
    with pytest.raises(DataError, match=r"img001\.dcm: is not a DICOM file"):
        load_dataset(src)
    rows = (src / "labels.csv").read_text().replace("train/img001.dcm", "train/img001.png")
    (src / "labels.csv").write_text(rows)
    with pytest.raises(DataError, match="lists DICOM and other image files"):
        load_dataset(src)


def test_missing_pydicom_names_the_extra(tmp_path):
    src = make_dicom_folder(tmp_path / "in", "8bit", n_train=4, n_test=2)
    code = ("import sys; sys.modules['pydicom'] = None\n"
            "from salm_fast.cli import main\n"
            f"sys.exit(main(['protect', '--data', {str(src)!r}, '--out', {str(tmp_path / 'out')!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr.strip() == "salm-fast: error: DICOM files need pydicom: pip install 'salm-fast[dicom]'"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ the README's example
def test_readme_dicom_example_runs(tmp_path, monkeypatch, capsys):
    """The README's "DICOM and 16-bit images" example, on files generated here."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## DICOM and 16-bit images", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [line for line in command.splitlines() if line.startswith(".venv/bin/salm-fast protect")]
    assert len(lines) == 1
    make_dicom_folder(tmp_path / "scans", "12bit", n_train=16, n_test=4)
    argv = lines[0].split()[1:]
    assert argv[:3] == ["protect", "--data", "scans/"]
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--quiet", "--rounds", "1"]) == 0  # one bi-level round: the files matter here, not the noise
    printed = capsys.readouterr().out
    assert re.search(r"^stored values \(train, 12-bit\): L-inf \d+/4095 \(budget 128/4095\)$", printed, re.M)
    out = tmp_path / argv[argv.index("--out") + 1]
    assert (out / "images" / "train" / "img000.dcm").is_file()
    assert json.loads((out / "summary.json").read_text())["input_files"]["format"] == "dicom"
