"""Guards on the paths a command writes, checked before anything is sent.

A run writes its output, its state directory and, when asked, a summary and
a metrics file; ``merge`` and ``export`` write one file each. Were any of
them the input, or one another, a paid result would be overwritten; were one
unwritable, the run would pay for every row and then fail to keep them.
``check_written`` refuses both up front with a ``UsageError`` naming the
setting; so it does ``-``, which other tools take for standard output.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from batchrun.errors import UsageError

# (what the user calls it, e.g. "--summary"; the path)
Named = tuple[str, Path]

# The name other tools take for standard output; here it would be a file named "-".
STDOUT = "-"


def check_written(
    reads: Sequence[Named], files: Sequence[Named], directories: Sequence[Named] = ()
) -> None:
    """Refuse (``UsageError``) written ``files`` and ``directories`` that are
    ``-``, a read path or one another, or that cannot be written.

    A file must not be an existing directory, and its directory must exist and
    take a new file. A directory may exist (as a directory) or be creatable.
    """
    written = [*files, *directories]
    for name, path in written:
        if str(path) == STDOUT:
            raise UsageError(
                f"{name} -: batchrun writes a file, not standard output (it puts a"
                " complete file in place in one step); give a file name"
            )
    _check_distinct(reads, written)
    for name, path in files:
        if path.is_dir():
            raise UsageError(f"{name} {path} is a directory: give a file name")
        _check_creatable(name, path)
    for name, path in directories:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{name} {path} exists and is not a directory")
        if not path.exists():
            _check_creatable(name, path)


def _check_distinct(reads: Sequence[Named], written: Sequence[Named]) -> None:
    seen: dict[object, str] = {}
    for name, path in reads:
        seen.setdefault(_identity(path), name)
    for name, path in written:
        where = _identity(path)
        other = seen.get(where)
        if other is not None:
            raise UsageError(
                f"{name} {path} is also {other}: writing it would destroy that; choose another path"
            )
        seen[where] = name


def _check_creatable(name: str, path: Path) -> None:
    """The directory of ``path`` exists and a new file can be made in it."""
    parent = path.parent
    if not parent.is_dir():
        what = "does not exist" if not parent.exists() else "is not a directory"
        raise UsageError(f"{name} {path}: the directory {parent} {what}")
    try:
        # A real file, made and removed: permission bits alone do not tell
        # (root, read-only mounts, /proc).
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".batchrun-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"{name} {path}: cannot write in {parent} ({reason})") from None


def _identity(path: Path) -> object:
    """What names one file: its inode when it exists (hard and symbolic links
    included), else its absolute path."""
    try:
        stat = path.stat()
    except OSError:
        return path.resolve()
    return (stat.st_dev, stat.st_ino)
