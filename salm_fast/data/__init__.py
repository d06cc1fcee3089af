"""Datasets in and out: MedMNIST ``.npz``, image folders, the built-in synthetic set; atomic writes.

The in-memory type is :class:`Dataset` (splits of uint8 images + int64 ``N x 1`` labels, in
MedMNIST's conventions); :func:`load_dataset` opens any supported source from one spec.
Every bad input raises :class:`DataError` (a ``ValueError``) with a one-line message naming
the file and the problem; every writer is atomic.
"""
from .combine import combine
from .atomic import atomic_path, atomic_write_bytes, atomic_write_json, check_writable
from .dataset import SPLITS, Dataset, Split, nchw_to_storage, split_from_tensors, storage_to_nchw, to_uint8_images
from .errors import DataError, UnwritableOutputError
from .folder_io import load_image_folder, save_image_folder
from .load import load_dataset, parse_synthetic_spec
from .medmnist_io import load_medmnist, medmnist_filename, parse_medmnist_filename, save_medmnist
from .synthetic import MORPHOLOGIES, make_synthetic

__all__ = [
    "SPLITS", "MORPHOLOGIES", "Dataset", "Split", "DataError", "UnwritableOutputError",
    "load_dataset", "parse_synthetic_spec",
    "load_medmnist", "save_medmnist", "medmnist_filename", "parse_medmnist_filename",
    "load_image_folder", "save_image_folder",
    "make_synthetic", "combine", "storage_to_nchw", "nchw_to_storage", "split_from_tensors", "to_uint8_images",
    "atomic_path", "atomic_write_bytes", "atomic_write_json", "check_writable",
]
