"""What the protector sees of a dataset: float images made per batch, on the device, from uint8 ones.

A protection run never holds the whole train split as float32 (4 bytes per pixel and
channel: 3.4 GB for 5,600 RGB images of 224 px). :class:`ImageView` keeps the images as
they are stored (uint8, in storage layout, memory-mapped when the file allows) and makes a
float batch on demand::

    view = ImageView(split.images, device="cuda")
    xb = view[idx]           # float32 B x C x H x W in [0, 1] on the device, contiguous
    u8 = view.u8(idx)        # the stored bytes of the same images, B x C x H x W uint8

``view[idx]`` is ``x_u8[idx].float().div_(255)`` on the device: bit for bit the float a whole
``x_u8.float() / 255`` would hold, so a streamed run computes what an in-memory one did.
On CUDA a set that fits (at most :data:`RESIDENT_FRACTION` of the free device memory) is
copied to the device once, as uint8; otherwise each batch is gathered on the host and sent.

Sources: one or several uint8 arrays in storage layout (``N x H x W`` or ``N x H x W x C``;
several splits are one view, in order), a uint8 ``N x C x H x W`` tensor, or a float one
(the view then only indexes it: the API's ``Method.fit(x_float, y)`` keeps working).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

#: A CUDA run keeps the uint8 images on the device when they take at most this share of its free memory.
RESIDENT_FRACTION = 0.25
#: Elements (images x C x H x W) per batch of a pass over all images (export, evaluation, digest):
#: 1,024 images at 28 px RGB, 16 at 224 px RGB; memory per batch stays flat in the image size.
PASS_ELEMENTS = 1024 * 3 * 28 * 28


def pass_batch(shape: Sequence[int], limit: int = 1024) -> int:
    """Images per batch of a pass over a set of ``shape`` (N x C x H x W): at most ``limit``, at most
    :data:`PASS_ELEMENTS` elements, at least 1."""
    per_image = int(np.prod(shape[1:]))
    return max(1, min(limit, PASS_ELEMENTS // max(1, per_image)))


def _index_array(idx, n: int) -> np.ndarray:
    """``idx`` (tensor, array, list or int) as int64 indices in [0, n)."""
    if isinstance(idx, Tensor):
        idx = idx.detach().cpu().numpy()
    a = np.asarray(idx, dtype=np.int64).reshape(-1)
    if a.size and (a.min() < -n or a.max() >= n):
        raise IndexError(f"image index out of range for {n} images")
    return np.where(a < 0, a + n, a)


class ImageView:
    """Float ``N x C x H x W`` images in [0, 1], made per batch on ``device`` (see the module doc)."""

    def __init__(self, source: np.ndarray | Sequence[np.ndarray] | Tensor, device: str | torch.device = "cpu", *,
                 resident: bool | None = None):
        self.device = torch.device(device)
        self._parts: list[np.ndarray] = []
        self._tensor: Tensor | None = None  # a uint8 or float N x C x H x W tensor
        if isinstance(source, Tensor):
            if source.dim() != 4:
                raise ValueError(f"images must be N x C x H x W, got shape {tuple(source.shape)}")
            if source.dtype != torch.uint8 and not source.is_floating_point():
                raise TypeError(f"images must be uint8 or float, got {source.dtype}")
            self._tensor = source
            n, c, h, w = source.shape
        else:
            parts = [source] if isinstance(source, np.ndarray) else list(source)
            if not parts or any(not isinstance(p, np.ndarray) or p.dtype != np.uint8 or p.ndim not in (3, 4)
                                for p in parts):
                raise TypeError("images must be uint8 arrays N x H x W or N x H x W x C (storage layout)")
            if len({p.shape[1:] for p in parts}) != 1:
                raise ValueError(f"image arrays differ in shape: {[p.shape[1:] for p in parts]}")
            self._parts = parts
            first = parts[0]
            n = sum(len(p) for p in parts)
            c, h, w = (1, *first.shape[1:]) if first.ndim == 3 else (first.shape[3], first.shape[1], first.shape[2])
        self._offsets = np.cumsum([0] + [len(p) for p in self._parts])
        self.shape = torch.Size((int(n), int(c), int(h), int(w)))
        on_device = self._tensor is not None and self._tensor.device == self.device
        if not on_device and self._want_resident(resident):
            self._tensor = self._to_device_tensor()
            self._parts = []

    # ------------------------------------------------------------------ what it is
    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        where = "resident" if self._tensor is not None and self._tensor.device == self.device else "streamed"
        return f"ImageView({' x '.join(map(str, self.shape))}, {self.stored_dtype}, {where}, device={self.device})"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the batches: float32 for uint8 images, else the source's."""
        return torch.float32 if self.is_uint8 else self._tensor.dtype  # type: ignore[union-attr]

    @property
    def is_uint8(self) -> bool:
        return self._tensor is None or self._tensor.dtype == torch.uint8

    @property
    def stored_dtype(self) -> str:
        return "uint8" if self.is_uint8 else str(self.dtype).removeprefix("torch.")

    @property
    def nbytes(self) -> int:
        """Bytes of the images as stored."""
        if self._tensor is not None:
            return self._tensor.numel() * self._tensor.element_size()
        return sum(p.nbytes for p in self._parts)

    def dim(self) -> int:
        return 4

    # ------------------------------------------------------------------ batches
    def __getitem__(self, idx) -> Tensor:
        """Float images ``idx`` (tensor, array, list, slice or int) on the device, contiguous."""
        single = isinstance(idx, (int, np.integer))
        if self.is_uint8:
            out = self.u8(idx).float().div_(255)
        else:
            out = self._take_tensor(idx).to(self.device)
        return out[0] if single else out.contiguous()

    def u8(self, idx) -> Tensor:
        """The stored bytes of images ``idx`` as a uint8 B x C x H x W tensor on the device."""
        if not self.is_uint8:
            raise TypeError("these images are float, not stored bytes")
        if isinstance(idx, (int, np.integer)):
            idx = [int(idx)]
        if self._tensor is not None:
            return self._take_tensor(idx).to(self.device)
        rows = self._gather(idx)
        t = torch.from_numpy(rows)
        t = t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)
        return t.contiguous().to(self.device)

    def full(self) -> Tensor:
        """All images as one float tensor on the device (for methods that need them at once)."""
        return self[slice(0, len(self))]

    def chunks(self, limit: int = 1024):
        """``(slice, float batch)`` over all images in order, :func:`pass_batch` images at a time."""
        step = pass_batch(self.shape, limit)
        for start in range(0, len(self), step):
            sl = slice(start, min(start + step, len(self)))
            yield sl, self[sl]

    def digest(self) -> str:
        """sha256 of the images as stored (N x C x H x W bytes, in order): identifies the data in a checkpoint."""
        h = hashlib.sha256()
        step = pass_batch(self.shape)
        for start in range(0, len(self), step):
            sl = slice(start, min(start + step, len(self)))
            part = self.u8(sl) if self.is_uint8 else self._take_tensor(sl)
            h.update(part.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ internals
    def _take_tensor(self, idx) -> Tensor:
        t = self._tensor
        assert t is not None
        if isinstance(idx, slice):
            return t[idx]
        index = torch.from_numpy(_index_array(idx, len(self)))
        return t[index.to(t.device)]

    def _gather(self, idx) -> np.ndarray:
        """Rows ``idx`` of the storage arrays (a copy, storage layout)."""
        if isinstance(idx, slice):
            start, stop, stride = idx.indices(len(self))
            if stride == 1:
                pieces = [p[max(0, start - o):max(0, stop - o)] for p, o in zip(self._parts, self._offsets)]
                pieces = [q for q in pieces if len(q)]
                # A copy: the stored arrays are read-only (and may be memory-mapped), a batch is the caller's.
                return np.array(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces or [self._parts[0][:0]])
            idx = np.arange(start, stop, stride)
        index = _index_array(idx, len(self))
        if len(self._parts) == 1:
            return self._parts[0][index]
        part = np.searchsorted(self._offsets, index, side="right") - 1
        out = np.empty((len(index), *self._parts[0].shape[1:]), dtype=np.uint8)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self._parts[p][index[sel] - self._offsets[p]]
        return out

    def _want_resident(self, resident: bool | None) -> bool:
        if resident is not None:
            return resident
        if self.device.type != "cuda":
            return False  # on the CPU the stored arrays (maybe memory-mapped) are the data: no copy
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.nbytes <= RESIDENT_FRACTION * free

    def _to_device_tensor(self) -> Tensor:
        """The images as one tensor on the device; from storage arrays, uint8 N x C x H x W filled chunk by
        chunk (no whole host copy)."""
        if self._tensor is not None:
            return self._tensor.to(self.device)
        out = torch.empty(self.shape, dtype=torch.uint8, device=self.device)
        step = max(1, (64 << 20) // max(1, int(np.prod(self.shape[1:]))))
        for start in range(0, len(self), step):
            stop = min(start + step, len(self))
            t = torch.from_numpy(self._gather(slice(start, stop)))
            out[start:stop] = (t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2)).to(self.device)
        return out


def as_view(x: ImageView | Tensor | np.ndarray, device: str | torch.device | None = None) -> ImageView:
    """``x`` as an :class:`ImageView` on ``device`` (None: a view's own device, or a tensor's)."""
    if isinstance(x, ImageView):
        if device is None or torch.device(device) == x.device:
            return x
        source = x._tensor if x._tensor is not None else x._parts
        return ImageView(source, device)
    if isinstance(x, Tensor):
        return ImageView(x, x.device if device is None else device)
    return ImageView(x, "cpu" if device is None else device)


__all__ = ["PASS_ELEMENTS", "RESIDENT_FRACTION", "ImageView", "as_view", "pass_batch"]
