"""Artifact writing that never loses a user's files: a command that is interrupted leaves the old artifact or
none, never half of one; a destination that is not an artifact of the same kind is refused, not emptied; two
commands writing one destination do not both win.

Ownership: an artifact directory carries its kind's marker file (`MARKERS`). Staging directories are named
`.NAME.pidPID.*.partial` beside the destination so that a later run can tell its own leftovers (from a process
that was killed outright) from anything else and sweep only those.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError

# kind → the file that marks a directory as an artifact of that kind (the kind's manifest)
MARKERS = {"export": "manifest.json", "engine": "engine.json", "llm": "llm.json", "bundle": "bundle.json"}
NAMES = {"export": "an export", "engine": "an engine", "llm": "an ONNX LLM", "bundle": "a bundle"}
STAGING_SUFFIX = ".partial"
# Free space asked for beyond an artifact's expected size: manifests, sidecars, the file system's own slack.
SPACE_MARGIN = 16 << 20


def default_mode(kind: int) -> int:
    """mkdtemp/mkstemp create private (0700/0600) entries; artifacts get the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    return kind & ~umask


def destination(target: str | os.PathLike) -> Path:
    """An absolute path with a name (`--out .` is the current directory, by its name)."""
    path = Path(os.path.abspath(target))
    if not path.name:
        raise InputError(f"--out {target}: the file system root cannot be an artifact; choose a new directory")
    return path


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.pid{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the staging leftovers for `target` of our own naming whose process is gone; returns them."""
    target = destination(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.pid(\d+)\..*{re.escape(STAGING_SUFFIX)}$")
    swept = []
    if not target.parent.is_dir():
        return swept
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            swept.append(entry)
    return swept


def check_destination(target: str | os.PathLike, kind: str, force: bool = False, expected_bytes: int = 0) -> Path:
    """Refuse, before any work, a destination this command may not replace or cannot write.

    Absent or an empty directory: fine. An artifact of `kind` (its marker file present): only with `force`.
    Anything else (a file, a directory of other things): refused, never touched."""
    target = destination(target)
    marker, name = MARKERS[kind], NAMES[kind]
    option = "--out"
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise InputError(f"{option} {target} is an existing file, not {name} directory; it was left untouched:"
                             f" choose a new directory")
        if any(target.iterdir()):
            if not (target / marker).is_file():
                raise InputError(f"{option} {target} is not empty and holds no {marker} (not {name} directory); "
                                 "it was left untouched: choose a new or empty directory")
            if not force:
                raise InputError(f"{option} {target} already holds {name} ({marker}); pass --force to replace it "
                                 "or choose a new directory")
    parent = _existing_ancestor(target.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {target}: {parent} is not writable ({_why_unwritable(parent)}); choose a "
                         "location you can write")
    require_free_space(parent, expected_bytes, target)
    return target


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _why_unwritable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def require_free_space(location: str | os.PathLike, expected_bytes: int, target: str | os.PathLike) -> None:
    """Refuse to start work whose artifact will not fit where it goes."""
    if expected_bytes <= 0:
        return
    free = shutil.disk_usage(_existing_ancestor(Path(location))).free
    needed = expected_bytes + SPACE_MARGIN
    if free < needed:
        raise InputError(f"{target}: {free >> 20} MiB free on its file system, about {needed >> 20} MiB needed; "
                         "free space there or choose another location")


def check_output_file(path: str | os.PathLike | None, option: str) -> None:
    """A file a command will write (`--json`, a PNG): not a directory, in a writable directory."""
    if path is None:
        return
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; pass a file path")
    if path.exists() and not path.is_file():
        # replacing it (the write is a rename onto it) would remove a device or pipe: it is not ours
        raise InputError(f"{option} {path} is not a regular file; it was left untouched: pass a file path")
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise InputError(f"{option} {path}: {parent} is a file, not a directory; pass a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        where = path if path.exists() else parent
        raise InputError(f"{option} {path}: {where} is not writable ({_why_unwritable(where)}); choose a location "
                         "you can write")


@contextmanager
def destination_lock(target: Path) -> Iterator[None]:
    """Exclusive for the duration: a lock file beside `target` created with O_EXCL, holding our PID; one left by
    a process that is gone is stale and taken over."""
    lock = target.with_name(f".{target.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and _pid_alive(owner):
                raise InputError(f"{target} is being written by another aot-export (pid {owner}); wait for it to "
                                 "finish or choose another --out") from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        break
    else:
        raise InputError(f"{target}: cannot take its lock {lock}; remove it if no aot-export is running")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | os.PathLike, kind: str = "export", force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` in one rename.

    Under the destination's lock, and only where `check_destination(target, kind, force)` allows it (checked again
    at the end: the destination may have changed while the work ran)."""
    target = check_destination(target, kind, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    with destination_lock(target):
        sweep_stale(target)
        check_destination(target, kind, force)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), suffix=STAGING_SUFFIX, dir=target.parent))
        staging.chmod(default_mode(0o777))
        try:
            yield staging
            check_destination(target, kind, force)
            if target.is_dir():
                retired = Path(tempfile.mkdtemp(prefix=_staging_prefix(target) + "old.", suffix=STAGING_SUFFIX,
                                                dir=target.parent))
                target.rename(retired / target.name)
                staging.rename(target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(target)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise _naming(exc, target)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`."""
    target = Path(target)
    if target.is_dir():
        raise InputError(f"{target} is a directory; pass a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_staging_prefix(target), suffix=STAGING_SUFFIX, dir=target.parent)
    os.close(fd)
    staging = Path(name)
    staging.chmod(default_mode(0o666))
    try:
        yield staging
        os.replace(staging, target)
    except BaseException as exc:
        staging.unlink(missing_ok=True)
        raise _naming(exc, target)


def _naming(exc: BaseException, target: Path) -> BaseException:
    """A write error that names no file (a short write, EFBIG from a bare write()) is given the artifact's."""
    if isinstance(exc, OSError) and exc.filename is None:
        named = OSError(exc.errno, exc.strerror or str(exc), str(target)) if exc.errno else \
            OSError(f"{target}: {exc}")
        named.__cause__ = exc
        return named
    return exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_os_error(exc: OSError, where: str | os.PathLike | None = None) -> str | None:
    """One line naming the path and the fix for an environment fault, or None for an OS error that is not one."""
    path = exc.filename or where or "the output"
    fixes = {errno.ENOSPC: "no space left on its device; free space there or choose another location",
             errno.EDQUOT: "disk quota exceeded; free space there or choose another location",
             errno.EACCES: "permission denied; choose a location you can write, or fix its permissions",
             errno.EPERM: "operation not permitted; choose a location you can write, or fix its permissions",
             errno.EROFS: "read-only file system; choose a writable location",
             errno.EISDIR: "is a directory; pass a file path",
             errno.ENOTDIR: "a part of the path is a file, not a directory; fix the path",
             errno.ENOENT: "no such file or directory; pass an existing path",
             errno.EFBIG: "file too large for its file system or the process's file-size limit; choose another "
                          "location",
             errno.ENAMETOOLONG: "name too long; choose a shorter path"}
    if exc.errno in fixes:
        return f"{path}: {fixes[exc.errno]}"
    # numpy's tofile / some writers report a short write without an errno: the disk filled up
    if re.search(r"\d+ requested and \d+ written|problem writing element \d+", str(exc)):
        return f"{path}: a write stopped short ({exc}): the disk is probably full; free space or choose another " \
               "location"
    return None
