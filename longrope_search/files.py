"""Files on disk: atomic writes (a crash or kill -9 leaves the old file or the new one, never a torn one), appends
that never follow a link, strict JSON, the temp files a kill leaves behind, and the lock that keeps two commands
out of one folder.

Every operating-system error of a write becomes a `StorageError` naming the path and the fix (one line in the CLI).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from longrope_search.errors import CheckpointError, StorageError

TEMP_SUFFIX = ".tmp"  # atomic writes go through ".NAME.<random>.tmp" next to NAME
LOCK_FILE = ".longrope.lock"  # in a run, stages or sweep folder while a command works in it


# --- errors -----------------------------------------------------------------------------------------------


def storage_error(exc: OSError, path: Path | str, doing: str = "write") -> StorageError:
    """One line for an operating-system error on `path`: what failed and what to do about it."""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space (or raise the quota)"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the folder writable or choose another one"
    elif code == errno.ENOTDIR:
        fix = "a part of the path is a file, not a folder: choose another path"
    elif code == errno.EISDIR:
        fix = "a folder stands where the file goes: move it aside"
    elif code == errno.ELOOP:
        fix = "it is a symbolic link, and longrope writes only real files in its folders: remove the link"
    elif code == errno.ENOENT:
        fix = "the folder does not exist and cannot be created there: choose another path"
    else:
        fix = "check the path and the disk"
    return StorageError(f"cannot {doing} {path} ({exc.strerror or exc}); {fix}.")


def make_dirs(path: Path) -> list[Path]:
    """mkdir -p; returns the folders it created, outermost first (for undoing a failed start)."""
    missing = []
    probe = Path(path)
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # something that is not a folder
        raise StorageError(f"cannot create the folder {path}: {exc.filename or path} exists and is not a folder; "
                           "choose another path.") from None
    except OSError as exc:
        raise storage_error(exc, path, "create the folder") from None
    return list(reversed(missing))


# --- writes -----------------------------------------------------------------------------------------------


def _atomic_write(path: Path, fill: Callable[[BinaryIO], None]) -> None:
    """Write next to the target, fsync, then rename: readers see the old file or the new one, never half.

    The temp name is unpredictable and created exclusively, and the rename replaces a symbolic link at `path`
    instead of writing through it: nothing outside the folder is ever written.
    """
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise storage_error(exc, path) from None
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; a served config must be readable like any file
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise storage_error(exc, path) from None
        raise


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a power cut after it keeps the new file); best effort where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_mode(folder: bool = False) -> int:
    """The mode a plain new file (or folder) gets under the process's umask (0644, 0755 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def make_readable(paths: Iterable[Path]) -> None:
    """Give files another library wrote privately (0600) the mode of any new file, so a server under another user
    can read them."""
    for path in paths:
        if path.is_file() and not path.is_symlink():
            os.chmod(path, file_mode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_copy(src: Path, dst: Path) -> None:
    """src's bytes (through symlinks: HF cache snapshots link into blobs) to dst, atomically, in chunks."""
    try:
        source = open(src, "rb")
    except OSError as exc:
        raise storage_error(exc, src, "read") from None
    with source:
        _atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 16 << 20))


def append_line(path: Path, line: str) -> None:
    """Append one line, flushed; a symbolic link at `path` is refused, never followed."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
        try:
            data = memoryview(line.encode())
            while data:  # one write as a rule (a kill leaves the line whole or torn at its end); more if it was short
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    except OSError as exc:
        raise storage_error(exc, path) from None


def end_with_newline(path: Path) -> None:
    """A kill mid-write leaves a torn last line; start the next record on a fresh line."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise storage_error(exc, path) from None
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, b"\n")
    except OSError as exc:
        raise storage_error(exc, path) from None
    finally:
        os.close(fd)


# --- JSON -------------------------------------------------------------------------------------------------


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: JSON has no inf or NaN (readers take None as inf)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_text(value: Any, indent: int | None = None) -> str:
    """Strict JSON (never the bare Infinity/NaN other parsers reject)."""
    return json.dumps(finite(value), indent=indent, allow_nan=False)


