"""DICOM files in and out (pydicom, an optional extra: ``pip install 'salm-fast[dicom]'``).

A DICOM dataset is a folder of ``.dcm`` files with a ``labels.csv`` (``filename,label[,split]``),
read by :func:`salm_fast.data.load_image_folder` like any image folder; the release is the same
files under the same names, each with its pixel data perturbed (:mod:`.stored`).

What is read: single-frame images with uncompressed, little-endian pixel data (the usual
Explicit/Implicit VR Little Endian transfer syntaxes); grayscale (MONOCHROME1/MONOCHROME2) with
BitsAllocated 8 or 16 and BitsStored 8..16, unsigned or signed (PixelRepresentation 1), or 8-bit
RGB. Compressed, big-endian, multi-frame, float and other photometric images are refused with a
one-line error.

What the release keeps and changes, per file (a derived image, PS3.3 C.7.6.1):

* the stored pixel values move within the budget: eps is a fraction of the stored range
  ``2**BitsStored - 1`` (8/255 of a 12-bit image: floor(8/255 * 4095) = 128 levels);
* the perturbation follows what a viewer shows: the models see MONOCHROME1 images (and images
  with a negative RescaleSlope) inverted, so their perturbation is negated on the stored values;
  RescaleSlope/Intercept are kept, so the modality values (e.g. HU) move by slope x the stored
  step; windowing (VOI LUT) is ignored by the view, which spans the whole stored range;
* pixels equal to PixelPaddingValue (up to PixelPaddingRangeLimit) are never changed, and no
  pixel is moved onto a padding value;
* a new SOPInstanceUID (also in the file meta), ImageType value 1 ``DERIVED``, a
  DerivationDescription saying what was done (appended to one already there), and the original
  image in SourceImageSequence; every other element, identifying ones included, is kept as it
  was: salm-fast does not de-identify (do that before sharing, PS3.15 Annex E).

Nothing read from a DICOM header is ever written to a log, summary, report or error message:
errors name the file, the element keyword and the problem, never an element's value (other than
the pixel-format elements: BitsStored, PhotometricInterpretation, ...). :data:`IDENTIFYING_KEYWORDS`
lists the PS3.15 basic-profile attributes the tests check for.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .stored import StoredImage

__all__ = ["IDENTIFYING_KEYWORDS", "read_dicom", "require_pydicom", "write_dicom"]

#: Identifying attributes of the PS3.15 Annex E basic application level confidentiality profile
#: (a subset: patient, dates and times, institution and staff, study and device identifiers, UIDs):
#: their values never appear in anything salm-fast writes besides the DICOM files themselves.
IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientAge", "PatientSex",
    "PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames", "PatientMotherBirthName",
    "AccessionNumber", "StudyID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime",
    "SeriesTime", "AcquisitionTime", "ContentTime", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "OperatorsName", "PhysiciansOfRecord", "StationName", "DeviceSerialNumber",
    "StudyDescription", "SeriesDescription", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
    "FrameOfReferenceUID",
)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def require_pydicom() -> Any:
    """The pydicom module, or a one-line RuntimeError naming the extra that installs it."""
    try:
        import pydicom
    except ImportError:
        raise RuntimeError("DICOM files need pydicom: pip install 'salm-fast[dicom]'") from None
    return pydicom


def _open(path: Path, shown: str) -> tuple[Any, StoredImage]:
    """The pydicom dataset of ``path`` and its image; DataError (naming no header value) otherwise."""
    pydicom = require_pydicom()
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise DataError(f"{shown}: no such DICOM file")
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise DataError(f"{shown}: is not a DICOM file (no DICM preamble or file meta information)") from None
    except Exception as e:  # noqa: BLE001 - a parser error's text may quote header values: name its type only
        raise DataError(f"{shown}: cannot read the DICOM file ({type(e).__name__})") from None
    return ds, _image(ds, shown)


def _image(ds: Any, shown: str) -> StoredImage:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        raise DataError(f"{shown}: has no TransferSyntaxUID in its file meta information")
    if syntax.is_compressed or not syntax.is_little_endian:
        raise DataError(f"{shown}: transfer syntax {syntax.name} is not supported; convert the files to "
                        "uncompressed Explicit VR Little Endian first (the release is written as read)")
    if "PixelData" not in ds:
        raise DataError(f"{shown}: has no integer PixelData (float and double pixel data are not supported)")
    frames = ds.get("NumberOfFrames")
    if frames is not None and int(frames) != 1:
        raise DataError(f"{shown}: has {int(frames)} frames; only single-frame images are supported")
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                    "BitsStored", "PixelRepresentation"):
        if ds.get(keyword) is None:
            raise DataError(f"{shown}: has no {keyword}")
    spp, photometric = int(ds.SamplesPerPixel), str(ds.PhotometricInterpretation)
    allocated, bits, signed = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.PixelRepresentation) == 1
    if spp == 1 and photometric not in _MONOCHROME:
        raise DataError(f"{shown}: PhotometricInterpretation {photometric} is not supported with one sample per "
                        "pixel (MONOCHROME1 or MONOCHROME2)")
    if spp == 3 and not (photometric == "RGB" and bits == 8 and not signed):
        raise DataError(f"{shown}: colour images must be 8-bit unsigned RGB, got {photometric} with BitsStored {bits}")
    if spp not in (1, 3):
        raise DataError(f"{shown}: SamplesPerPixel {spp} is not supported (1 or 3)")
    if allocated not in (8, 16) or not 8 <= bits <= allocated:
        raise DataError(f"{shown}: BitsAllocated {allocated} / BitsStored {bits} is not supported "
                        "(8 or 16 allocated, 8..16 stored)")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # noqa: BLE001 - see _open
        raise DataError(f"{shown}: cannot decode the pixel data ({type(e).__name__})") from None
    expected = (int(ds.Rows), int(ds.Columns)) + ((3,) if spp == 3 else ())
    if pixels.shape != expected:
        raise DataError(f"{shown}: pixel data has shape {pixels.shape}, expected {expected} (Rows, Columns)")
    slope = float(ds.get("RescaleSlope") or 1.0)
    invert = (photometric == "MONOCHROME1") != (slope < 0)
    low = -(1 << (bits - 1)) if signed else 0
    return StoredImage(pixels.astype(np.int32), bits, "dicom", photometric, low, invert)


def read_dicom(path: str | os.PathLike[str], shown: str | None = None) -> StoredImage:
    """The image of one DICOM file at its stored depth (see the module doc for what is supported)."""
    return _open(Path(path), shown or str(path))[1]


def _padding(ds: Any) -> tuple[int, int] | None:
    """The stored values that mean 'no image here' (PixelPaddingValue .. PixelPaddingRangeLimit)."""
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    a, b = int(value), int(limit if limit is not None else value)
    return min(a, b), max(a, b)


def _scale_spacing(ds: Any, before: tuple[int, int], after: tuple[int, int]) -> None:
    """Pixel spacing of a resized image: the same field of view over fewer or more pixels."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = ds.get(keyword)
        if spacing is not None and len(spacing) == 2:
            ds[keyword].value = [f"{float(spacing[0]) * before[0] / after[0]:.6g}",
                                 f"{float(spacing[1]) * before[1] / after[1]:.6g}"]


