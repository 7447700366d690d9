"""Saves that a crash, a kill or a pre-emption cannot leave half written.

A file is written beside its target (same directory, so the same filesystem), flushed and fsynced, then
renamed over the target, and the directory entry fsynced: a reader sees the old file or the new one.

A directory of several files (an adapter, a saved model) is built beside its target and switched in as
a whole. On Linux the switch is one renameat2(RENAME_EXCHANGE) of the two directories. Where the
filesystem lacks it, the target is first renamed to `<dir>.old` and the new one renamed into place; a
kill between those two renames leaves `<dir>.old`, which `existing()` (used by every lora_ext loader)
reads in its place. Files already in the target that the save does not write (another adapter's
subdirectory, a README, a tokenizer) are carried over as hard links, and every write inside the new
directory first unlinks its path, so a linked file is replaced, never written through.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from typing import Callable, Iterator

_OLD, _TMP = ".old", ".tmp-"


def _fsync(path: str) -> None:
    """A file's data, or a directory's entries, on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh(path: str) -> str:
    """`path`, with whatever was there unlinked: the file a writer then creates is a new one (in a
    directory built by atomic_directory, the old file may be a hard link into the live one)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return path


def write_file(path: str, writer: Callable[[str], None]) -> None:
    """writer(tmp_path) writes the content (torch.save, safetensors' save_file, savefig, ...); the result
    replaces `path` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        writer(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(directory)


def write_text(path: str, text: str) -> None:
    def writer(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_file(path, writer)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, f"renameat2({a!r}, {b!r}, RENAME_EXCHANGE): {os.strerror(err)}")


def _remove_stale(path: str) -> None:
    """Directories earlier saves of `path` left behind when killed (their process is gone)."""
    parent, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(parent):
        if not entry.startswith(f".{name}{_TMP}"):
            continue
        pid = entry[len(f".{name}{_TMP}"):].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _switch_files(new: str, path: str) -> None:
    """File by file, each atomically: for a target that is (or holds) the working directory, which must
    not be renamed away under the process."""
    for directory, _, files in os.walk(new):
        target = os.path.join(path, os.path.relpath(directory, new))
        os.makedirs(target, exist_ok=True)
        for name in files:
            os.replace(os.path.join(directory, name), os.path.join(target, name))
        _fsync(target)
    shutil.rmtree(new)


def _switch_in(new: str, path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    cwd = os.getcwd()
    if cwd == path or cwd.startswith(path + os.sep):
        return _switch_files(new, path)
    if not os.path.exists(path):
        os.rename(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new)  # now the previous directory
    else:
        shutil.rmtree(path + _OLD, ignore_errors=True)
        os.rename(path, path + _OLD)
        os.rename(new, path)
    shutil.rmtree(path + _OLD, ignore_errors=True)  # this save's, or one a killed save left
    _fsync(parent)


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(directory, name))
        _fsync(directory)


@contextlib.contextmanager
def atomic_directory(path: str, keep_existing: bool = True) -> Iterator[str]:
    """Yields a new directory to write `path`'s content into; when the block ends without an error it
    replaces `path` whole (else it is removed and `path` is untouched). keep_existing: what `path` holds
    now is there too (hard links), so a save that writes some files keeps the others; write each file
    through fresh()."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(path)
    new = os.path.join(parent, f".{name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    source = existing(path)
    if keep_existing and os.path.isdir(source):
        shutil.copytree(source, new, copy_function=os.link, symlinks=True)
    else:
        os.makedirs(new)
    try:
        yield new
        _fsync_tree(new)
        _switch_in(new, path)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def existing(path: str) -> str:
    """`path`, or the `<path>.old` a save killed between its two renames left in its place."""
    if not os.path.exists(path) and os.path.isdir(path + _OLD):
        return path + _OLD
    return path
