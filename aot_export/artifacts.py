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
from contextlib import contextmanager, nullcontext
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
    """An absolute path with a name (`--out .` is the current directory, by its name), spelled in UTF-8: the
    ONNX and JSON writers take only UTF-8 paths, so another name would fail after the work."""
    path = Path(os.path.abspath(target))
    if not path.name:
        raise InputError(f"--out {target}: the file system root cannot be an artifact; choose a new directory")
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise InputError(f"--out {shown}: the name is not valid UTF-8; choose a name in UTF-8") from None
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


def refuse_own_input(target: Path, sources: dict[str, str | os.PathLike | None]) -> None:
    """No command writes over what it reads: `target` may not be one of `sources` (label → path: "export",
    "LLM", ...), resolve to one, hold one or lie inside one — so that --force replaces only an artifact that is
    not the command's input. Sources that name no existing path (a built-in model) are no files to lose."""
    out = target.resolve()
    for label, source in sources.items():
        if source is None or not Path(source).exists():
            continue
        path = Path(source).resolve()
        relation = ("is" if out == path else "holds" if path.is_relative_to(out) else
                    "is inside" if out.is_relative_to(path) else None)
        if relation:
            raise InputError(f"--out {target} {relation} the source {label} {source}; a command never writes over "
                             "its own input: choose another --out")


def check_destination(target: str | os.PathLike, kind: str, force: bool = False, expected_bytes: int = 0,
                      sources: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """Refuse, before any work, a destination this command may not replace or cannot write.

    Absent or an empty directory: fine. An artifact of `kind` (its marker file present): only with `force`, and
    never one of the command's `sources` (`refuse_own_input`). Anything else (a file, a directory of other things):
    refused, never touched."""
    target = destination(target)
    refuse_own_input(target, sources or {})
    marker, name = MARKERS[kind], NAMES[kind]
    option = "--out"
    owner = lock_owner(target)
    if owner is not None and owner != os.getpid():
        raise InputError(being_written(target, owner))
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


def _lock_file(target: Path) -> Path:
    return target.with_name(f".{target.name}.lock")


def lock_owner(target: Path) -> int | None:
    """The PID of the live process holding `target`'s lock; None when there is no lock or its process is gone."""
    try:
        owner = int(_lock_file(target).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return owner if owner and _pid_alive(owner) else None


def being_written(target: Path, owner: int) -> str:
    return (f"{target} is being written by another aot-export (pid {owner}); wait for it to finish or choose another "
            "--out")


def make_parents(directory: Path) -> list[Path]:
    """`directory` and its missing ancestors created; returns those it created, innermost first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def remove_if_empty(directories: list[Path]) -> None:
    """Directories a command created for its artifact, removed again where nothing was left in them."""
    for path in directories:
        try:
            path.rmdir()
        except OSError:
            return


@contextmanager
def destination_lock(target: Path) -> Iterator[None]:
    """Exclusive for the duration: a lock file beside `target` created with O_EXCL, holding our PID; one left by
    a process that is gone is stale and taken over. The parent directories it creates for the lock are removed
    again on the way out where they stay empty (a command that failed leaves no empty directories)."""
    lock = _lock_file(target)
    created = make_parents(target.parent)
    try:
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = lock_owner(target)
                if owner is not None:
                    raise InputError(being_written(target, owner)) from None
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
    finally:
        remove_if_empty(created)


@contextmanager
def atomic_dir(target: str | os.PathLike, kind: str = "export", force: bool = False,
               locked: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target` in one rename.

    Under the destination's lock (`locked`: the caller holds it already, taken before its work), and only where
    `check_destination(target, kind, force)` allows it (checked again at the end: the destination may have changed
    while the work ran)."""
    target = check_destination(target, kind, force)
    with nullcontext() if locked else destination_lock(target):
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
            raise _naming(exc, target, staging)


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


def _naming(exc: BaseException, target: Path, staging: Path | None = None) -> BaseException:
    """A write error that names no file (a short write, EFBIG from a bare write()) is given the artifact's; one
    that names a file in `staging`, which is gone by now, the same file in the artifact."""
    if isinstance(exc, OSError) and staging is not None:
        for attribute in ("filename", "filename2"):
            name = getattr(exc, attribute)
            if isinstance(name, str) and Path(name).is_relative_to(staging):
                setattr(exc, attribute, str(target / Path(name).relative_to(staging)))
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


# An I/O error as it reads once it has left Python's OSError: Rust's io::Error (safetensors, tokenizers) and a
# Python child process's last line.
ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def reported_os_error(message: str, path: str | os.PathLike) -> OSError | None:
    """The OSError `message` (a library's error, a child process's last line) reports, naming `path`, where that
    work was writing; None when it reports none."""
    match = ERRNO_IN_TEXT.search(message)
    if match is None:
        return None
    number = int(match.group(1) or match.group(2))
    return OSError(number, os.strerror(number), str(path))


# Errors only a write gives: the file they concern is the one written.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_os_error(exc: OSError, where: str | os.PathLike | None = None) -> str | None:
    """One line naming the path and the fix for an environment fault, or None for an OS error that is not one."""
    # A copy's error names its source first and its destination second (shutil): a full disk is the destination's.
    written = exc.filename2 if exc.errno in WRITE_ERRNOS else None
    path = written or exc.filename or where or "the output"
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
