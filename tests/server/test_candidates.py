"""Candidates: the retrieval order, the filters, and cold start from popular and new items."""

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from server.candidates import Query, allowed, candidate_order, retrieve
from server.config import Settings
from server.context import load_context
from server.item_index import ItemIndex
from server.schemas import EventType, FeedbackEvent, Item, ItemUpsert
from server.store import Store, open_store

T0 = datetime(2024, 1, 1, tzinfo=UTC)

# candidate_order --------------------------------------------------------------------------------


def pop(*counts: tuple[str, float]) -> list[tuple[str, float]]:
    return list(counts)


@pytest.mark.parametrize(
    ("hits", "popular", "newest", "expected"),
    [
        # Nothing known: nothing to offer.
        ([], [], [], []),
        # Hits only, as the index ranked them, with their similarity scores.
        ([("h1", 0.9), ("h2", 0.4)], [], [], [("h1", 0.9), ("h2", 0.4)]),
        # Popular only: scores are shares of the popular counts.
        ([], pop(("a", 3), ("b", 1)), [], [("a", 0.75), ("b", 0.25)]),
        # One new item after every three popular ones; new items score 0.
        (
            [],
            pop(*((f"p{n}", 1) for n in range(1, 8))),
            ["n1", "n2"],
            [
                *((f"p{n}", 1 / 7) for n in (1, 2, 3)),
                ("n1", 0.0),
                *((f"p{n}", 1 / 7) for n in (4, 5, 6)),
                ("n2", 0.0),
                ("p7", 1 / 7),
            ],
        ),
        # More new items than popular triples: the rest of the new items follow.
        (
            [],
            pop(("p1", 1), ("p2", 1)),
            ["n1", "n2", "n3"],
            [("p1", 0.5), ("p2", 0.5), ("n1", 0.0), ("n2", 0.0), ("n3", 0.0)],
        ),
        # New items only (a catalog nobody has engaged with yet).
        ([], [], ["n1", "n2"], [("n1", 0.0), ("n2", 0.0)]),
        # Hits first, then popular and new.
        (
            [("h1", 0.8)],
            pop(("p1", 2), ("p2", 2)),
            ["n1"],
            [("h1", 0.8), ("p1", 0.5), ("p2", 0.5), ("n1", 0.0)],
        ),
        # A hit that is also popular or new appears once, where the hits put it.
        (
            [("p2", 0.7), ("n1", 0.6)],
            pop(("p1", 1), ("p2", 1)),
            ["n1"],
            [("p2", 0.7), ("n1", 0.6), ("p1", 0.5)],
        ),
        # A popular item that is also among the newest, reached first as popular.
        (
            [],
            pop(("a", 2), ("b", 1), ("c", 1)),
            ["a"],
            [("a", 0.5), ("b", 0.25), ("c", 0.25)],
        ),
    ],
)
def test_candidate_order(
    hits: list[tuple[str, float]],
    popular: list[tuple[str, float]],
    newest: list[str],
    expected: list[tuple[str, float]],
) -> None:
    got = candidate_order(hits, popular, newest)
    assert [item_id for item_id, _ in got] == [item_id for item_id, _ in expected]
    assert [score for _, score in got] == pytest.approx([score for _, score in expected])


def test_candidate_order_never_repeats_an_item() -> None:
    hits = [("a", 0.9), ("b", 0.8)]
    popular = [("b", 5.0), ("c", 4.0), ("a", 3.0), ("d", 1.0)]
    newest = ["d", "c", "e", "e"]
    ids = [item_id for item_id, _ in candidate_order(hits, popular, newest)]
    assert len(ids) == len(set(ids)) == 5


def test_a_popular_new_item_keeps_its_popularity_share() -> None:
    popular = [("a", 1.0), ("b", 1.0), ("c", 1.0), ("d", 1.0)]
    assert dict(candidate_order([], popular, ["d"]))["d"] == pytest.approx(0.25)


# allowed ----------------------------------------------------------------------------------------


def make_item(
    item_id: str = "i1",
    categories: list[str] | None = None,
    available: bool = True,
    hidden: bool = False,
) -> Item:
    return Item(
        item_id=item_id,
        title=f"Title {item_id}",
        categories=categories if categories is not None else ["drama"],
        available=available,
        hidden=hidden,
        created_at=T0,
    )