def unreadable(paths: Iterable[Path]) -> str | None:
    """Why the first of `paths` this user cannot read (a folder must also be searchable) cannot be, as the start of
    a message ("cannot read P (permission denied)", or a link to nothing); None when all can be read."""
    for path in paths:
        if path.is_symlink() and not path.exists():
            return f"{path} is a link to {os.readlink(path)}, which does not exist"
        mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
        if path.exists() and not os.access(path, mode):
            return f"cannot read {path} (permission denied)"
    return None


def check_writable(path: Path) -> None:
    """Refuse, before any work, a file that could not be written when the work ends: a folder standing at `path`,
    or a folder this user cannot write in (read-only, or another user's)."""
    if path.is_dir() and not path.is_symlink():
        raise StorageError(f"cannot write {path}: a folder stands where the file goes; move it aside.")
    folder = path.parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write {path} (permission denied or a read-only disk); make {folder} writable, or "
                           "copy the run somewhere writable and pass that copy.")


# --- what a kill leaves behind ----------------------------------------------------------------------------


def remove_temps(folder: Path, names: str = "*") -> list[Path]:
    """Delete the temp files of our atomic writes of `names` (a glob) in `folder`, left by a kill; returns them."""
    removed = []
    for path in Path(folder).glob(f".{names}.*{TEMP_SUFFIX}"):
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


STAGING_RANDOM = "????????"  # mkdtemp's eight random characters


def staging_folder(target: Path, inside: bool = False) -> Path:
    """A new private folder (".NAME.<random>.tmp") next to `target`, or inside it (an existing folder: the same disk,
    whatever its parent allows), to build it in before moving it into place; the caller removes it, or
    `remove_staging` after a kill."""
    where = Path(target) if inside else Path(target).parent
    try:
        return Path(tempfile.mkdtemp(dir=where, prefix=f".{Path(target).name}.", suffix=TEMP_SUFFIX))
    except OSError as exc:
        raise storage_error(exc, where, "create a folder in") from None


def remove_staging(target: Path) -> list[Path]:
    """Delete the staging folders of `target` a kill left behind (beside it or inside it); returns them."""
    target, removed = Path(target), []
    pattern = f".{glob.escape(target.name)}.{STAGING_RANDOM}{TEMP_SUFFIX}"
    for where in (target.parent, target):
        for path in where.glob(pattern) if where.is_dir() else []:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def move_into(staging: Path, target: Path, last: str) -> None:
    """Move what `staging` holds into `target` and remove `staging`: a rename of the whole folder when `target` is
    absent or empty, else file by file, replacing (never writing through) what stands there, with `last` moved last so
    its presence marks a complete move."""
    try:
        if not target.exists() or (target.is_dir() and not target.is_symlink() and not any(target.iterdir())):
            os.chmod(staging, file_mode(folder=True))  # mkdtemp makes 0700: the folder must be served like any
            os.replace(staging, target)
        else:  # file by file (the staging folder may sit inside `target`)
            for path in sorted(staging.iterdir(), key=lambda p: p.name == last):
                os.replace(path, target / path.name)
            staging.rmdir()
        _sync_folder(target.parent)
    except OSError as exc:
        raise storage_error(exc, target, "move the finished files into") from None


# --- the folder lock --------------------------------------------------------------------------------------


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or "another process"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` for the block: a second command in the same folder is refused, naming the
    process that holds it. The lock is the kernel's (flock), so a killed holder never blocks the next command; the
    file is removed when the block ends."""
    import fcntl

    path = Path(folder) / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise storage_error(exc, path, "create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(
                f"{folder} is in use by {_holder(path)}; wait until it ends (or stop it), then run this again."
            ) from None
        except OSError as exc:
            os.close(fd)
            raise storage_error(exc, path, "lock") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    try:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {started})\n".encode())
    except OSError:
        pass  # the lock holds without the note
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the unlock: a waiting process then locks a fresh file
        os.close(fd)
