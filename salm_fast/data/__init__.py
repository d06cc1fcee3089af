"""Datasets in and out: MedMNIST ``.npz``, image folders (8/16-bit, DICOM), the built-in synthetic set; atomic writes.

The in-memory type is :class:`Dataset` (splits of uint8 images + int64 ``N x 1`` labels, in
MedMNIST's conventions); :func:`load_dataset` opens any supported source from one spec.
Every bad input raises :class:`DataError` (a ``ValueError``) with a one-line message naming
the file and the problem; every writer is atomic, and a folder of outputs is published whole
(:mod:`~salm_fast.data.outdir`: a lock, a staging folder, one rename).
"""
from .combine import combine
from .atomic import atomic_path, atomic_write_bytes, atomic_write_json, check_writable
from .dataset import (SPLITS, Dataset, Split, class_count, nchw_to_storage, split_from_tensors, storage_to_nchw,
                      to_uint8_images)
from .errors import DataError, OutputInUseError, UnwritableOutputError
from .folder_io import load_image_folder, parse_resize, save_folder_release, save_image_folder, write_folder_release
from .load import load_dataset, parse_synthetic_spec
from .medmnist_io import MEDMNIST_2D_CLASSES, load_medmnist, medmnist_filename, parse_medmnist_filename, save_medmnist
from .outdir import make_staging_dir, output_lock, publish_dir
from .stored import FolderDataset, StoredImage, StoredImages, perturb_stored, stored_budget
from .synthetic import MORPHOLOGIES, make_synthetic

__all__ = [
    "SPLITS", "MORPHOLOGIES", "MEDMNIST_2D_CLASSES", "Dataset", "Split", "DataError", "OutputInUseError",
    "UnwritableOutputError", "class_count",
    "load_dataset", "parse_synthetic_spec",
    "load_medmnist", "save_medmnist", "medmnist_filename", "parse_medmnist_filename",
    "load_image_folder", "save_image_folder", "parse_resize", "save_folder_release", "write_folder_release",
    "FolderDataset", "StoredImage", "StoredImages", "perturb_stored", "stored_budget",
    "make_synthetic", "combine", "storage_to_nchw", "nchw_to_storage", "split_from_tensors", "to_uint8_images",
    "atomic_path", "atomic_write_bytes", "atomic_write_json", "check_writable",
    "make_staging_dir", "output_lock", "publish_dir",
]
