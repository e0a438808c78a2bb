"""One exception type for problems the user can fix: the CLI prints its message as one line and exits non-zero."""

import errno
import shutil
from pathlib import Path


class RecoError(Exception):
    """A problem with input, configuration or a service, with a message that says what to fix."""


class NotFound(RecoError):
    """A named memory, version or item does not exist."""


class TransientError(RecoError):
    """A store or database hiccup worth retrying (the Celery task retries with backoff)."""


# what a full disk looks like from the OS, SQLite and the embedded engine (Rust's io::ErrorKind names)
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_WORDS = ("no space left on device", "filetoolarge", "file too large", "storagefull",
                    "quota exceeded", "database or disk is full", "os error 28")


def is_disk_full(exc: BaseException) -> bool:
    """A write refused for want of space: no retry helps, only freeing space does."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if any(w in str(exc).lower() for w in _DISK_FULL_WORDS):
            return True
        exc = exc.__cause__ or getattr(exc, "orig", None)
    return False


def free_mb(path: Path) -> float | None:
    """Free space (MB) on the disk holding `path` (its nearest existing parent), or None if it cannot be read."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return None


def disk_full_error(path: Path, need_mb: float) -> RecoError:
    """One line naming where space ran out, how much is free there and how much the work needs."""
    free = free_mb(path)
    have = "unknown" if free is None else f"{free:.0f} MB"
    return RecoError(f"no space left on the disk holding {path} ({have} free): free at least {need_mb:.0f} MB "
                     "there, or set RECO_HOME to a directory on a bigger disk, then run the command again")
