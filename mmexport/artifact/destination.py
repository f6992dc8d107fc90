"""What a build does to its output directory, in one place.

    with Destination(out_dir, force=force, log=log) as dest:   # lock + stale cleanup + --force rules
        tmp = dest.staging()                                   # .NAME.building-<owner>-<random>/
        ... write everything into tmp ...
        dest.install(tmp)                                      # rename into place (replacing an old artifact)

- **Lock.** `PARENT/.NAME.lock` is locked (fcntl.flock, exclusive, non-blocking) for the whole
  build, so two builds to the same directory cannot interleave: the second one fails at once with
  one line naming the first one's pid (failing beats waiting: a CI job that waits minutes behind
  another build is harder to understand than one that says why it stopped). The lock file is
  removed when the build ends; a build that finds the file replaced after locking it retries, so
  removing it cannot let two builds in. A killed build's lock is released by the kernel.
- **Stale temporary directories.** A staging directory's name records its owner: the boot id, pid
  and process start time (`.NAME.building-<boot>-<pid>-<start>-<random>`), so a reused pid cannot
  pass for the owner. With the lock held, every staging directory of NAME whose owner is gone (a
  build killed by SIGKILL, a power cut) is removed. Directories that do not carry an owner are
  left alone (and reported).
- **--force.** Without it an existing destination is refused. With it, only a directory that is an
  mmexport artifact (its manifest.json reads as one, and it holds nothing but the manifest's files,
  verify.json, .verified.json and engines/) or an empty directory is replaced -- never a symbolic
  link, a file, the working directory or one of its ancestors, the home directory or /. The old
  artifact is renamed aside, the new one renamed into place, then the old one removed.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError
from .files import is_temp_name

Log = Callable[[str], None]

# files mmexport writes into an artifact directory besides those the manifest lists
ARTIFACT_EXTRAS = ("manifest.json", "verify.json", ".verified.json")
ENGINES_SUBDIR = "engines"


# -- owner records -----------------------------------------------------------------------------------
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:12]
    except OSError:
        return "noboot"


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except OSError:
        return "?"
    # the command name (field 2) is in parentheses and may hold spaces: split after the last ')'
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else "?"


def owner_tag(pid: Optional[int] = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{_boot_id()}-{pid}-{_start_time(pid) or '?'}"


_TAG = re.compile(r"^(?P<boot>[0-9a-z]+)-(?P<pid>\d+)-(?P<start>[0-9?]+)-[0-9a-f]+$")


def owner_alive(tag_and_random: str) -> Optional[bool]:
    """Whether the process recorded in a staging directory's name still runs (None: no owner record)."""
    m = _TAG.match(tag_and_random)
    if not m:
        return None
    if m["boot"] != _boot_id():
        return False  # recorded before a reboot
    pid = int(m["pid"])
    now = _start_time(pid)
    if now is None:
        return False
    if m["start"] == "?" or now == "?":  # no /proc: trust the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return now == m["start"]


# -- the lock ------------------------------------------------------------------------------------------
_HELD: dict[str, int] = {}  # lock path -> depth, so one process may nest (the CLI holds it across build + engines)


