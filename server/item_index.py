"""Item vectors and the faiss index over them: the candidate retriever's versioned artifact.

The candidates step asks this index for the N items nearest to a user's recent history. It is
built from plain in-memory inputs (the catalog's texts and each user's positive items in time
order; no Redis here), saved as a directory, and published under the data directory so that
gateways load whichever version is current.

How the vectors are made
- Collaborative vectors (item2vec by matrix factorisation, Levy & Goldberg 2014): items that a
  user engages with within `window` steps of each other co-occur, weighted 1/distance. The counts
  become a shifted positive PMI matrix with context distribution smoothing (marginals raised to
  0.75, on both sides so the matrix stays symmetric), and its top `dim` eigenpairs give the vectors
  U * sqrt(lambda). Only positive eigenvalues are kept: with them, the inner product of two vectors
  approximates the PPMI of the pair (a negative eigenvalue, used as |lambda| as an SVD would, would
  turn a "never together" pattern into similarity). The eigenpairs come from a seeded randomized
  range finder (Halko, Martinsson & Tropp 2011), so a build is fast and deterministic.
- Text vectors: words, word bigrams, categories and attribute values of each item, TF-IDF weighted
  with an exact vocabulary. A vocabulary instead of feature hashing: the index is rebuilt whenever
  the catalog changes and never vectorises text outside a build, so there is nothing to keep stable
  across builds, and an exact vocabulary has no collisions.
- Items with interactions get their collaborative vector. For them a ridge regression from text to
  collaborative vector is learned; items without interactions (new items) get their text mapped
  through it, so a new item lands near the warm items whose texts resemble its own.
- With no interactions at all, every item gets a text vector reduced to `dim` (latent semantic
  analysis), so a fresh catalog still has neighbours.
- A popularity prior per item, POPULARITY_WEIGHT * log(1 + c) / log(1 + c_max) for an item with
  c interactions (items with none: the median), because cosine alone ranks a film seen twice like
  a film seen by everyone.
All vectors are L2-normalised.

Querying: the user vector is a recency-weighted mean of the history's vectors (history newest
last; weights halve every `HALF_LIFE` = 2 items: the newest weighs 1, the 3rd newest 0.5, the
5th 0.25), normalised. An item's score is its cosine with the user vector plus its prior: faiss
stores [vector, prior] rows and is queried with [user vector, 1], so one exact inner-product
search ranks by both. The flat index is exact and answers one query over 10^4 items in well
under a millisecond on a CPU; faiss-gpu provides the same classes, and a GPU only pays for batches.

On disk: `data_dir/indexes/<version>/` holds vectors.npy, priors.npy, index.faiss, item_ids.json
and manifest.json; the version is the UTC build time plus a hash of ids, vectors and priors.
`data_dir/indexes/current` names the current version. Versions are written to a hidden temporary
folder and renamed into place, and the pointer is replaced atomically, so a crash never leaves a
half-written version visible.
"""

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
"""Layout version of a saved index; `load` refuses others."""
DEFAULT_N = 50
HALF_LIFE = 2.0
"""Recency half-life of the query, in history items. ML-100K validation HR@10 with half-lives of
1, 2, 3 and 10 items: 0.199, 0.206, 0.198, 0.174; with no decay 0.112."""
SMOOTHING = 0.75
"""Context distribution smoothing of the PPMI marginals (the word2vec value)."""
SHIFT = 0.0
"""log(k) subtracted from PMI before clipping at 0 (k = 1: no shift, best on ML-100K)."""
POPULARITY_WEIGHT = 0.5
"""Largest popularity prior added to the cosine score. Validation HR@50 with weights 0, 0.5, 1:
ML-100K 0.485, 0.514, 0.514; synthetic 0.230, 0.283, 0.300. 0.5 takes most of the gain while
similarity still outweighs popularity (cosines span 2)."""
RIDGE = 3.0
"""L2 penalty of the text -> collaborative regression (text rows have norm 1). On ML-100K items
held out of the fit, 0.3 to 10 all predict their vectors within 0.01 cosine of each other."""
OVERSAMPLE = 16
POWER_ITERATIONS = 4
DENSE_FILL = 0.01
"""Sparse products densify row blocks when at least this share of the matrix is filled."""
BLOCK = 1 << 23
"""Entries per densified row block (64 MiB of float64)."""
STALE_TEMP_SECONDS = 3600
FILES = ("vectors.npy", "priors.npy", "index.faiss", "item_ids.json", "manifest.json")
_WORD = re.compile(r"\w+")
_VERSION = re.compile(r"^\d{8}T\d{12}Z-[0-9a-f]{12}$")


