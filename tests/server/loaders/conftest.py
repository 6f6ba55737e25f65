import asyncio
from collections.abc import Iterator

import pytest
import redis
from rich.console import Console

from server.config import Settings
from server.keys import Keys
from server.loaders import Dataset
from server.loaders.writer import LoadSummary, progress_bar, write
from server.redis_client import connect
from server.store import build_store


class Loaded:
    """Writes data sets into the test's own prefix and reads back what landed in Redis."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis = redis.Redis.from_url(settings.redis_url, decode_responses=True)

    def write(self, dataset: Dataset) -> LoadSummary:
        async def run() -> LoadSummary:
            handle = connect(self.settings)
            try:
                store = build_store(self.settings, handle.client)
                with progress_bar(Console(quiet=True)) as progress:
                    return await write(store, dataset, progress)
            finally:
                await handle.close()

        return asyncio.run(run())

    def snapshot(self) -> dict[str, object]:
        """Everything a load changes, to compare before and after loading again."""
        return {
            "items": self.redis.scard(self.keys.items),
            "users": self.redis.scard(self.keys.users),
            "events": self.redis.xlen(self.keys.events),
            "pop": self.redis.zrange(self.keys.popularity, 0, -1, withscores=True),
        }


@pytest.fixture
def loaded(settings: Settings) -> Iterator[Loaded]:
    yield Loaded(settings)
