"""Guards on the paths a command writes, checked before anything is sent.

A run writes its output, its state directory and, when asked, a summary and
a metrics file; ``merge`` and ``export`` write one file each. Were any of
them the input, or one another, a paid result would be overwritten; were one
unwritable, the run would pay for every row and then fail to keep them.
``check_written`` refuses both up front with a ``UsageError`` naming the
setting; so it does ``-``, which other tools take for standard output.
``replace_file`` writes a small file (a summary, a metrics file) whole;
``claim_temporary`` takes the temporary a long write (export, merge) goes to.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path

from batchrun.errors import UsageError
from batchrun.layout import META_FILE, STATE_SUFFIX, state_dir

# (what the user calls it, e.g. "--summary"; the path)
Named = tuple[str, Path]

# The name other tools take for standard output; here it would be a file named "-".
STDOUT = "-"
# The first bytes of every SQLite database file.
_SQLITE_HEADER = b"SQLite format 3\x00"


def check_written(
    reads: Sequence[Named],
    files: Sequence[Named],
    directories: Sequence[Named] = (),
    *,
    own: Collection[Path] = (),
) -> None:
    """Refuse (``UsageError``) written ``files`` and ``directories`` that are
    ``-``, a read path or one another, a batchrun output or state directory
    (see ``_check_not_a_run``), or that cannot be written.

    ``own`` holds the paths among them that are this command's own output and
    state directory (a run's ``--out`` and ``OUT.batchrun``): those may be a
    batchrun output and a state directory, as a resume finds them.
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
    for name, path in written:
        _check_not_a_run(name, path, mine=path in own)
    for name, path in files:
        if path.is_dir():
            raise UsageError(f"{name} {path} is a directory: give a file name")
        _check_replaceable(name, path)
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


def _check_not_a_run(name: str, path: Path, *, mine: bool) -> None:
    """Refuse a path in a state directory (``X.batchrun/``, whose journal,
    store and marker say which rows are paid for) and, unless ``mine``, a
    state directory itself or an existing batchrun output (a file ``F`` with
    ``F.batchrun`` beside it): writing one would destroy another run's results
    or make it believe it had finished. Symbolic links are followed too."""
    inside = _state_dir_around(path)
    if inside is not None:
        raise UsageError(
            f"{name} {path} is inside {inside}, an output's state directory: writing"
            " there would damage that run's state; choose another path"
        )
    if mine:
        return
    for place in _places(path):
        if place.name.endswith(STATE_SUFFIX):
            raise UsageError(
                f"{name} {path}: a name ending in {STATE_SUFFIX} is an output's state"
                " directory, and writing it would damage that run's state; choose another path"
            )
        # A run not finished yet (live, stopped or killed) has no file at its
        # output's path, only the state beside it, with the run's meta.json
        # (a run refused before it began leaves none): it publishes there later.
        if (place.is_file() and state_dir(place).exists()) or (
            not place.exists() and (state_dir(place) / META_FILE).is_file()
        ):
            raise UsageError(
                f"{name} {path} is the output of a batchrun run (its state is in"
                f" {state_dir(place)}): writing it would destroy those results; choose another path"
            )


def _check_replaceable(name: str, path: Path) -> None:
    """Refuse a file that putting a new one in its place would wrong: a
    symbolic link (the link would be replaced, its target left as it was),
    a device, pipe or socket (``/dev/null`` would become a regular file),
    and a SQLite database (a result store, whose paid answers would go)."""
    if path.is_symlink():
        raise UsageError(
            f"{name} {path} is a symbolic link: batchrun puts a new file in its place in one"
            " step, which would replace the link and not write its target; give the target's"
            " path instead"
        )
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # none yet: ``_check_creatable`` tells whether one can be made
    if not stat.S_ISREG(mode):
        raise UsageError(
            f"{name} {path} is not a regular file (a device, a pipe or a socket): batchrun"
            " would put a regular file in its place; give a file name"
        )
    if _is_sqlite(path):
        raise UsageError(
            f"{name} {path} is a SQLite database (a result store?): writing it would destroy"
            " what it holds; choose another path"
        )


def _is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER
    except OSError:
        return False


def check_read_outside_state(name: str, path: Path) -> None:
    """Refuse a read path inside a state directory: a run rewrites and
    removes the files there (``--restart`` removes them all)."""
    inside = _state_dir_around(path)
    if inside is not None:
        raise UsageError(
            f"{name} {path} is inside {inside}, an output's state directory, whose files"
            " batchrun rewrites and removes: copy it elsewhere first"
        )


def _state_dir_around(path: Path) -> Path | None:
    """The state directory (``X.batchrun/``) that ``path``, as given or
    with its symbolic links resolved, lies in; None when it lies in none."""
    for place in _places(path):
        inside = next((p for p in place.parents if p.name.endswith(STATE_SUFFIX)), None)
        if inside is not None:
            return inside
    return None


def _places(path: Path) -> list[Path]:
    """``path`` as given (made absolute) and with its symbolic links resolved:
    a write through either may land in another run's files."""
    given = Path(os.path.abspath(path))
    try:
        return [given, path.resolve()]
    except (OSError, RuntimeError):  # a symbolic link loop
        return [given]


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
        try:
            return path.resolve()
        except RuntimeError:  # a loop of symbolic links: Python 3.13 raises it as this
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None
    return (stat.st_dev, stat.st_ino)


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: written beside it, then renamed over
    it, so a reader (a scheduler, a scraper) sees the old file or the new
    one, never a part, and a full disk leaves the old one. Not fsynced: the
    next write replaces it anyway. Raises OSError when it cannot."""
    # A name no other file has (48 random bits): a fixed "PATH.tmp" was written
    # over, then renamed away, whatever file had that name (the run's output or input).
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        # The cleanup's own failure must not hide why the write failed.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def claim_temporary(fresh: Path, to: Path) -> int:
    """Open and lock ``fresh``, the one temporary a command writes before
    renaming it to ``to``: a killed command's piece there is taken over (the
    writer truncates it), and a live one's makes this command stop with a
    ``UsageError`` instead of writing over it or renaming it away. The lock
    goes with the file, renamed or not; the caller closes the descriptor
    returned when done."""
    for _ in range(_CLAIM_TRIES):  # another command may rename or create it meanwhile
        if fresh.is_symlink():
            fresh.unlink(missing_ok=True)  # never written through
        held = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(held)
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            raise UsageError(
                f"another batchrun command is writing {to} now; run this one once it is done"
            ) from None
        if _still_named(held, fresh):  # not a file renamed away since it was opened
            return held
        os.close(held)
    raise UsageError(f"cannot take {fresh}: other commands writing {to} keep replacing it")


# Tries at taking a temporary that other commands keep renaming away.
_CLAIM_TRIES = 100


def _still_named(held: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(held), os.stat(path))
    except FileNotFoundError:
        return False
