"""A small synthetic recommendation task, its toy_tokenizer and a model fine-tuned on it once.

Users like one category; each prompt shows a few of their past items and a shuffled candidate
list, and the positives are the candidates of the liked category. Small enough that the tiny
preset learns it in seconds, structured enough that a right answer is not a constant.
"""

import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from contract.prompt import HistoryView, ItemView, PromptInput
from server.config import Settings
from trainer.examples import Example, build_example
from trainer.model import build_model
from trainer.presets import SftSettings
from trainer.sft import run_sft
from trainer.tokenizer import train_tokenizer

CATEGORIES = ["Drama", "Comedy", "Horror", "Western"]
WORDS = ["Road", "Night", "House", "River", "Storm", "Crown"]
START = datetime(2024, 1, 1, tzinfo=UTC)
K = 3


def make_catalog() -> dict[str, ItemView]:
    toy_catalog = {}
    for c, category in enumerate(CATEGORIES):
        for w, word in enumerate(WORDS):
            item_id = str(100 + c * len(WORDS) + w)
            toy_catalog[item_id] = ItemView(
                item_id=item_id,
                title=f"{word} {category} ({1990 + w})",
                categories=[category],
                attributes={"year": 1990 + w},
            )
    return toy_catalog


def make_examples(toy_catalog: dict[str, ItemView], users: int = 8, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    items = list(toy_catalog.values())
    popularity = {item_id: rng.randint(0, 50) for item_id in toy_catalog}
    toy_examples = []
    for u in range(users):
        liked = CATEGORIES[u % len(CATEGORIES)]
        mine = [item for item in items if liked in item.categories]
        rng.shuffle(mine)
        history = [
            HistoryView(item=item, timestamp=START + timedelta(days=day))
            for day, item in enumerate(mine[:2])
        ]
        others = rng.sample([item for item in items if liked not in item.categories], 3)
        candidates = mine[2:5] + others
        rng.shuffle(candidates)
        positives = [item.item_id for item in mine[2:5]]
        data = PromptInput(profile={"age": 20 + u}, history=history, candidates=candidates, k=K)
        toy_examples.append(build_example(f"u{u}", data, positives, popularity))
    return toy_examples


@pytest.fixture(scope="session")
def toy_catalog() -> dict[str, ItemView]:
    return make_catalog()


@pytest.fixture(scope="session")
def toy_examples(toy_catalog: dict[str, ItemView]) -> list[Example]:
    return make_examples(toy_catalog)


@pytest.fixture(scope="session")
def toy_tokenizer(
    toy_catalog: dict[str, ItemView], toy_examples: list[Example]
) -> PreTrainedTokenizerFast:
    texts = [item.title + " " + " ".join(item.categories) for item in toy_catalog.values()]
    texts += [example.prompt + example.target for example in toy_examples]
    return train_tokenizer(texts, list(toy_catalog), vocab_size=600)


@contextmanager
def one_thread() -> Iterator[None]:
    """Train the tiny model on one thread: its matrices are too small to gain from two, and when
    another process holds a core, two threads waiting on each other run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


SFT_SETTINGS = SftSettings(max_steps=240, learning_rate=5e-3, batch_size=4, seed=0, progress=False)


@pytest.fixture(scope="session")
def toy_sft_model(
    toy_tokenizer: PreTrainedTokenizerFast, toy_examples: list[Example]
) -> PreTrainedModel:
    """The tiny preset after SFT on `toy_examples`; tests that change it must copy it first."""
    model = build_model(toy_tokenizer, "tiny", seed=0)
    with one_thread():
        return run_sft(model, toy_tokenizer, toy_examples, SFT_SETTINGS)


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """`settings` as the environment a CLI command reads."""
    monkeypatch.setenv("REASONREC_REDIS_URL", settings.redis_url)
    monkeypatch.setenv("REASONREC_KEY_PREFIX", settings.key_prefix)
    monkeypatch.setenv("REASONREC_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("REASONREC_REFRESH_MIN_LISTS", str(settings.refresh_min_lists))
    return settings
