"""The error diffgpu's readers raise for files they cannot read as what they claim to be."""

from __future__ import annotations

__all__ = ["DetectorFileError"]


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
