"""Writes that outlive a machine crash, not only a process crash: a file's contents, and the
folder entry naming it, are on disk before a rename makes them visible (an atomic rename alone
can show a complete-looking folder of truncated files after a power loss)."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


def fsync(path: Path) -> None:
    """Flush one file, or the entries of one folder, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then every folder, itself last."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync(Path(root) / name)
        fsync(Path(root))


class WeightsNotWritten(OSError):
    """A write of weights that failed (a full disk): said in one line, not a traceback."""


@contextmanager
def weights_written(folder: Path) -> Iterator[None]:
    """safetensors reports a full disk with an error of its own, no OSError: made one here, so
    that what handles a failed write (one line, not a traceback) handles this one too."""
    try:
        yield
    except SafetensorError as exc:
        raise WeightsNotWritten(f"weights not written to {folder}: {exc}") from exc
