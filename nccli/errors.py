"""One error tree for nccli.

Every failure a user can cause is an :class:`NCError`.  The CLI prints its message as a
single line on stderr and exits with :attr:`NCError.exit_code` (1 = the data or a file
is bad, 2 = the command line is wrong).  Messages name the file, say what is wrong and
what to do about it.
"""

from __future__ import annotations


class NCError(Exception):
    """Base class: a user-facing error with an exit code."""

    exit_code: int = 1


class UsageError(NCError):
    """The command line or an API argument is wrong (exit 2)."""

    exit_code = 2


class DataError(NCError):
    """Features, labels or a dataset cannot be used as given (exit 1)."""


class CacheError(DataError):
    """An HDF5 cache is corrupt, incomplete or of an unsupported version (exit 1)."""


class CheckpointError(DataError):
    """A checkpoint cannot be loaded or does not fit the model (exit 1)."""


class UnsafeCheckpointError(CheckpointError):
    """Loading the checkpoint would need arbitrary unpickling (exit 1)."""


class ThresholdExceeded(NCError):
    """A ``--fail-if`` threshold was crossed (exit 1)."""
