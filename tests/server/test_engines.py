"""Engine behaviour around swaps, without vLLM: a remote engine's handover and its client closed
under a request, an in-process engine's release when its core cannot unload
(tests/integration runs both against real vLLM)."""

import asyncio
import time
from pathlib import Path

import httpx
import pytest

import server.engine.remote
from server.engine import EngineError, GenerationRequest
from server.engine.local import LocalEngine
from server.engine.remote import RemoteEngine


def remote(handler, version: str = "v2") -> RemoteEngine:
    engine = RemoteEngine("http://vllm", version)
    engine._client = httpx.AsyncClient(
        base_url="http://vllm", transport=httpx.MockTransport(handler)
    )
    return engine


def listing(*answers: list[str]):
    """A server whose model list is each answer in turn, then the last one."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        served = answers[min(len(calls), len(answers)) - 1]
        return httpx.Response(200, json={"data": [{"id": model} for model in served]})

    return handler, calls


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.engine.remote, "HANDOVER_POLL_SECONDS", 0.01)


def test_a_handover_waits_until_the_server_lists_the_version() -> None:
    handler, calls = listing(["v1"], ["v1"], ["v1", "v2"])
    asyncio.run(remote(handler).prepare(handover=True))
    assert len(calls) == 3


def test_a_handover_gives_up_waiting_after_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.engine.remote, "HANDOVER_SECONDS", 0.1)
    handler, calls = listing(["v1"])
    asyncio.run(remote(handler).prepare(handover=True))  # not refused: the server places versions
    assert len(calls) > 3


def test_a_handover_to_a_server_that_does_not_answer_does_not_wait() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    asyncio.run(asyncio.wait_for(remote(down).prepare(handover=True), timeout=1))


def test_a_first_engine_asks_nothing() -> None:
    handler, calls = listing(["v1"])
    asyncio.run(remote(handler).prepare())
    assert calls == []


def test_a_request_on_an_engine_closed_by_a_swap_is_an_engine_error() -> None:
    async def closed_then_asked() -> None:
        engine = RemoteEngine("http://127.0.0.1:9", "v1")
        await engine.close()
        with pytest.raises(EngineError):
            await engine.generate(GenerationRequest(request_id="r1", prompt="p"))
        with pytest.raises(EngineError):
            await engine.check_health()

    asyncio.run(closed_then_asked())


def completion(usage: dict[str, int]) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"text": "x"}], "usage": usage})


@pytest.mark.parametrize("usage", [{"prompt_tokens": -5}, {"completion_tokens": -1}])
def test_a_negative_token_count_is_an_engine_error(usage: dict[str, int]) -> None:
    # Counted into a Prometheus counter, it raised there: a 500 instead of the fallback.
    engine = remote(lambda _: completion(usage))
    with pytest.raises(EngineError, match="unreadable body"):
        asyncio.run(engine.generate(GenerationRequest(request_id="r1", prompt="p")))


def test_completions_beyond_the_in_flight_bound_wait_their_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server.engine.remote, "IN_FLIGHT", 3)
    now, most = 0, 0

    async def slow(_: httpx.Request) -> httpx.Response:
        nonlocal now, most
        now += 1
        most = max(most, now)
        await asyncio.sleep(0.02)
        now -= 1
        return completion({"prompt_tokens": 1, "completion_tokens": 1})

    async def many() -> list[str]:
        engine = remote(slow)
        requests = [GenerationRequest(request_id=f"r{n}", prompt="p") for n in range(20)]
        return [g.text for g in await asyncio.gather(*map(engine.generate, requests))]

    assert asyncio.run(many()) == ["x"] * 20
    assert most == 3


class DeadCore:
    async def remove_lora(self, _: int) -> None:
        raise RuntimeError("EngineCore died")


class Process:
    def __init__(self) -> None:
        self.llm, self.released = DeadCore(), 0

    def next_adapter_id(self) -> int:
        return 1

    def join(self) -> None:
        return None

    def release(self) -> None:
        self.released += 1


def test_an_adapter_that_cannot_unload_still_releases_its_process() -> None:
    process = Process()
    engine = LocalEngine(process, "v1-lora", Path("/adapters/v1-lora"))
    with pytest.raises(RuntimeError):
        asyncio.run(engine.close())
    assert process.released == 1


class SlowToShutDown(Process):
    """vLLM's shutdown waits for its engine core process to exit (up to 5 s)."""

    def release(self) -> None:
        time.sleep(2.0)
        super().release()


def test_releasing_an_engine_leaves_the_event_loop_serving() -> None:
    """An engine is released a second after every swap that replaces the weights: the gateway
    answered nothing, not even /healthz, while vLLM shut down."""
    process = SlowToShutDown()
    engine = LocalEngine(process, "v1")

    async def longest_stall() -> float:
        closing = asyncio.create_task(engine.close())
        longest, last = 0.0, time.monotonic()
        while not closing.done():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest, last = max(longest, now - last), now
        await closing
        return longest

    assert asyncio.run(longest_stall()) < 1.0
    assert process.released == 1


def test_a_version_opened_again_beside_its_draining_engine_is_another_adapter() -> None:
    """vLLM tells adapters apart by name in a batch: two engines of one version (activated
    again while the first drains) must not share one."""
    process = Process()
    process.next_adapter_id = iter([1, 2]).__next__  # type: ignore[method-assign]
    draining = LocalEngine(process, "v1-lora", Path("/adapters/v1-lora"))
    again = LocalEngine(process, "v1-lora", Path("/adapters/v1-lora"))

    assert len({draining._lora, again._lora}) == 2  # the set vLLM builds of a batch's adapters
