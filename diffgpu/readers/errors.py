"""The errors diffgpu's readers raise: for files they cannot read as what they claim to be,
and for arguments that do not fit (which are not the file's fault)."""

from __future__ import annotations

__all__ = ["DetectorFileError", "ReaderArgumentError"]


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
