"""The errors diffgpu's readers raise: for files they cannot read as what they claim to be,
and for arguments that do not fit (which are not the file's fault)."""

from __future__ import annotations

__all__ = ["DetectorFileError", "ReaderArgumentError", "navigation_shape_array_order"]


class DetectorFileError(ValueError):
    """A detector file that is truncated, inconsistent or not of its format.

    The message names the file and what is wrong with it; ``path`` holds the file.
    A ``ValueError``, so code that catches bad input as ``ValueError`` (the ``diffgpu``
    command line, for one) catches it too.

    Examples
    --------
    >>> from diffgpu.readers.errors import DetectorFileError
    >>> err = DetectorFileError("scan.mib", "the file is empty")
    >>> str(err), err.path
    ("'scan.mib': the file is empty", 'scan.mib')
    """

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"'{self.path}': {problem}")


class ReaderArgumentError(ValueError):
    """An argument a reader cannot use (a ``navigation_shape`` or ``chunks`` of the wrong form).

    :func:`diffgpu.load` raises it as it is, not as an ``OSError`` about the file.

    Examples
    --------
    >>> from diffgpu.readers.errors import ReaderArgumentError
    >>> isinstance(ReaderArgumentError("chunks=(0, 5): ..."), ValueError)
    True
    """


def navigation_shape_array_order(navigation_shape):
    """A reader's ``navigation_shape`` (HyperSpy's order, ``(x, y)``) checked and in array
    order (``(y, x)``): positive whole numbers, or :class:`ReaderArgumentError`.

    Examples
    --------
    >>> navigation_shape_array_order((4, 3))
    (3, 4)
    """
    import numpy as np

    given = np.atleast_1d(navigation_shape)
    try:
        xy = tuple(int(n) for n in given)
        ok = bool(xy) and all(n == v for n, v in zip(xy, given)) and min(xy) >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ReaderArgumentError(f"navigation_shape must be positive whole numbers (x, y); "
                                  f"got {navigation_shape!r}")
    return xy[::-1]
