"""Where an output's work in progress lives: ``OUT.batchrun/`` beside ``OUT``.

The one definition of the state directory's name and of the partial output's
place in it, and of its meta file; ``state.StateDir`` names the other files.
"""

from __future__ import annotations

from pathlib import Path

from batchrun.errors import UsageError

__all__ = ["META_FILE", "STATE_SUFFIX", "output_of", "partial_output", "state_dir"]

# What ends the name of every state directory, and nothing else batchrun writes.
STATE_SUFFIX = ".batchrun"
# The file in a state directory that says which job it is the work of; a run
# writes it before its first row.
META_FILE = "meta.json"


def state_dir(out: Path) -> Path:
    """The directory beside ``out`` that holds a run's work in progress;
    ``UsageError`` when ``out`` names no file ("." or "/", which an empty
    path also becomes)."""
    if not out.name:
        raise UsageError(f"the output {out} is a directory: give the output's file name")
    return out.with_name(out.name + STATE_SUFFIX)


def output_of(root: Path) -> Path | None:
    """The output whose state directory ``root`` is named as (``state_dir``'s
    inverse); None when the name is no state directory's."""
    if not root.name.endswith(STATE_SUFFIX) or root.name == STATE_SUFFIX:
        return None
    return root.with_name(root.name[: -len(STATE_SUFFIX)])


def partial_output(out: Path) -> Path:
    """The ordered output written so far, published to ``out`` when complete."""
    return state_dir(out) / "output.partial"
