"""Sub-pixel shifts of frames (bilinear), written once for NumPy and CuPy; on the host a
compiled loop does the same arithmetic in one pass per frame."""

from __future__ import annotations

import numba
import numpy as np

from ..device import array_module
from .dtypes import kernel_ready

__all__ = ["shift_frames"]


def _shifted(frame, ix, iy, xp):
    """frame moved by whole pixels (ix, iy), zero-filled."""
    ny, nx = frame.shape
    out = xp.zeros_like(frame)
    if abs(ix) >= nx or abs(iy) >= ny:
        return out
    src_y = slice(max(0, -iy), ny - max(0, iy))
    dst_y = slice(max(0, iy), ny - max(0, -iy))
    src_x = slice(max(0, -ix), nx - max(0, ix))
    dst_x = slice(max(0, ix), nx - max(0, -ix))
    out[dst_y, dst_x] = frame[src_y, src_x]
    return out


def shift_frames(frames, shifts, keep=None):
    """Move every frame's content by its own ``(dx, dy)`` (pixels), bilinear, zero-filled.

    Content at ``(x, y)`` goes to ``(x + dx, y + dy)``. Each input pixel is shared
    among the four output pixels around its new position with weights that add
    up to one, so the total intensity is unchanged except for what leaves the
    detector.

    Parameters
    ----------
    frames : array ``(n, rows, columns)``
    shifts : array ``(n, 2)`` of ``(dx, dy)``, host or device.
    keep : bool array ``(rows, columns)``, optional
        On the frames' device; the pixels where it is False count as 0 (masked pixels: they
        are read as 0, not copied, so no extra pass over the frames).

    Returns
    -------
    float32 array ``(n, rows, columns)`` on the frames' device.

    Examples
    --------
    >>> import numpy as np
    >>> from diffgpu.kernels.shift import shift_frames
    >>> f = np.zeros((1, 5, 5)); f[0, 2, 2] = 1
    >>> out = shift_frames(f, np.array([[0.5, -1.0]]))
    >>> out[0, 1, 2:4]
    array([0.5, 0.5], dtype=float32)
    """
    xp = array_module(frames)
    shifts = np.asarray(shifts.get() if hasattr(shifts, "get") else shifts, dtype=float)
    if shifts.shape != (frames.shape[0], 2):  # the compiled loop reads them unchecked
        raise ValueError(f"shifts must have the shape {(frames.shape[0], 2)} (one (dx, dy) per "
                         f"frame of the {tuple(frames.shape)} frames); got {shifts.shape}")
    out = xp.empty(frames.shape, dtype=xp.float32)
    if keep is not None and tuple(keep.shape) != tuple(frames.shape[1:]):
        raise ValueError(f"keep must have the frame shape {tuple(frames.shape[1:])}; got "
                         f"{tuple(keep.shape)}")
    if xp is np:
        masked = keep is not None
        keep = np.ascontiguousarray(keep, dtype=np.bool_) if masked else np.ones((1, 1), np.bool_)
        _shift_host(kernel_ready(np.asarray(frames)), np.ascontiguousarray(shifts), out, keep,
                    masked)
    else:
        _shift_array(frames, shifts, out, xp, keep)
    return out


def _shift_array(frames, shifts, out, xp, keep=None):
    """:func:`shift_frames` in array operations of ``xp`` (the device's way), into ``out``."""
    for i in range(frames.shape[0]):
        dx, dy = shifts[i]
        frame = frames[i].astype(xp.float32, copy=False)
        if keep is not None:
            frame = xp.where(keep, frame, xp.float32(0))
        if not (np.isfinite(dx) and np.isfinite(dy)):
            out[i] = frame  # no shift known: leave the frame as it is
            continue
        ix, iy = int(np.floor(dx)), int(np.floor(dy))
        fx, fy = dx - ix, dy - iy
        acc = _shifted(frame, ix, iy, xp) * np.float32((1 - fx) * (1 - fy))
        if fx:
            acc += _shifted(frame, ix + 1, iy, xp) * np.float32(fx * (1 - fy))
        if fy:
            acc += _shifted(frame, ix, iy + 1, xp) * np.float32((1 - fx) * fy)
        if fx and fy:
            acc += _shifted(frame, ix + 1, iy + 1, xp) * np.float32(fx * fy)
        out[i] = acc


@numba.njit(nogil=True, cache=True)
def _shift_host(frames, shifts, out, keep, masked):
    """:func:`shift_frames` on the host: the same float32 products and sums in the same
    order as :func:`_shift_array` (so the same values), one pass over each frame (read
    through a float32 copy with a border of zeros, so that no tap needs a bounds check)
    instead of a dozen NumPy passes and temporaries). ``masked``: pixels where ``keep`` is
    False are read as 0."""
    n, ny, nx = frames.shape
    pad = np.zeros((ny + 2, nx + 2), np.float32)  # pad[y + 1, x + 1] = frame[y, x]
    for i in range(n):
        dx, dy = shifts[i, 0], shifts[i, 1]
        f = frames[i]
        if not (np.isfinite(dx) and np.isfinite(dy)):
            for y in range(ny):
                for x in range(nx):
                    out[i, y, x] = np.float32(f[y, x])
                    if masked and not keep[y, x]:
                        out[i, y, x] = 0
            continue
        for y in range(ny):
            for x in range(nx):
                pad[y + 1, x + 1] = np.float32(f[y, x])
            if masked:
                for x in range(nx):
                    if not keep[y, x]:
                        pad[y + 1, x + 1] = 0
        ix, iy = int(np.floor(dx)), int(np.floor(dy))
        fx, fy = dx - ix, dy - iy
        w00 = np.float32((1 - fx) * (1 - fy))
        w10 = np.float32(fx * (1 - fy))
        w01 = np.float32((1 - fx) * fy)
        w11 = np.float32(fx * fy)
        # output pixels whose source (y - iy, x - ix) is in [0, n]: the taps there and one
        # before fall inside the padded copy; every other output pixel is 0
        y0, y1 = min(max(iy, 0), ny), min(max(iy + ny + 1, 0), ny)
        x0, x1 = min(max(ix, 0), nx), min(max(ix + nx + 1, 0), nx)
        o = out[i]
        o[:] = 0
        c0 = 1 - ix  # padded column of the source of output column 0
        w = x1 - x0
        for y in range(y0, y1):
            r = y - iy + 1  # padded row of the source (y - iy)
            # 1D views, indexed from 0 inside the loops (offsets there kept LLVM from
            # vectorising); one loop per case, no branches inside; zero weights left out as
            # the NumPy path leaves them out
            dst = o[y, x0:x1]
            a, b = pad[r, x0 + c0:x1 + c0], pad[r, x0 + c0 - 1:x1 + c0 - 1]
            c, d = pad[r - 1, x0 + c0:x1 + c0], pad[r - 1, x0 + c0 - 1:x1 + c0 - 1]
            if fx and fy:
                for x in range(w):
                    dst[x] = a[x] * w00 + b[x] * w10 + c[x] * w01 + d[x] * w11
            elif fx:
                for x in range(w):
                    dst[x] = a[x] * w00 + b[x] * w10
            elif fy:
                for x in range(w):
                    dst[x] = a[x] * w00 + c[x] * w01
            else:
                for x in range(w):
                    dst[x] = a[x] * w00
