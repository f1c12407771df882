"""Sub-pixel shifts of frames (bilinear), written once for NumPy and CuPy."""

from __future__ import annotations

import numpy as np

from ..device import array_module

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


def shift_frames(frames, shifts):
    """Move every frame's content by its own ``(dx, dy)`` (pixels), bilinear, zero-filled.

    Content at ``(x, y)`` goes to ``(x + dx, y + dy)``. Each input pixel is shared
    among the four output pixels around its new position with weights that add
    up to one, so the total intensity is unchanged except for what leaves the
    detector.

    Parameters
    ----------
    frames : array ``(n, rows, columns)``
    shifts : array ``(n, 2)`` of ``(dx, dy)``, host or device.

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
    out = xp.empty(frames.shape, dtype=xp.float32)
    for i in range(frames.shape[0]):
        dx, dy = shifts[i]
        frame = frames[i].astype(xp.float32, copy=False)
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
    return out