def write_dicom(source: str | os.PathLike[str], dest: str | os.PathLike[str], clean: StoredImage,
                pixels: np.ndarray, description: str | Callable[[tuple[int, int]], str | None], *,
                shown: str | None = None) -> np.ndarray:
    """Write ``source`` to ``dest`` as a derived image holding ``pixels`` (its stored values; resized
    images too); every other element is kept (module doc). ``clean`` is the image as it was read
    (resized, if it was): ``source`` must still hold it. ``description``: the DerivationDescription,
    or a function of the file's own (rows, columns) giving it, None when nothing was done (the file is
    then copied as it is). Returns the pixels written (padding kept)."""
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.uid import generate_uid

    shown = shown or str(source)
    ds, image = _open(Path(source), shown)
    before = image.pixels.shape[:2]
    if before != clean.pixels.shape[:2]:
        from .stored import resize_stored

        image = resize_stored(image, clean.pixels.shape[:2])
    if not np.array_equal(image.pixels, clean.pixels):
        raise DataError(f"{shown}: changed since it was read; run again")
    if callable(description):
        description = description(before)
    if description is None:
        shutil.copyfile(source, dest)
        return clean.pixels
    out = np.asarray(pixels, dtype=np.int64).copy()
    padding = _padding(ds)
    if padding is not None:
        lo, hi = padding
        was_pad = (clean.pixels >= lo) & (clean.pixels <= hi)
        becomes_pad = (out >= lo) & (out <= hi)
        keep = was_pad | becomes_pad
        out[keep] = clean.pixels[keep]
    signed = int(ds.PixelRepresentation) == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{int(ds.BitsAllocated) // 8}")
    planes = out.transpose(2, 0, 1) if out.ndim == 3 and int(ds.get("PlanarConfiguration") or 0) == 1 else out
    data = np.ascontiguousarray(planes).astype(dtype).tobytes()
    ds.PixelData = data + b"\0" if len(data) % 2 else data  # DICOM values have even length
    if before != out.shape[:2]:
        ds.Rows, ds.Columns = out.shape[:2]
        _scale_spacing(ds, before, out.shape[:2])
    if ds.get("SOPClassUID") is not None and ds.get("SOPInstanceUID") is not None:
        reference = DicomDataset()
        reference.ReferencedSOPClassUID = ds.SOPClassUID
        reference.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        ds.SourceImageSequence = [*(ds.get("SourceImageSequence") or []), reference]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    image_type = ds.get("ImageType") or []
    image_type = [str(image_type)] if isinstance(image_type, str) else [str(v) for v in image_type]
    ds.ImageType = ["DERIVED", *image_type[1:]] if image_type else ["DERIVED", "SECONDARY"]
    before_text = str(ds.get("DerivationDescription") or "")
    ds.DerivationDescription = (f"{before_text}; {description}" if before_text else description)[:1024]
    try:
        ds.save_as(dest)
    except Exception as e:  # noqa: BLE001 - pydicom's message may quote an element's value: name its type only
        raise DataError(f"{shown}: cannot write the derived DICOM file ({type(e).__name__})") from None
    return out.astype(np.int32)