@pytest.mark.parametrize(
    ("item", "exclude", "categories", "expected"),
    [
        # A plain item, no filters.
        (make_item(), set(), None, True),
        # Hidden (DELETE /v1/items): never.
        (make_item(hidden=True), set(), None, False),
        # Unavailable: never.
        (make_item(available=False), set(), None, False),
        # Excluded (seen, in the history, or asked): never.
        (make_item("i1"), {"i1"}, None, False),
        # Someone else excluded.
        (make_item("i1"), {"i2"}, None, True),
        # One of the wanted categories.
        (make_item(categories=["drama", "crime"]), set(), {"crime", "horror"}, True),
        # None of the wanted categories.
        (make_item(categories=["drama"]), set(), {"crime"}, False),
        # No categories at all, with a category filter.
        (make_item(categories=[]), set(), {"crime"}, False),
        # An empty filter set matches nothing (None means "no filter").
        (make_item(), set(), set(), False),
        # Hidden wins over a matching category.
        (make_item(hidden=True, categories=["crime"]), set(), {"crime"}, False),
    ],
)
def test_allowed(
    item: Item, exclude: set[str], categories: set[str] | None, expected: bool
) -> None:
    assert allowed(item, exclude, categories) is expected


# retrieve, on the real store --------------------------------------------------------------------


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    async with open_store(settings) as opened:
        yield opened


def catalog_item(item_id: str, age_days: int, **fields: object) -> ItemUpsert:
    return ItemUpsert(
        item_id=item_id,
        title=f"Title {item_id}",
        categories=[str(fields.pop("category", "drama"))],
        created_at=T0 - timedelta(days=age_days),
        **fields,
    )


async def engage(store: Store, item_id: str, users: int, prefix: str = "fan") -> None:
    """`users` distinct users click the item once: its popularity is `users`."""
    events = [
        FeedbackEvent(user_id=f"{prefix}{n}", item_id=item_id, type=EventType.click, timestamp=T0)
        for n in range(users)
    ]
    assert all(await store.add_feedback(events))


@pytest.fixture
async def shop(store: Store) -> Store:
    """Old items p1..p4 with popularity 5, 4, 3, 2; new items n1 (newest), n2, n3 nobody engaged
    with; an old hidden item and an old unavailable one, popularity 1 each."""
    await store.upsert_items(
        [
            *(catalog_item(f"p{n}", age_days=100 + n) for n in range(1, 5)),
            catalog_item("n1", age_days=1),
            catalog_item("n2", age_days=2),
            catalog_item("n3", age_days=3, category="comedy"),
            catalog_item("gone", age_days=200),
            catalog_item("sold-out", age_days=200, available=False),
        ]
    )
    for item_id, users in [("p1", 5), ("p2", 4), ("p3", 3), ("p4", 2), ("gone", 1)]:
        await engage(store, item_id, users)
    await engage(store, "sold-out", 1, prefix="buyer")
    assert await store.hide_item("gone")
    return store


async def candidates_of(
    store: Store,
    user_id: str,
    n: int = 50,
    exclude_seen: bool = True,
    categories: list[str] | None = None,
) -> list[tuple[str, float]]:
    """(item id, score) of the candidates for `user_id`, without an index."""
    context = await load_context(store, user_id, history_limit=20)
    query = Query(n=n, history=20, exclude_seen=exclude_seen, categories=categories)
    found = await retrieve(store, None, context, query)
    return [(c.item.item_id, c.score) for c in found.items]


async def test_cold_start_gets_popular_and_new_items(shop: Store) -> None:
    context = await load_context(shop, "never-seen", history_limit=20)
    found = await retrieve(shop, None, context, Query(n=50, history=20))

    assert found.cold_start is True
    assert found.history == []
    # Shares of the popular window, hidden and unavailable items included: 5+4+3+2+1+1.
    total = 16
    assert [(c.item.item_id, c.score) for c in found.items] == [
        ("p1", round(5 / total, 6)),
        ("p2", round(4 / total, 6)),
        ("p3", round(3 / total, 6)),
        ("n1", 0.0),  # the newest item after the first three popular ones
        ("p4", round(2 / total, 6)),
        # The next new-item slot comes after three popular entries, two of them filtered out.
        ("n2", 0.0),
        ("n3", 0.0),
    ]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, ["p1"]),  # the most popular only
        (4, ["p1", "p2", "p3", "n1"]),  # a new item already among four
    ],
)
async def test_cold_start_is_cut_to_n(shop: Store, n: int, expected: list[str]) -> None:
    assert [item_id for item_id, _ in await candidates_of(shop, "never-seen", n=n)] == expected


