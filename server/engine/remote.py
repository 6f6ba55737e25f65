"""A remote OpenAI-compatible vLLM server (`vllm serve`), for scaling the engine out."""

import httpx

from server.engine import Engine, EngineError, Generation, GenerationRequest


def bearer(api_key: str | None) -> dict[str, str]:
    """The headers of a vLLM server started with an API key (none without one)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class RemoteEngine(Engine):
    def __init__(self, base_url: str, model_version: str, api_key: str | None = None):
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=bearer(api_key), limits=limits, timeout=None
        )
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
            response = await self._client.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
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

    async def check_health(self) -> None:
        """Healthy, and serving this version: after an activation the server may still be
        serving the previous one (it loads versions by name), and every request would fail."""
        health = await self._get("/health")
        if health.status_code != 200:
            raise EngineError(f"engine health check answered {health.status_code}")
        models = await self._get("/v1/models")
        try:
            served = [model["id"] for model in models.json()["data"]]
        except (ValueError, LookupError, TypeError) as exc:
            raise EngineError(f"engine model list unreadable: {models.text[:300]}") from exc
        if self.model_version not in served:
            raise EngineError(f"engine does not serve {self.model_version} (it serves {served})")

    async def _get(self, path: str) -> httpx.Response:
        try:
            return await self._client.get(path, timeout=2)
        except httpx.HTTPError as exc:
            raise EngineError(f"engine unreachable: {exc!r}") from exc

    async def close(self) -> None:
        await self._client.aclose()
