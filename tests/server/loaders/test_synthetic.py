from collections import Counter
from itertools import pairwise

import numpy as np
import pytest

from server.loaders.synthetic import fewest_events, generate


def _dump(dataset) -> list:
    return [m.model_dump() for m in (*dataset.items, *dataset.users, *dataset.events)]


def test_same_seed_same_data_other_seed_other_data() -> None:
    assert _dump(generate(users=20, items=100, seed=3)) == _dump(
        generate(users=20, items=100, seed=3)
    )
    assert _dump(generate(users=20, items=100, seed=3)) != _dump(
        generate(users=20, items=100, seed=4)
    )


@pytest.mark.parametrize(("users", "per_user"), [(1, 1), (3, 40), (200, 2), (300, 40), (40, 500)])
def test_the_floor_a_set_is_refused_on_is_below_what_is_made(users: int, per_user: int) -> None:
    """`load` refuses a set before making it when this floor is over the stream's length: a set
    made below it would have been refused though it fits."""
    counts = [generate(users, 10, per_user, seed=seed).event_count for seed in range(5)]
    assert min(counts) >= fewest_events(users, per_user) >= users * 5, counts
    assert fewest_events(users, per_user) > 0.8 * min(counts) or users * per_user < 1000, counts


def test_sizes_and_valid_references() -> None:
    data = generate(users=50, items=200, events_per_user=30, seed=1)
    assert len(data.items) == 200 and len(data.users) == 50
    item_ids = {item.item_id for item in data.items}
    assert all(event.item_id in item_ids for event in data.events)
    assert data.event_count == len(data.events) > 50 * 10
    timestamps = [event.timestamp for event in data.events]
    assert timestamps == sorted(timestamps)


def test_popularity_is_long_tailed_and_new_items_are_cold() -> None:
    data = generate(users=300, items=500, seed=2)
    counts = Counter(event.item_id for event in data.events)
    ranked = sorted(counts.values(), reverse=True)
    top_tenth = sum(ranked[: len(data.items) // 10])
    assert top_tenth / sum(ranked) > 0.35  # a uniform catalog would give 0.10
    newest = max(data.items, key=lambda item: item.created_at)
    assert counts[newest.item_id] == 0


def test_sequence_and_taste_carry_signal() -> None:
    data = generate(users=200, items=400, seed=5)
    category = {item.item_id: item.categories[0] for item in data.items}
    by_user: dict[str, list] = {}
    for event in data.events:
        by_user.setdefault(event.user_id, []).append(event)
    same_as_previous = [
        category[a.item_id] == category[b.item_id]
        for events in by_user.values()
        for a, b in pairwise(events)
    ]
    shares = Counter(category[e.item_id] for e in data.events)
    chance = sum((n / len(data.events)) ** 2 for n in shares.values())
    assert np.mean(same_as_previous) > chance + 0.15
    # Ratings follow taste: a user rates their most watched category above the others.
    gaps = []
    for events in by_user.values():
        favourite = Counter(category[e.item_id] for e in events).most_common(1)[0][0]
        liked = [e.value for e in events if category[e.item_id] == favourite]
        other = [e.value for e in events if category[e.item_id] != favourite]
        if other:
            gaps.append(np.mean(liked) - np.mean(other))
    assert np.mean(gaps) > 0.5
