"""Reading and writing files without surprises.

- `open_regular`: opens a file for reading only when it is a regular file, checked before opening
  (a FIFO or a device is refused without blocking on it) and again on the open descriptor.
- `atomic_write`: the one way mmexport writes a file it may later read back (manifest.json,
  .verified.json, verify.json, engines.json, engines): the bytes go to a fresh temporary file
  created exclusively (mkstemp: O_CREAT | O_EXCL) in the same directory, are flushed to disk, and
  the file is renamed over the destination. A symbolic link at the destination is replaced, never
  written through; a reader sees the old file or the new one, never half of either.
"""
from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Union

from ..errors import UserError

_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


class NotRegularFile(UserError):
    """The path exists but is not a regular file; `kind` says what it is."""

    def __init__(self, path: "str | os.PathLike[str]", kind: str):
        super().__init__(f"{os.fspath(path)}: not a regular file (it is a {kind})")
        self.path = os.fspath(path)
        self.kind = kind


def open_regular(path: "str | os.PathLike[str]", nofollow: bool = False) -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (NotRegularFile otherwise; OSError
    such as FileNotFoundError or PermissionError propagate). Never blocks on a FIFO or a device:
    the type is checked before opening, and the open is non-blocking and checked again with fstat.
    `nofollow`: a symbolic link at `path` itself is refused (ELOOP) instead of followed."""
    p = os.fspath(path)
    st = os.lstat(p) if nofollow else os.stat(p)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(p, file_kind(st.st_mode))
    fd = os.open(p, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC | (_O_NOFOLLOW if nofollow else 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between the check and the open
            raise NotRegularFile(p, file_kind(st.st_mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_checked(path: "str | os.PathLike[str]", what: str, missing: str | None = None) -> BinaryIO:
    """`open_regular`, with every way it can fail turned into one UserError line about `what`."""
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise UserError(missing or f"{what}: not found") from None
    except NotRegularFile as e:
        raise UserError(f"{what}: not a regular file (it is a {e.kind})") from None
    except OSError as e:
        raise UserError(f"{what}: cannot read it ({e.strerror or e})") from None


def decode_utf8(raw: bytes, what: "str | os.PathLike[str]") -> str:
    """Text read from a file, or one UserError line naming the file and the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{os.fspath(what)}: not valid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None


def read_text(path: "str | os.PathLike[str]") -> str:
    """A regular file's text (UTF-8); UserError for a non-regular file or bytes that are not UTF-8."""
    with open_regular(path) as f:
        return decode_utf8(f.read(), path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: "str | os.PathLike[str]", data: Union[bytes, bytearray, memoryview, str]) -> None:
    """Replace `path` with `data` (str is written as UTF-8) through an exclusively created temporary
    file in the same directory and a rename (see the module doc). The file gets the permissions any
    new file of the user gets (0666 less the umask). OSError propagates; the temporary file is removed."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def is_temp_name(name: str) -> bool:
    """A temporary file `atomic_write` makes (left behind only if the process was killed mid-write)."""
    return name.startswith(".") and name.endswith(".tmp")


def sha256_stream(f: BinaryIO, chunk: int = 1 << 20) -> str:
    """sha256 (hex) of what `f` reads from here to its end."""
    h = hashlib.sha256()
    while True:
        b = f.read(chunk)
        if not b:
            break
        h.update(b)
    return h.hexdigest()


def sha256_file(path: "str | os.PathLike[str]", chunk: int = 1 << 20) -> str:
    """sha256 (hex) of a file: the one hash of every artifact, checkpoint and engine file mmexport records."""
    with open(path, "rb") as f:
        return sha256_stream(f, chunk)
