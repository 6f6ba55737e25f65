"""Saved and published versions of the item index.

On disk: `data_dir/indexes/<version>/` holds vectors.npy, priors.npy, index.faiss, item_ids.json
and manifest.json; the version is the UTC build time plus a hash of ids, vectors and priors.
`data_dir/indexes/current` names the current version. Versions are written to a hidden temporary
folder and renamed into place, and the pointer is replaced atomically, so a crash never leaves a
half-written version visible.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from server.durable import fsync
from server.item_index import ItemIndex

FORMAT = 1
"""Layout version of a saved index; `load` refuses others."""
STALE_TEMP_SECONDS = 3600
FILES = ("vectors.npy", "priors.npy", "index.faiss", "item_ids.json", "manifest.json")
_VERSION = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{12}$")


def digest(item_ids: Sequence[str], vectors: np.ndarray, priors: np.ndarray) -> str:
    digest = hashlib.sha256(json.dumps(list(item_ids)).encode())
    for array in (vectors, priors):
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def save(index: ItemIndex, directory: Path) -> None:
    """Write the index to `directory`, which must not exist: files go to a hidden temporary
    folder beside it that is renamed into place, so `directory` is complete or absent."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists; a saved index is never overwritten")
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        _write(index, temporary)
        os.rename(temporary, directory)
        fsync(directory.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _write(index: ItemIndex, folder: Path) -> None:
    np.save(folder / "vectors.npy", index.vectors, allow_pickle=False)
    np.save(folder / "priors.npy", index.priors, allow_pickle=False)
    faiss.write_index(index.faiss_index, str(folder / "index.faiss"))
    (folder / "item_ids.json").write_text(json.dumps(index.item_ids), encoding="utf-8")
    # The manifest last: a folder holding one is complete.
    (folder / "manifest.json").write_text(json.dumps(index.manifest, indent=2), "utf-8")
    for name in FILES:
        fsync(folder / name)
    fsync(folder)


def load(directory: Path) -> ItemIndex:
    """Read a saved index; ValueError if its files are of another format or do not agree."""
    directory = Path(directory)
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}: index format {manifest.get('format')}, not {FORMAT}")
    ids = json.loads((directory / "item_ids.json").read_text(encoding="utf-8"))
    vectors = np.load(directory / "vectors.npy", allow_pickle=False)
    priors = np.load(directory / "priors.npy", allow_pickle=False)
    if digest(ids, vectors, priors) != manifest["content_sha256"]:
        raise ValueError(f"{directory}: item ids or vectors do not match the manifest")
    index = faiss.read_index(str(directory / "index.faiss"))
    return ItemIndex(ids, vectors, priors, manifest, index)


# Published versions ---------------------------------------------------------------------------


def index_dir(data_dir: Path) -> Path:
    """Where index versions live: one folder per version plus the `current` pointer file."""
    return Path(data_dir) / "indexes"


def check_writable(data_dir: Path) -> None:
    """Raise OSError now if no index could be published (before hours of training)."""
    root = index_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    probe = root / f".writable.tmp-{uuid.uuid4().hex[:8]}"  # swept by `_prune` if left
    probe.touch()
    probe.unlink()


def current_version(data_dir: Path) -> str | None:
    """The version `current` names, or None before the first publish. Cheap: gateways can poll
    it to notice a new version."""
    try:
        version = (index_dir(data_dir) / "current").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if not _VERSION.match(version):
        raise ValueError(f"{index_dir(data_dir) / 'current'} names no version: {version!r}")
    return version


def load_current(data_dir: Path) -> ItemIndex | None:
    """The current index, or None when none was published yet (candidates then use popularity)."""
    version = current_version(data_dir)
    return None if version is None else load(index_dir(data_dir) / version)


class IndexChanged(Exception):
    """Another index became current while this one was built from what it replaces."""


def publish(index: ItemIndex, data_dir: Path, keep: int = 3, replacing: str | None = None) -> Path:
    """Save `index` as a new version, make it current, and delete all but the `keep` most
    recently published versions (the current one and the one before it are always kept, so a
    gateway that has just read the old pointer can still load it). Returns the version's folder.
    One publish at a time (a lock file): `reasonrec index` and a bootstrap may publish at once.
    With `replacing`, only while that version is still the current one, else IndexChanged: a
    rebuild of the index it read must not undo a newer publish."""
    root = index_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / index.version
    with _locked(root):
        try:
            previous = current_version(data_dir)
        except ValueError:  # a garbage pointer: replaced below
            previous = None
        if replacing is not None and previous != replacing:
            raise IndexChanged(f"index {previous} became current meanwhile")
        if not folder.exists():  # the same version means the same contents: already saved
            save(index, folder)
        pointer = root / f".current.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with pointer.open("w", encoding="utf-8") as handle:
                handle.write(index.version + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(pointer, root / "current")
            fsync(root)
        finally:
            pointer.unlink(missing_ok=True)
        _prune(root, max(keep, 2), {index.version, previous})
    return folder


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    with (root / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prune(root: Path, keep: int, kept: set[str | None]) -> None:
    """Remove versions beyond the `keep` last published (by when their folder was written: a
    version built earlier may be published later) but those in `kept`, and temporary entries
    left by crashes."""
    versions = [p for p in root.iterdir() if p.is_dir() and _VERSION.match(p.name)]
    versions.sort(key=lambda path: path.stat().st_mtime)
    for path in versions[:-keep]:
        if path.name not in kept:
            shutil.rmtree(path, ignore_errors=True)
    cutoff = time.time() - STALE_TEMP_SECONDS
    for path in root.glob(".*.tmp-*"):
        try:
            if path.stat().st_mtime >= cutoff:
                continue  # may belong to a save still running
        except FileNotFoundError:  # its save finished meanwhile
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
