"""A deterministic synthetic catalog for the demo and tests.

Built so that both taste and sequence carry signal, like real interaction logs:
- items belong to categories and come in series (part I, II, ...); popularity follows a power law;
- users belong to taste clusters, each fond of a few categories; half the users drift from one
  cluster's taste towards another's over their timeline;
- the next item often continues what the user just watched (same category, next in the series);
- ratings are high for items that match the user's current taste, low otherwise;
- a few items are new and have no interactions yet (cold items).
The same seed and sizes always produce the same data.
"""

from datetime import UTC, datetime, timedelta

import numpy as np

from server.loaders import Dataset
from server.schemas import EventType, FeedbackEvent, ItemUpsert, UserUpsert

CATEGORIES: dict[str, tuple[list[str], list[str]]] = {
    "sci-fi": (["Distant", "Silent", "Quantum", "Broken"], ["Orbit", "Galaxy", "Android", "Nova"]),
    "fantasy": (["Ancient", "Hidden", "Golden", "Cursed"], ["Kingdom", "Dragon", "Crown", "Spell"]),
    "crime": (["Cold", "Dirty", "Midnight", "Perfect"], ["Heist", "Alibi", "Witness", "Score"]),
    "romance": (["Summer", "Second", "Sweet", "Paper"], ["Kiss", "Letters", "Promise", "Hearts"]),
    "comedy": (["Crazy", "Awkward", "Lucky", "Weekend"], ["Roommates", "Wedding", "Trip", "Boss"]),
    "horror": (["Dark", "Hollow", "Bleeding", "Last"], ["House", "Woods", "Ritual", "Night"]),
    "documentary": (["Wild", "True", "Deep", "Lost"], ["Oceans", "Empires", "Planet", "Voices"]),
    "animation": (["Little", "Brave", "Magic", "Tiny"], ["Robot", "Fox", "Island", "Friends"]),
    "thriller": (["Final", "Silent", "Double", "Open"], ["Target", "Protocol", "Code", "Game"]),
    "drama": (["Quiet", "Long", "Broken", "Winter"], ["Road", "Family", "Years", "Harbor"]),
    "western": (["Dusty", "Lone", "Iron", "Red"], ["Rider", "Canyon", "Frontier", "Sheriff"]),
    "musical": (["Golden", "Midnight", "Electric", "Velvet"], ["Stage", "Melody", "Dance", "Song"]),
}
ROMAN = ["", " II", " III", " IV", " V"]
START = datetime(2024, 1, 1, tzinfo=UTC)
DAY = 86_400


USERS, ITEMS, EVENTS_PER_USER = 300, 600, 40


def fewest_events(users: int = USERS, events_per_user: int = EVENTS_PER_USER) -> int:
    """Fewer events than `generate` makes but for odds of about 1 in 30,000 (each user's count is
    Poisson, at least 5): a size the events stream cannot keep is refused before it is made."""
    mean = users * events_per_user
    return max(users * 5, int(mean - 4 * mean**0.5))


def generate(
    users: int = USERS,
    items: int = ITEMS,
    events_per_user: int = EVENTS_PER_USER,
    clusters: int = 6,
    seed: int = 7,
) -> Dataset:
    rng = np.random.default_rng(seed)
    names = list(CATEGORIES)
    catalog = _items(rng, items, names)
    tastes = rng.dirichlet(np.full(len(names), 0.3), size=clusters)
    old = int(len(catalog) * 0.95)
    popularity = (1.0 / np.arange(1, old + 1) ** 1.1)[rng.permutation(old)]
    tag = f"{seed}-{users}-{items}-{events_per_user}-{clusters}"
    people, events = [], []
    for u in range(users):
        user_id = f"u{u:05d}"
        people.append(UserUpsert(user_id=user_id, attributes=_profile(rng)))
        events += _history(
            rng,
            f"synthetic:{tag}:{user_id}",
            user_id,
            catalog[:old],
            popularity,
            tastes,
            events_per_user,
        )
    events.sort(key=lambda event: event.timestamp)
    return Dataset(
        items=[item for item, _ in catalog], users=people, events=events, event_count=len(events)
    )


def _items(rng: np.random.Generator, count: int, names: list[str]) -> list[tuple[ItemUpsert, int]]:
    """Items with their category index; the last 5% are new and left without interactions."""
    catalog = []
    series_left = 0
    for i in range(count):
        if series_left == 0:
            category = int(rng.integers(len(names)))
            adjectives, nouns = CATEGORIES[names[category]]
            base = f"{rng.choice(adjectives)} {rng.choice(nouns)}"
            series_left, part = int(rng.integers(1, len(ROMAN) + 1)), 0
        second = names[int(rng.integers(len(names)))]
        categories = [names[category]] + ([second] if rng.random() < 0.3 else [])
        new = i >= count * 0.95
        age_days = rng.integers(0, 14) if new else rng.integers(60, 900)
        catalog.append(
            (
                ItemUpsert(
                    item_id=f"i{i:05d}",
                    title=f"{base}{ROMAN[part]}",
                    categories=list(dict.fromkeys(categories)),
                    attributes={"series": base, "part": part + 1},
                    description=f"A {names[category]} story: {base.lower()}.",
                    created_at=START + timedelta(days=180) - timedelta(days=int(age_days)),
                    promoted=bool(rng.random() < 0.05),
                ),
                category,
            )
        )
        series_left, part = series_left - 1, part + 1
    return catalog


def _profile(rng: np.random.Generator) -> dict[str, str | int]:
    return {
        "age": int(rng.integers(16, 70)),
        "country": str(rng.choice(["us", "de", "fr", "jp", "br", "in"])),
    }


def _history(
    rng: np.random.Generator,
    id_prefix: str,
    user_id: str,
    old: list[tuple[ItemUpsert, int]],
    popularity: np.ndarray,
    tastes: np.ndarray,
    mean_events: int,
) -> list[FeedbackEvent]:
    """One user's interactions with the catalog's old items (new items stay cold)."""
    categories = np.array([category for _, category in old])
    start_taste, end_taste = tastes[rng.integers(len(tastes))], tastes[rng.integers(len(tastes))]
    drifts = rng.random() < 0.5
    count = max(5, int(rng.poisson(mean_events)))
    ts = START + timedelta(days=int(rng.integers(0, 120)))
    events, last = [], None
    for n in range(count):
        progress = n / max(count - 1, 1) if drifts else 0.0
        taste = (1 - progress) * start_taste + progress * end_taste
        if last is not None and last + 1 < len(old) and rng.random() < 0.35:
            index = last + 1  # the next part of the series, or its neighbour in the catalog
        else:
            weights = popularity * (taste[categories] + 0.01)
            index = int(rng.choice(len(old), p=weights / weights.sum()))
        item, category = old[index]
        match = taste[category] / taste.max()
        value = float(np.clip(np.round(1 + 4 * match + rng.normal(0, 0.6)), 1, 5))
        ts += timedelta(seconds=int(rng.exponential(DAY)))
        events.append(
            FeedbackEvent(
                user_id=user_id,
                item_id=item.item_id,
                type=EventType.rating,
                value=value,
                timestamp=ts,
                event_id=f"{id_prefix}:{n}",
            )
        )
        last = index
    return events