class ItemText(Protocol):
    """What the index reads of an item. `ItemUpsert` and `Item` fit; objects without
    `description` or `attributes` are accepted too (read as empty)."""

    @property
    def item_id(self) -> str: ...

    @property
    def title(self) -> str: ...

    @property
    def categories(self) -> Sequence[str]: ...


# Sparse matrices in plain numpy (scipy is not a dependency) ------------------------------------


@dataclass(frozen=True)
class _Sparse:
    """A sparse matrix as (row, col, value) triplets sorted by row, with what products need."""

    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray

    @classmethod
    def from_triplets(
        cls, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]
    ) -> "_Sparse":
        """Duplicates are summed; entries end up sorted by row, then column."""
        key = np.asarray(rows, dtype=np.int64) * shape[1] + np.asarray(cols, dtype=np.int64)
        unique, inverse = np.unique(key, return_inverse=True)
        sums = np.bincount(inverse, weights=vals, minlength=len(unique))
        return cls(shape, unique // shape[1], unique % shape[1], sums)

    def where(self, keep: np.ndarray, vals: np.ndarray | None = None) -> "_Sparse":
        """The entries where `keep` is true (optionally with new values), order kept."""
        vals = self.vals if vals is None else vals
        return _Sparse(self.shape, self.rows[keep], self.cols[keep], vals[keep])

    def take_rows(self, index: np.ndarray) -> "_Sparse":
        """The rows listed in `index`, renumbered 0..len(index)-1 in that order."""
        position = np.full(self.shape[0], -1, dtype=np.int64)
        position[index] = np.arange(len(index))
        keep = position[self.rows] >= 0
        shape = (len(index), self.shape[1])
        return _Sparse.from_triplets(
            position[self.rows[keep]], self.cols[keep], self.vals[keep], shape
        )

    @property
    def T(self) -> "_Sparse":
        return _Sparse.from_triplets(self.cols, self.rows, self.vals, self.shape[::-1])

    def row_sums(self) -> np.ndarray:
        return np.bincount(self.rows, weights=self.vals, minlength=self.shape[0])

    def __matmul__(self, dense: np.ndarray) -> np.ndarray:
        # BLAS on densified row blocks beats any numpy gather-and-sum by 10-50x once a few
        # percent of the matrix is filled (item co-occurrence on ML-100K: 10%); the per-column
        # sum is for large, sparse matrices, where densifying would cost more than it saves.
        if len(self.vals) >= DENSE_FILL * self.shape[0] * self.shape[1]:
            return self._blocked_product(dense)
        return self._sparse_product(dense)

    def _blocked_product(self, dense: np.ndarray) -> np.ndarray:
        n_rows, n_cols = self.shape
        out = np.zeros((n_rows, dense.shape[1]))
        step = max(1, BLOCK // max(n_cols, 1))
        for lo in range(0, n_rows, step):
            hi = min(lo + step, n_rows)
            a, b = np.searchsorted(self.rows, [lo, hi])
            block = np.zeros((hi - lo, n_cols))
            block[self.rows[a:b] - lo, self.cols[a:b]] = self.vals[a:b]
            out[lo:hi] = block @ dense
        return out

    def _sparse_product(self, dense: np.ndarray) -> np.ndarray:
        out = np.empty((self.shape[0], dense.shape[1]))
        for j, column in enumerate(np.asfortranarray(dense, dtype=np.float64).T):
            weights = self.vals * column[self.cols]
            out[:, j] = np.bincount(self.rows, weights=weights, minlength=self.shape[0])
        return out


# Collaborative vectors -----------------------------------------------------------------------


def _encode(sequences: Iterable[Sequence[str]], position: Mapping[str, int]) -> list[np.ndarray]:
    """Sequences as arrays of item positions; ids outside the catalog are dropped."""
    encoded = ([position[i] for i in seq if i in position] for seq in sequences)
    return [np.asarray(seq, dtype=np.int64) for seq in encoded if seq]


def _cooccurrence(sequences: list[np.ndarray], n: int, window: int) -> _Sparse:
    """Symmetric counts of items within `window` steps of each other, weighted 1/distance."""
    if not sequences:
        return _Sparse.from_triplets(np.zeros(0), np.zeros(0), np.zeros(0), (n, n))
    flat = np.concatenate(sequences)
    owner = np.repeat(np.arange(len(sequences)), [len(seq) for seq in sequences])
    rows, cols, vals = [], [], []
    for distance in range(1, window + 1):
        a, b = flat[:-distance], flat[distance:]
        keep = (owner[:-distance] == owner[distance:]) & (a != b)
        rows += [a[keep], b[keep]]
        cols += [b[keep], a[keep]]
        vals.append(np.full(2 * int(keep.sum()), 1.0 / distance))
    return _Sparse.from_triplets(
        np.concatenate(rows), np.concatenate(cols), np.concatenate(vals), (n, n)
    )


def _ppmi(counts: _Sparse, smoothing: float, shift: float) -> _Sparse:
    """max(PMI - shift, 0), with both marginals smoothed (keeps the matrix symmetric)."""
    if not len(counts.vals):
        return counts
    marginal = counts.row_sums() ** smoothing
    log_p = np.log(np.maximum(marginal, 1e-300) / marginal.sum())
    pmi = np.log(counts.vals / counts.vals.sum()) - log_p[counts.rows] - log_p[counts.cols]
    return counts.where(pmi > shift, pmi - shift)


def _top_eigen(
    apply: Callable[[np.ndarray], np.ndarray], n: int, dim: int, seed: int
) -> np.ndarray:
    """Rows U * sqrt(lambda) of the top `dim` positive eigenpairs of a symmetric n x n operator
    (zero-padded to `dim` columns). Randomized range finder with power iterations; exact when n
    is small."""
    width = dim + OVERSAMPLE
    if n <= width:
        basis = np.eye(n)
    else:
        rng = np.random.default_rng(seed)
        basis = _orthonormal(apply(rng.standard_normal((n, width))))
        for _ in range(POWER_ITERATIONS):
            basis = _orthonormal(apply(basis))
    small = basis.T @ apply(basis)
    values, vectors = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(values)[::-1][:dim]
    scale = np.sqrt(np.clip(values[order], 0.0, None))
    out = np.zeros((n, dim))
    out[:, : len(order)] = (basis @ vectors[:, order]) * scale
    return out


def _orthonormal(block: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the block's column space, from the eigenvectors of its Gram
    matrix, twice (the second pass restores the orthogonality the first loses to rounding).
    Not np.linalg.qr: Householder QR makes a threaded BLAS call per column, and on a busy
    machine each costs a thread wake-up (measured: 1.2 s per QR of 1682 x 80 on 2 loaded cores,
    against 20 ms with one thread); this takes three BLAS calls. Directions the block does not
    span (rank deficiency) are dropped."""
    for _ in range(2):
        values, vectors = np.linalg.eigh(block.T @ block)
        keep = values > values.max(initial=0.0) * 1e-12
        block = block @ (vectors[:, keep] / np.sqrt(values[keep]))
    return block


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 1e-9)


# Text vectors --------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _features(item: ItemText) -> list[str]:
    """Words and bigrams of title and description, categories, attribute values."""
    title = _words(item.title)
    description = _words(getattr(item, "description", "") or "")
    features = title + [f"{a} {b}" for a, b in itertools.pairwise(title)] + description
    features += [f"category:{category.lower()}" for category in item.categories]
    attributes: Mapping[str, Any] = getattr(item, "attributes", None) or {}
    for key, value in attributes.items():
        text = str(value).lower()
        if text.startswith(("http://", "https://")):
            continue  # a URL's words are noise (ML-100K's IMDb links repeat the title)
        if isinstance(value, str):
            features += _words(text)
        if len(text) <= 64:
            features.append(f"{key.lower()}={text}")
    return features


def _tfidf(items: Sequence[ItemText]) -> _Sparse:
    """Rows: items; columns: features; sublinear tf * smoothed idf, rows of norm 1."""
    vocabulary: dict[str, int] = {}
    rows, cols = [], []
    for row, item in enumerate(items):
        for feature in _features(item):
            rows.append(row)
            cols.append(vocabulary.setdefault(feature, len(vocabulary)))
    shape = (len(items), max(len(vocabulary), 1))
    counts = _Sparse.from_triplets(np.array(rows), np.array(cols), np.ones(len(rows)), shape)
    df = np.bincount(counts.cols, minlength=shape[1])
    idf = np.log((1 + shape[0]) / (1 + df)) + 1
    vals = (1 + np.log(counts.vals)) * idf[counts.cols]
    norms = np.sqrt(np.bincount(counts.rows, weights=vals**2, minlength=shape[0]))
    return _Sparse(shape, counts.rows, counts.cols, vals / norms[counts.rows])


def _ridge(x: _Sparse, y: np.ndarray, penalty: float, iterations: int = 100) -> np.ndarray:
    """argmin_W |xW - y|^2 + penalty |W|^2, by conjugate gradients on the normal equations (one
    run per column, vectorised): only sparse products, so the vocabulary size costs no memory
    beyond W itself. Stops at a residual of 1e-3 of the start: the predictions are normalised
    afterwards, so only their directions matter, and those settle long before."""
    xt = x.T
    w = np.zeros((x.shape[1], y.shape[1]))
    residual = xt @ y
    direction = residual.copy()
    energy = (residual**2).sum(axis=0)
    stop = 1e-6 * energy
    for _ in range(iterations):
        if (energy <= stop).all():
            break
        product = xt @ (x @ direction) + penalty * direction
        curvature = (direction * product).sum(axis=0)
        step = np.divide(energy, curvature, out=np.zeros_like(energy), where=curvature > 0)
        w += step * direction
        residual -= step * product
        new_energy = (residual**2).sum(axis=0)
        ratio = np.divide(new_energy, energy, out=np.zeros_like(energy), where=energy > 0)
        direction = residual + ratio * direction
        energy = new_energy
    return w


def _text_only(text: _Sparse, dim: int, seed: int) -> np.ndarray:
    """Latent semantic analysis: the top eigenvectors of the items' text similarity."""
    xt = text.T
    return _top_eigen(lambda q: text @ (xt @ q), text.shape[0], dim, seed)


# The index -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Built:
    vectors: np.ndarray
    priors: np.ndarray
    warm: int
    text_mapped: int


def _vectors(
    items: Sequence[ItemText], sequences: list[np.ndarray], dim: int, window: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of all items, and which of them were placed by their text alone."""
    n = len(items)
    started = time.perf_counter()
    ppmi = _ppmi(_cooccurrence(sequences, n, window), SMOOTHING, SHIFT)
    vectors = _normalise(_top_eigen(ppmi.__matmul__, n, dim, seed))
    log.debug("item index: collaborative vectors in %.2f s", time.perf_counter() - started)
    text = _tfidf(items)
    mapped = np.linalg.norm(vectors, axis=1) == 0
    if mapped.all():
        return _normalise(_text_only(text, dim, seed)), mapped
    if mapped.any():
        warm, cold = np.flatnonzero(~mapped), np.flatnonzero(mapped)
        weights = _ridge(text.take_rows(warm), vectors[warm], RIDGE)
        vectors[cold] = _normalise(text.take_rows(cold) @ weights)
    log.debug("item index: all vectors in %.2f s", time.perf_counter() - started)
    return vectors, mapped


def _priors(sequences: list[np.ndarray], n: int) -> np.ndarray:
    """POPULARITY_WEIGHT * log(1 + count) / log(1 + largest count). Items never interacted with
    get the median of the others: new items are neither buried under established ones nor
    pushed above them."""
    counts = np.bincount(np.concatenate(sequences), minlength=n) if sequences else np.zeros(n)
    if counts.max(initial=0) == 0:
        return np.zeros(n)
    priors = POPULARITY_WEIGHT * np.log1p(counts) / np.log1p(counts.max())
    priors[counts == 0] = np.median(priors[counts > 0])
    return priors


def _build(
    items: Sequence[ItemText], sequences: list[np.ndarray], dim: int, window: int, seed: int
) -> _Built:
    if not items:
        return _Built(np.zeros((0, dim)), np.zeros(0), 0, 0)
    vectors, mapped = _vectors(items, sequences, dim, window, seed)
    mapped_count = int(mapped.sum())
    return _Built(vectors, _priors(sequences, len(items)), len(items) - mapped_count, mapped_count)


def _digest(item_ids: Sequence[str], vectors: np.ndarray, priors: np.ndarray) -> str:
    digest = hashlib.sha256(json.dumps(list(item_ids)).encode())
    for array in (vectors, priors):
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ItemIndex:
    """Item vectors and popularity priors with a faiss inner-product index over them: row i is
    [vector_i, prior_i] and a query is [user vector, 1], so a score is the cosine similarity plus
    the item's prior, ranked exactly in one search. Immutable once built."""

    def __init__(
        self,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        priors: np.ndarray,
        manifest: Mapping[str, Any],
        index: faiss.Index | None = None,
    ):
        self._ids = list(item_ids)
        self._position = {item_id: i for i, item_id in enumerate(self._ids)}
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._priors = np.ascontiguousarray(priors, dtype=np.float32)
        if len(self._position) != len(self._ids):
            raise ValueError("item ids must be unique")
        if not len(self._ids) == len(self._vectors) == len(self._priors):
            raise ValueError("item ids, vectors and priors must match one to one")
        if index is None:
            index = faiss.IndexFlatIP(self._vectors.shape[1] + 1)
            index.add(np.hstack([self._vectors, self._priors[:, None]]))
        if index.ntotal != len(self._ids) or index.d != self._vectors.shape[1] + 1:
            raise ValueError("the faiss index does not match the vectors")
        self._index = index
        self.manifest: dict[str, Any] = dict(manifest)

    @classmethod
    def build(
        cls,
        items: Iterable[ItemText],
        sequences: Iterable[Sequence[str]],
        dim: int = 64,
        window: int = 5,
        seed: int = 0,
    ) -> "ItemIndex":
        """Index every catalog item. `sequences`: each user's positive item ids, oldest first;
        ids not in `items` are ignored. The same inputs always give the same vectors."""
        if dim < 1 or window < 1:
            raise ValueError("dim and window must be at least 1")
        started = time.perf_counter()
        catalog = list({item.item_id: item for item in items}.values())
        position = {item.item_id: i for i, item in enumerate(catalog)}
        encoded = _encode(sequences, position)
        built = _build(catalog, encoded, dim, window, seed)
        ids = [item.item_id for item in catalog]
        created = datetime.now(UTC)
        digest = _digest(ids, built.vectors, built.priors)
        manifest = {
            "format": FORMAT,
            "version": f"{created:%Y%m%dT%H%M%S%fZ}-{digest[:12]}",
            "created_at": created.isoformat(),
            "content_sha256": digest,
            "dim": dim,
            "items": len(ids),
            "warm_items": built.warm,
            "text_mapped_items": built.text_mapped,
            "sequences": len(encoded),
            "interactions": int(sum(len(seq) for seq in encoded)),
            "params": {"window": window, "seed": seed, "smoothing": SMOOTHING, "shift": SHIFT}
            | {"ridge": RIDGE, "half_life": HALF_LIFE, "popularity_weight": POPULARITY_WEIGHT},
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        log.info(
            "item index %s: %d items (%d from interactions, %d from text) in %.2f s",
            *(manifest["version"], len(ids), built.warm, built.text_mapped),
            manifest["build_seconds"],
        )
        return cls(ids, built.vectors, built.priors, manifest)

    # Reading -----------------------------------------------------------------------------------

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]

    @property
    def item_ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._position

    def vector(self, item_id: str) -> np.ndarray:
        """The item's unit vector (a copy); KeyError for an item not in the index."""
        return self._vectors[self._position[item_id]].copy()

    def popularity(self, item_ids: Iterable[str]) -> dict[str, float]:
        """Each indexed item's log-popularity relative to the most popular item's, 0 to 1 (its
        prior without the weight; never-seen items: the median); unknown ids are left out."""
        positions = {i: self._position[i] for i in item_ids if i in self._position}
        return {i: float(self._priors[p]) / POPULARITY_WEIGHT for i, p in positions.items()}

    def _query(self, history: Sequence[str]) -> np.ndarray | None:
        """Recency-weighted mean of the known history items' vectors, normalised."""
        known = [self._position[i] for i in reversed(history) if i in self._position]
        if not known:
            return None
        weights = 0.5 ** (np.arange(len(known)) / HALF_LIFE)
        query = weights @ self._vectors[known]
        norm = float(np.linalg.norm(query))
        return np.append(query / norm, 1.0).astype(np.float32) if norm > 1e-9 else None

    def search(
        self, history: Sequence[str], n: int = DEFAULT_N, exclude: Collection[str] = ()
    ) -> list[tuple[str, float]]:
        """Up to n (item id, score) pairs, best first, for a history given newest last; score =
        cosine similarity + popularity prior (0 to POPULARITY_WEIGHT).
        Neither the history's items nor `exclude` are returned; unknown history ids are ignored;
        [] when no history item is known (the caller falls back to popularity)."""
        query = self._query(history)
        if query is None or n <= 0:
            return []
        seen = set(history)
        # Asking for n plus every indexed item that may be dropped guarantees n survivors
        # (when the catalog has them) in a single faiss call.
        dropped = sum(1 for i in exclude if i in self._position)
        dropped += sum(1 for i in seen if i in self._position and i not in exclude)
        k = min(len(self._ids), n + dropped)
        scores, positions = self._index.search(query[None, :], k)
        results = []
        for score, position in zip(scores[0], positions[0], strict=True):
            item_id = self._ids[position] if position >= 0 else None
            if item_id is None or item_id in seen or item_id in exclude:
                continue
            results.append((item_id, float(score)))
            if len(results) == n:
                break
        return results

    # Files -------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write the index to `directory`, which must not exist: files go to a hidden temporary
        folder beside it that is renamed into place, so `directory` is complete or absent."""
        directory = Path(directory)
        if directory.exists():
            raise FileExistsError(f"{directory} exists; a saved index is never overwritten")
        directory.parent.mkdir(parents=True, exist_ok=True)
        temporary = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        try:
            self._write(temporary)
            os.rename(temporary, directory)
            _fsync(directory.parent)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    def _write(self, folder: Path) -> None:
        np.save(folder / "vectors.npy", self._vectors, allow_pickle=False)
        np.save(folder / "priors.npy", self._priors, allow_pickle=False)
        faiss.write_index(self._index, str(folder / "index.faiss"))
        (folder / "item_ids.json").write_text(json.dumps(self._ids), encoding="utf-8")
        # The manifest last: a folder holding one is complete.
        (folder / "manifest.json").write_text(json.dumps(self.manifest, indent=2), "utf-8")
        for name in FILES:
            _fsync(folder / name)
        _fsync(folder)

    @classmethod
    def load(cls, directory: Path) -> "ItemIndex":
        """Read a saved index; ValueError if its files are of another format or do not agree."""
        directory = Path(directory)
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{directory}: index format {manifest.get('format')}, not {FORMAT}")
        ids = json.loads((directory / "item_ids.json").read_text(encoding="utf-8"))
        vectors = np.load(directory / "vectors.npy", allow_pickle=False)
        priors = np.load(directory / "priors.npy", allow_pickle=False)
        if _digest(ids, vectors, priors) != manifest["content_sha256"]:
            raise ValueError(f"{directory}: item ids or vectors do not match the manifest")
        index = faiss.read_index(str(directory / "index.faiss"))
        return cls(ids, vectors, priors, manifest, index)


# Published versions ---------------------------------------------------------------------------


def index_dir(data_dir: Path) -> Path:
    """Where index versions live: one folder per version plus the `current` pointer file."""
    return Path(data_dir) / "indexes"


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
    return None if version is None else ItemIndex.load(index_dir(data_dir) / version)


def publish(index: ItemIndex, data_dir: Path, keep: int = 3) -> Path:
    """Save `index` as a new version, make it current, and delete all but the `keep` newest
    versions (the current one and the one before it are always kept, so a gateway that has just
    read the old pointer can still load it). Returns the version's folder."""
    root = index_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / index.version
    if not folder.exists():  # the same version means the same contents: already saved
        index.save(folder)
    pointer = root / f".current.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with pointer.open("w", encoding="utf-8") as handle:
            handle.write(index.version + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(pointer, root / "current")
        _fsync(root)
    finally:
        pointer.unlink(missing_ok=True)
    _prune(root, max(keep, 2), index.version)
    return folder


def _prune(root: Path, keep: int, current: str) -> None:
    """Remove old versions beyond the `keep` newest, and temporary folders left by crashes."""
    versions = sorted(p.name for p in root.iterdir() if p.is_dir() and _VERSION.match(p.name))
    for name in versions[:-keep]:
        if name != current:
            shutil.rmtree(root / name, ignore_errors=True)
    cutoff = time.time() - STALE_TEMP_SECONDS
    for path in root.glob(".*.tmp-*"):
        if path.stat().st_mtime >= cutoff:
            continue  # may belong to a publish still running
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
