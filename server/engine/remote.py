"""A remote OpenAI-compatible vLLM server (`vllm serve`), for scaling the engine out."""

import asyncio
import logging
import time

import httpx

from server.engine import Engine, EngineError, Generation, GenerationRequest

log = logging.getLogger(__name__)
# docker/serve_vllm.py sees an activation within its 5 s poll and loads an adapter in seconds;
# a version that needs a restart takes vLLM down meanwhile, which ends the wait at once.
HANDOVER_SECONDS = 30.0
HANDOVER_POLL_SECONDS = 0.5
# Completions in flight at once; the rest wait their turn, inside their time budget. httpx's own
# queue must never form: it rescans every queued request on each arrival and each cancellation,
# and a thousand calls timing out together against a hung server stalled the event loop for
# a minute. The pool keeps a few connections beyond them for health checks and model lists.
IN_FLIGHT = 256
SPARE_CONNECTIONS = 8


def bearer(api_key: str | None) -> dict[str, str]:
    """The headers of a vLLM server started with an API key (none without one)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class RemoteEngine(Engine):
    def __init__(self, base_url: str, model_version: str, api_key: str | None = None):
        limits = httpx.Limits(
            max_connections=IN_FLIGHT + SPARE_CONNECTIONS, max_keepalive_connections=64
        )
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=bearer(api_key), limits=limits, timeout=None
        )
        self._in_flight = asyncio.Semaphore(IN_FLIGHT)
        self.model_version = model_version

    async def generate(self, request: GenerationRequest) -> Generation:
        body = {
            "model": self.model_version,
            "prompt": self.text(request.prompt),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "presence_penalty": request.presence_penalty,
            "request_id": request.request_id,
        }
        if request.regex:
            # `structured_outputs` is vLLM's extension; the old `guided_regex` is ignored now.
            body["structured_outputs"] = {"regex": request.regex}
        if request.allowed_token_ids is not None:
            body["allowed_token_ids"] = request.allowed_token_ids  # vLLM's extension too
        if request.logprobs:
            body["logprobs"] = request.logprobs
        try:
            async with self._in_flight:
                response = await self._client.post("/v1/completions", json=body)
        except (httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: closed by a swap meanwhile
            raise EngineError(f"engine unreachable: {exc!r}") from exc
        if response.status_code != 200:
            raise EngineError(f"engine answered {response.status_code}: {response.text[:300]}")
        try:
            payload = response.json()
            usage = payload.get("usage") or {}
            choice = payload["choices"][0]
            logprobs = choice.get("logprobs") or {}
            return Generation(
                text=choice["text"],
                prompt_tokens=usage.get("prompt_tokens", 0),
                completion_tokens=usage.get("completion_tokens", 0),
                tokens=logprobs.get("tokens") or [],
                top_logprobs=[step or {} for step in logprobs.get("top_logprobs") or []],
            )
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            raise EngineError(f"engine answered an unreadable body: {response.text[:300]}") from exc

    async def prepare(self, handover: bool = False) -> None:
        """On a handover, wait (up to HANDOVER_SECONDS) until the server lists this version, so
        that the previous one answers meanwhile rather than the fallback. The server places
        versions itself: one it does not list yet is never refused; a server that does not answer
        (vLLM restarting on it) ends the wait, as the previous version is not served either."""
        if not handover:
            return
        deadline = time.monotonic() + HANDOVER_SECONDS
        while True:
            try:
                served = await self._served()
            except EngineError:
                return
            if self.model_version in served:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "engine does not serve the new version yet",
                    extra={"version": self.model_version},
                )
                return
            await asyncio.sleep(HANDOVER_POLL_SECONDS)

    async def check_health(self) -> None:
        """Healthy, and serving this version: after an activation the server may still be
        serving the previous one (it loads versions by name), and every request would fail."""
        health = await self._get("/health")
        if health.status_code != 200:
            raise EngineError(f"engine health check answered {health.status_code}")
        served = await self._served()
        if self.model_version not in served:
            raise EngineError(f"engine does not serve {self.model_version} (it serves {served})")

    async def _served(self) -> list[str]:
        """The versions the server serves now."""
        models = await self._get("/v1/models")
        try:
            return [model["id"] for model in models.json()["data"]]
        except (ValueError, LookupError, TypeError) as exc:
            raise EngineError(f"engine model list unreadable: {models.text[:300]}") from exc

    async def _get(self, path: str) -> httpx.Response:
        try:
            return await self._client.get(path, timeout=2)
        except (httpx.HTTPError, RuntimeError) as exc:
            raise EngineError(f"engine unreachable: {exc!r}") from exc

    async def close(self) -> None:
        await self._client.aclose()