class BuildLock:
    """An exclusive, non-blocking flock on `PARENT/.NAME.lock` (see the module doc)."""

    def __init__(self, dest: Path):
        dest = Path(os.path.abspath(dest))
        self.dest = dest
        self.path = dest.parent / f".{dest.name}.lock"
        self.fd: Optional[int] = None

    def acquire(self) -> "BuildLock":
        import fcntl

        key = str(self.path)
        if key in _HELD:
            _HELD[key] += 1
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise UserError(f"{self.path} is a symbolic link; remove it (mmexport keeps its build lock there)") from None
                raise UserError(f"cannot write in {self.path.parent} ({e.strerror}); choose another --out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"another mmexport build is writing {self.dest}{holder}; wait for it to finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        _HELD[key] = 1
        return self

    def release(self) -> None:
        key = str(self.path)
        if key not in _HELD:
            return
        _HELD[key] -= 1
        if _HELD[key] > 0:
            return
        del _HELD[key]
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still locked: a waiting opener sees a new inode and retries
            except OSError:
                pass
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __enter__(self) -> "BuildLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
        return f" (pid {int(pid)})" if pid else ""
    except (OSError, ValueError):
        return ""


# -- --force rules ---------------------------------------------------------------------------------------
def _protected(real: str) -> Optional[str]:
    """Why `real` (a resolved path) may never be replaced, or None."""
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    if real == os.path.realpath(os.sep):
        return "it is the root directory"
    if real == home:
        return "it is your home directory"
    if real == cwd:
        return "it is the working directory"
    if cwd.startswith(real.rstrip(os.sep) + os.sep):
        return "it contains the working directory"
    return None


def _manifest_files(d: Path) -> Optional[set[str]]:
    """The files the artifact at `d` consists of, per its manifest.json; None if `d` is not an artifact."""
    p = d / "manifest.json"
    try:
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode):
            return None
        with open(p, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or type(data.get("schema_version")) is not int or not isinstance(data.get("files"), dict) \
            or not isinstance(data.get("components"), dict):
        return None
    return {str(k) for k in data["files"]}


def _foreign_entries(d: Path, listed: set[str]) -> list[str]:
    """Entries under `d` that are not part of its artifact (user files that --force must not delete)."""
    keep_dirs = {str(Path(f).parent) for f in listed}
    keep_dirs |= {str(p) for f in listed for p in Path(f).parents}
    foreign = []
    for top, dirs, files in os.walk(d):
        rel_top = os.path.relpath(top, d)
        for name in files + [x for x in dirs if os.path.islink(os.path.join(top, x))]:
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            if rel in listed or rel in ARTIFACT_EXTRAS or rel.startswith(ENGINES_SUBDIR + "/") or is_temp_name(name):
                continue
            foreign.append(rel)
        for name in list(dirs):
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            if os.path.islink(os.path.join(top, name)):
                dirs.remove(name)
            elif rel == ENGINES_SUBDIR:
                dirs.remove(name)  # mmexport's own engines
            elif rel not in keep_dirs:
                foreign.append(rel + "/")
                dirs.remove(name)
    return sorted(foreign)


def check_replaceable(dest: Path) -> None:
    """UserError unless `dest` may be replaced by `--force` (see the module doc)."""
    st = os.lstat(dest)
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"--force: {dest} is a symbolic link; give the directory itself (--force replaces only an mmexport artifact directory)")
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"--force: {dest} is not a directory; --force replaces only an mmexport artifact directory or an empty one")
    why = _protected(os.path.realpath(dest))
    if why:
        raise UserError(f"--force: refusing to replace {dest}: {why}")
    if not any(os.scandir(dest)):
        return
    listed = _manifest_files(dest)
    if listed is None:
        raise UserError(f"--force: {dest} is not an mmexport artifact (no readable manifest.json) and not empty; "
                        "--force replaces only an artifact directory or an empty one")
    foreign = _foreign_entries(dest, listed)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"--force: {dest} holds files that are not part of its artifact ({', '.join(foreign[:3])}{more}); "
                        "move them away or remove the directory yourself")


# -- the whole thing ---------------------------------------------------------------------------------------
class Destination:
    """A build's output directory: lock, stale cleanup, staging and install (see the module doc)."""

    def __init__(self, out_dir: Path, force: bool = False, log: Log = lambda m: None):
        self.out_dir = Path(out_dir)
        self.abs = Path(os.path.abspath(out_dir))
        self.force = force
        self.log = log
        self.lock = BuildLock(self.abs)
        self._staged: list[Path] = []

    @property
    def parent(self) -> Path:
        return self.abs.parent

    def _prefix(self, kind: str) -> str:
        return f".{self.abs.name}.{kind}-"

    def __enter__(self) -> "Destination":
        if not self.abs.name:
            raise UserError(f"refusing to build into {self.out_dir}: it is the root directory")
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {self.parent}: {e.strerror}") from None
        self.lock.acquire()
        try:
            self.remove_stale()
            self.check()
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            for d in self._staged:
                shutil.rmtree(d, ignore_errors=True)
        finally:
            self.lock.release()

    def check(self) -> None:
        """The destination may be written: it does not exist, or --force may replace it."""
        if not os.path.lexists(self.abs):
            return
        if not self.force:
            raise UserError(f"{self.out_dir} already exists; pass --force to replace it")
        check_replaceable(self.abs)

    def remove_stale(self) -> None:
        """Remove this destination's staging / replaced directories whose owner process is gone."""
        try:
            entries = list(os.scandir(self.parent))
        except OSError:
            return
        for e in entries:
            for kind in ("building", "replaced"):
                prefix = self._prefix(kind)
                if not e.name.startswith(prefix) or not e.is_dir(follow_symlinks=False):
                    continue
                alive = owner_alive(e.name[len(prefix):])
                if alive is None:
                    self.log(f"left alone: {self.parent / e.name} (no owner record; remove it yourself if no build is running)")
                elif not alive:
                    self.log(f"removing {self.parent / e.name} (left by a build that was killed)")
                    shutil.rmtree(self.parent / e.name, ignore_errors=True)

    def staging(self) -> Path:
        """A fresh hidden directory next to the destination, named after its owner."""
        while True:
            p = self.parent / f"{self._prefix('building')}{owner_tag()}-{secrets.token_hex(4)}"
            try:
                p.mkdir(mode=0o700)
            except FileExistsError:
                continue
            self._staged.append(p)
            return p

    def install(self, tmp: Path) -> None:
        """Move the finished staging directory into place, replacing the old artifact (checked again)."""
        old = None
        if os.path.lexists(self.abs):
            self.check()  # still what it was when the build started
            old = self.parent / f"{self._prefix('replaced')}{owner_tag()}-{secrets.token_hex(4)}"
            os.rename(self.abs, old)
            self._staged.append(old)
        try:
            os.rename(tmp, self.abs)
        except BaseException:
            if old is not None:
                os.rename(old, self.abs)
                self._staged.remove(old)
            raise
        self._staged.remove(tmp)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            self._staged.remove(old)
