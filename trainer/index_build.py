"""Building the item index (`server.item_index.ItemIndex`): vectors and popularity priors.

Built from plain in-memory inputs (the catalog's texts and each user's positive items in time
order; no Redis here); `server.index_files.publish` makes a built index the one gateways load.

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
"""

import hashlib
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from server import index_files
from server.item_index import HALF_LIFE, POPULARITY_WEIGHT, ItemIndex

log = logging.getLogger(__name__)

SMOOTHING = 0.75
"""Context distribution smoothing of the PPMI marginals (the word2vec value)."""
SHIFT = 0.0
"""log(k) subtracted from PMI before clipping at 0 (k = 1: no shift, best on ML-100K)."""
RIDGE = 3.0
"""L2 penalty of the text -> collaborative regression (text rows have norm 1). On ML-100K items
held out of the fit, 0.3 to 10 all predict their vectors within 0.01 cosine of each other."""
OVERSAMPLE = 16
POWER_ITERATIONS = 4
DENSE_FILL = 0.01
"""Sparse products densify row blocks when at least this share of the matrix is filled."""
BLOCK = 1 << 23
"""Entries per densified row block (64 MiB of float64)."""
_WORD = re.compile(r"\w+")


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


def _catalog(items: Iterable[ItemText]) -> tuple[list[ItemText], dict[str, int]]:
    """Each item once (the last of equal ids), and each id's row."""
    catalog = list({item.item_id: item for item in items}.values())
    return catalog, {item.item_id: i for i, item in enumerate(catalog)}


def inputs_digest(
    items: Iterable[ItemText],
    sequences: Iterable[Sequence[str]],
    dim: int = 64,
    window: int = 5,
    seed: int = 0,
) -> str:
    """A hash of what `build_index` reads: equal inputs, equal index. A refresh compares it with
    the current index's to rebuild only when the catalog or the interactions changed."""
    catalog, position = _catalog(items)
    digest = hashlib.sha256(json.dumps([dim, window, seed]).encode())
    for item in catalog:
        digest.update(json.dumps([item.item_id, _features(item)]).encode())
    for sequence in _encode(sequences, position):
        digest.update(sequence.tobytes() + b";")
    return digest.hexdigest()


def build_index(
    items: Iterable[ItemText],
    sequences: Iterable[Sequence[str]],
    dim: int = 64,
    window: int = 5,
    seed: int = 0,
) -> ItemIndex:
    """Index every catalog item. `sequences`: each user's positive item ids, oldest first;
    ids not in `items` are ignored. The same inputs always give the same vectors."""
    if dim < 1 or window < 1:
        raise ValueError("dim and window must be at least 1")
    started = time.perf_counter()
    catalog, position = _catalog(items)
    sequences = list(sequences)
    encoded = _encode(sequences, position)
    built = _build(catalog, encoded, dim, window, seed)
    ids = [item.item_id for item in catalog]
    created = datetime.now(UTC)
    digest = index_files.digest(ids, built.vectors, built.priors)
    manifest = {
        "format": index_files.FORMAT,
        "version": f"{created:%Y%m%dT%H%M%S%fZ}-{digest[:12]}",
        "created_at": created.isoformat(),
        "content_sha256": digest,
        "inputs_sha256": inputs_digest(catalog, sequences, dim, window, seed),
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
    return ItemIndex(ids, built.vectors, built.priors, manifest)