async def test_cold_start_with_a_category_filter(shop: Store) -> None:
    assert [i for i, _ in await candidates_of(shop, "never-seen", categories=["comedy"])] == ["n3"]
    assert await candidates_of(shop, "never-seen", categories=["horror"]) == []


async def test_a_user_without_an_index_gets_unseen_popular_and_new(shop: Store) -> None:
    await engage(shop, "p1", 1, prefix="reader")
    await engage(shop, "n1", 1, prefix="reader")

    ids = [item_id for item_id, _ in await candidates_of(shop, "reader0")]

    # What a newcomer gets (see above), less the two items this user has seen.
    assert ids == ["p2", "p3", "p4", "n2", "n3"]


async def test_empty_catalog_has_no_candidates(store: Store) -> None:
    assert await candidates_of(store, "anyone") == []


def space_and_love_index() -> ItemIndex:
    """Two taste clusters in two dimensions; no popularity prior, so scores are cosines."""
    ids = ["s1", "s2", "s3", "l1", "l2"]
    raw = np.array([[1, 0], [1, 0.1], [1, 0.3], [0.2, 1], [0, 1]], dtype=np.float32)
    vectors = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    return ItemIndex(ids, vectors, np.zeros(len(ids), dtype=np.float32), {"version": "test"})


async def test_warm_user_gets_index_hits_first(store: Store) -> None:
    await store.upsert_items(
        [
            *(catalog_item(i, age_days=50) for i in ["s1", "s2", "s3", "l1", "l2"]),
            catalog_item("new", age_days=0),  # not in the index yet
        ]
    )
    await engage(store, "l2", 3)
    await engage(store, "s1", 1, prefix="astronaut")
    index = space_and_love_index()

    context = await load_context(store, "astronaut0", history_limit=20)
    found = await retrieve(store, index, context, Query(n=50, history=20))

    assert found.cold_start is False
    assert [(item.item_id, ts) for item, ts in found.history] == [("s1", T0.timestamp())]
    ids = [c.item.item_id for c in found.items]
    # Hits by similarity to the history (s1 itself excluded), then the item the index lacks.
    assert ids == ["s2", "s3", "l1", "l2", "new"]
    scores = [c.score for c in found.items]
    assert scores[0] > scores[1] > scores[2] > scores[4] == 0.0


async def test_exclude_seen_false_readmits_seen_items_beyond_the_history(store: Store) -> None:
    await store.upsert_items([catalog_item(i, age_days=10) for i in ["a", "b", "c"]])
    await engage(store, "a", 1, prefix="me")
    await engage(store, "b", 1, prefix="me")
    context = await load_context(store, "me0", history_limit=1)  # history: only the latest

    excluded = await retrieve(store, None, context, Query(n=50, history=1))
    readmitted = await retrieve(store, None, context, Query(n=50, history=1, exclude_seen=False))

    assert {c.item.item_id for c in excluded.items} == {"c"}
    # Both were seen; only the one outside the prompt's history comes back.
    assert len(context.history) == 1
    history_item = context.history[0][0]
    assert {c.item.item_id for c in readmitted.items} == {"a", "b", "c"} - {history_item}


async def clicked_a_b_c(store: Store) -> None:
    """Items a to d; user "me" clicked a, b and c, an hour apart."""
    await store.upsert_items([catalog_item(i, age_days=10) for i in ["a", "b", "c", "d"]])
    events = [
        FeedbackEvent(
            user_id="me", item_id=item, type=EventType.click, timestamp=T0 + timedelta(hours=n)
        )
        for n, item in enumerate(["a", "b", "c"])
    ]
    assert all(await store.add_feedback(events))


async def test_a_longer_prompt_history_does_not_change_the_candidates(store: Store) -> None:
    # A compact-rendering model shows 50 history items; retrieval must still be queried with
    # the configured 20, or the model would rerank another list than the fallback serves.
    await clicked_a_b_c(store)
    short = await load_context(store, "me", history_limit=1)
    long = await load_context(store, "me", history_limit=3)
    query = Query(n=50, history=1, exclude_seen=False)

    from_short = await retrieve(store, None, short, query)
    from_long = await retrieve(store, None, long, query)

    assert [c.item.item_id for c in from_long.items] == [c.item.item_id for c in from_short.items]
    assert [item.item_id for item, _ in from_long.history] == ["a", "b", "c"]


