"""Every file mfconvert writes (models, JSON side files, checkpoints): checked before the long work
starts, never one of the files the command reads, written atomically (an exclusive temporary file
beside it, then a rename) with the mode the umask gives."""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import BinaryIO, Iterator

TEMP_PREFIX = ".mfconvert-"      # temporary files: .mfconvert-<random>.tmp beside the target


class WriteError(OSError):
    """Writing a file failed; the temporary file is gone and a file it was to replace is intact.
    str() is one line: the path, the system's reason, and any note on what was kept."""

    def __init__(self, path: str, err: OSError, note: str = ""):
        super().__init__(err.errno, err.strerror or str(err))
        self.path, self.note = path, note

    def __str__(self) -> str:
        return f"{self.path}: cannot write ({self.strerror})" + (f"; {self.note}" if self.note else "")


def _refuse(message: str) -> None:
    from mfconvert.convert.onnx_model import ConversionError   # onnx_model imports this module
    raise ConversionError(message)


def _same_file(a: str, b: str) -> bool:
    """Same file through symlinks and hard links (samefile), or the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:   # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _probe_directory(parent: str) -> None:
    """Create and remove a temporary file: the one test of writability that holds for root and
    read-only mounts too."""
    fd, tmp = create_temp(parent)
    os.close(fd)
    os.unlink(tmp)


def check_outputs(outputs: dict[str, str | os.PathLike | None], reads: dict[str, str | os.PathLike | None],
                  force: bool, reused: tuple[str, ...] = ()) -> None:
    """Refuse, before any work: an output that is one of the files read (`reads`: {label: path},
    e.g. {"the input model": "m.onnx"}) or another output, a directory or other non-regular file,
    an existing file without `force` (the outputs named in `reused` may exist: a checkpoint to
    resume), and a directory that is missing or cannot be written. `outputs`: {flag: path}; the
    flag prefixes the message (empty for the Python API). None paths are skipped."""
    given = {flag: os.fspath(p) for flag, p in outputs.items() if p is not None}
    read = {label: os.fspath(p) for label, p in reads.items() if p is not None}
    seen: dict[str, str] = {}
    for flag, path in given.items():
        name = f"{flag} {path}" if flag else path
        for label, source in read.items():
            if _same_file(path, source):
                _refuse(f"{name}: refusing to overwrite {label}; choose another {flag or 'output'}")
        for other_flag, other in seen.items():
            if _same_file(path, other):
                _refuse(f"{name}: also given as {other_flag or 'another output'}; each output needs its own file")
        seen[flag] = path
        if os.path.isdir(path):
            _refuse(f"{name}: is a directory; give a file path")
        if os.path.lexists(path):
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) and os.path.isfile(path)):
                _refuse(f"{name}: not a regular file; refusing to replace it")
            if not force and flag not in reused:
                _refuse(f"{name}: already exists; pass --force to replace it")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            _refuse(f"{name}: directory {parent} does not exist")
        try:
            _probe_directory(parent)
        except OSError as err:
            _refuse(f"{name}: cannot write in {parent} ({err.strerror or err})")


def create_temp(parent: str) -> tuple[int, str]:
    """(fd, path) of a new, empty file in `parent`, created exclusively (O_EXCL: never an existing
    file or a planted symlink) with mode 0666 less the umask, as open() would create the target."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(parent, f"{TEMP_PREFIX}{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free temporary file name")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """`with atomic_file(p) as f: f.write(...)`: the data goes to a temporary file beside `p`,
    flushed to disk, then renamed over `p`: readers see the old file or the whole new one. On any
    error the temporary file is removed; an OSError becomes a WriteError naming `p`."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = create_temp(parent)
    except OSError as err:
        raise WriteError(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(path, err) from None
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> int:
    with atomic_file(path) as f:
        f.write(data)
    return len(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> int:
    return write_bytes_atomic(path, text.encode("utf-8"))
