"""Errors of the data layer: one clear, one-line message per bad input or output."""
from __future__ import annotations


class DataError(ValueError):
    """A dataset that cannot be read, is malformed, or cannot be written.

    The message is one line and names the file and the problem, e.g.
    ``DataError: /data/x.npz: train_images has dtype float32; images must be uint8 (0-255)``.
    """


class UnwritableOutputError(DataError):
    """The output location cannot be written (missing or read-only directory, a directory in the way).

    Raised before anything is written, so no partial file is left behind.
    """


class OutputInUseError(UnwritableOutputError):
    """Another run holds the output's lock: two runs writing one output would mix their files."""