async def test_filters_that_thin_the_candidates_read_deeper(store: Store) -> None:
    """Twenty popular comedies, then three older dramas fewer engaged with: with n=2 the first
    read (8 popular items) holds no drama, yet the three exist and are found."""
    await store.upsert_items(
        [
            *(catalog_item(f"c{n}", age_days=100, category="comedy") for n in range(20)),
            *(catalog_item(f"d{n}", age_days=200) for n in range(3)),
        ]
    )
    for n in range(20):
        await engage(store, f"c{n}", 30 - n)
    for n in range(3):
        await engage(store, f"d{n}", 3 - n)

    found = await candidates_of(store, "never-seen", n=2, categories=["drama"])

    assert [item_id for item_id, _ in found] == ["d0", "d1"]


async def test_a_filter_few_items_pass_reads_no_item_text_but_the_candidates(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A category no item has read every item deep enough whole, 20,000-character descriptions
    and all, at every deepening: 150 times a request's usual bytes (a denial of service)."""
    long = "x" * 5000
    await store.upsert_items(
        [
            *(
                catalog_item(f"c{n}", age_days=100, category="comedy", description=long)
                for n in range(300)
            ),
            catalog_item("d0", age_days=200, description=long),
        ]
    )
    read: list[str] = []
    get_items = Store.get_items

    async def counted(self: Store, item_ids):
        read.extend(item_ids)
        return await get_items(self, item_ids)

    monkeypatch.setattr(Store, "get_items", counted)

    assert await candidates_of(store, "never-seen", n=2, categories=["nope"]) == []
    found = await candidates_of(store, "never-seen", n=2, categories=["drama"])

    assert [item_id for item_id, _ in found] == ["d0"]
    assert sorted(read) == ["d0"]  # the one candidate; the rest were filtered without text


async def test_an_item_unreadable_beyond_what_filters_read_gives_its_place_to_the_next(
    store: Store,
) -> None:
    await store.upsert_items([catalog_item(f"d{n}", age_days=200 + n) for n in range(3)])
    await store.redis.hdel(store.keys.item("d0"), "title")  # written by hand, say

    found = await candidates_of(store, "never-seen", n=2, categories=["drama"])

    assert [item_id for item_id, _ in found] == ["d1", "d2"]


async def test_items_the_policy_would_not_serve_take_no_candidates_place(store: Store) -> None:
    """Unavailable by an attribute (the policy's `available`, default on): they filled the
    candidates, the policy dropped them after, and lists came back short or empty."""
    await store.upsert_items(
        [
            *(catalog_item(f"out{n}", 100, attributes={"available": "no"}) for n in range(12)),
            *(catalog_item(f"ok{n}", 100) for n in range(3)),
        ]
    )
    for n in range(12):
        await engage(store, f"out{n}", 20 - n)
    for n in range(3):
        await engage(store, f"ok{n}", 3 - n)

    found = await candidates_of(store, "never-seen", n=3)

    assert [item_id for item_id, _ in found] == ["ok0", "ok1", "ok2"]


async def test_exclude_seen_false_never_offers_what_the_prompt_shows(store: Store) -> None:
    """A compact model's prompt shows 50 history items, retrieval reads 20: items 21 to 50 were
    both history and candidates."""
    await clicked_a_b_c(store)
    context = await load_context(store, "me", history_limit=3)

    found = await retrieve(
        store, None, context, Query(n=50, history=1, shown=3, exclude_seen=False)
    )

    assert [c.item.item_id for c in found.items] == ["d"]


async def test_a_category_nobody_engaged_with_is_found_for_a_user_without_history(
    store: Store,
) -> None:
    """Old items of a rare category, never clicked, behind newer ones: only the newest n were
    read, so the filter found none of them."""
    await store.upsert_items(
        [
            *(catalog_item(f"r{n}", age_days=200 + n, category="rare") for n in range(20)),
            *(catalog_item(f"c{n}", age_days=n) for n in range(10)),
        ]
    )
    for n in range(3):
        await engage(store, f"c{n}", 3 - n)

    found = await candidates_of(store, "never-seen", n=5, categories=["rare"])

    assert [item_id for item_id, _ in found] == ["r0", "r1", "r2", "r3", "r4"]
