"""Reading a file inside a directory somebody else controls (a job owner's run directory).

The daemon reads what workers write there (heartbeat, events, error and exit records) through
its group. The owner could swap any name for a symlink or hard link to a file the daemon can read
and they cannot; so each component is opened relative to the previous one without following
symlinks, only a regular file is read, and only one owned by the directory's owner.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # search, not read, needed
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class Refused(OSError):
    pass


def read_under(root: Path, path: Path, offset: int = 0, limit: int = -1) -> bytes:
    """Bytes of `path` (inside `root`) from `offset`. FileNotFoundError if it is absent;
    Refused (an OSError) for a symlink, a non-regular file or a file of another owner."""
    parts = path.relative_to(root).parts
    fd = os.open(root, _DIR)
    try:
        owner = os.fstat(fd).st_uid
        for name in parts[:-1]:
            nxt = os.open(name, _DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        ffd = os.open(parts[-1], _FILE, dir_fd=fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink (or a file) where a name was
            raise Refused(e.errno, "a symlink or not a directory; not followed", str(path)) from e
        raise
    finally:
        os.close(fd)
    with os.fdopen(ffd, "rb") as f:
        st = os.fstat(ffd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner:
            raise Refused(1, "not a regular file of the directory's owner", str(path))
        if offset:
            f.seek(offset)
        return f.read(limit)
