"""In-process vLLM (`AsyncLLM`): the embedded default. The engine core runs in a child process.

One `VllmProcess` holds a base model's weights. Every version that runs on those weights is a
`LocalEngine` sharing it: the base itself, and its LoRA versions, which vLLM applies per request
as runtime adapters (unless they are merged: `server.active_model.merges_adapters`). Swapping
between such versions loads an adapter, not a model.
"""

import asyncio
import logging
import os
import threading
from itertools import count
from pathlib import Path

from pydantic import BaseModel, Field

from server import logs
from server.engine import (
    LOGPROBS_MODE,
    MAX_LOGPROBS,
    Engine,
    EngineError,
    Generation,
    GenerationRequest,
)
from server.engine.reaper import Reaper, children

log = logging.getLogger(__name__)
# The ranks vLLM can reserve adapter memory for (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# During a swap the outgoing adapter finishes its requests while the incoming one starts.
ADAPTERS_AT_ONCE = 2


class ProcessSettings(BaseModel):
    max_model_len: int | None
    kv_cache_bytes: int
    cpu_threads: str
    dtype: str
    max_lora_rank: int | None = Field(
        None, description="Reserve room for runtime LoRA adapters up to this rank; None: no LoRA."
    )


def lora_slot(rank: int) -> int:
    """The smallest rank vLLM reserves that holds `rank`."""
    fitting = [slot for slot in LORA_RANKS if slot >= rank]
    if not fitting:
        raise EngineError(f"LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]})")
    return fitting[0]


class VllmProcess:
    """One AsyncLLM on a base model's weights, released when its last engine closes."""

    def __init__(self, model_dir: Path, base_version: str, settings: ProcessSettings):
        # vLLM reads its CPU thread binding from the environment of the engine process it spawns.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads
        logs.configure_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        lora = settings.max_lora_rank is not None
        adapters = (
            {"max_lora_rank": lora_slot(settings.max_lora_rank), "max_loras": ADAPTERS_AT_ONCE}
            if lora
            else {}
        )
        args = AsyncEngineArgs(
            model=str(model_dir),
            served_model_name=base_version,
            max_model_len=settings.max_model_len,
            kv_cache_memory_bytes=settings.kv_cache_bytes,
            dtype=settings.dtype,
            enforce_eager=True,  # compilation buys nothing for a small model and costs start time
            enable_prefix_caching=True,
            seed=0,
            enable_lora=lora,
            max_logprobs=MAX_LOGPROBS,
            logprobs_mode=LOGPROBS_MODE,
            **adapters,
        )
        self.base_version, self.max_lora_rank = base_version, settings.max_lora_rank
        before = children(os.getpid())
        self.llm = AsyncLLM.from_engine_args(args)
        self._reaper = Reaper(children(os.getpid()) - before)
        self.engines = 0  # LocalEngines on this process; swaps open them in a worker thread
        self._count_lock = threading.Lock()
        self._adapter_ids = count(1)  # vLLM tells adapters apart by a positive int
        log.info("local engine ready", extra={"model_version": base_version, "lora": lora})

    def can_serve(self, base_version: str, lora_rank: int | None) -> bool:
        if base_version != self.base_version:
            return False
        return lora_rank is None or (self.max_lora_rank or 0) >= lora_rank

    def next_adapter_id(self) -> int:
        return next(self._adapter_ids)

    def join(self) -> None:
        with self._count_lock:
            self.engines += 1

    def release(self) -> None:
        with self._count_lock:
            self.engines -= 1
            if self.engines:
                return
        # Drop the last reference now: AsyncLLM.__del__ shuts down again, which fails noisily if
        # it only runs at interpreter exit.
        llm, self.llm = self.llm, None
        llm.shutdown()
        del llm
        self._reaper.stop()
        log.info("local engine shut down", extra={"model_version": self.base_version})


class LocalEngine(Engine):
    """Serves `model_version` on a shared process: the base weights, or an adapter on them."""

    def __init__(self, process: VllmProcess, model_version: str, adapter: Path | None = None):
        self.model_version, self._process = model_version, process
        self._lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            # Named per engine: vLLM tells adapters apart by name in a batch, and a version
            # activated again while its previous engine drains would be two adapters of one name.
            number = process.next_adapter_id()
            self._lora = LoRARequest(f"{model_version}#{number}", number, str(adapter))
        process.join()

    def beside(self, model_version: str, adapter: Path | None) -> "LocalEngine":
        """Another version on the same weights (the base, or one of its adapters)."""
        return LocalEngine(self._process, model_version, adapter)

    def can_serve(self, base_version: str, lora_rank: int | None) -> bool:
        return not self.dead and self._process.can_serve(base_version, lora_rank)

    @property
    def dead(self) -> bool:
        # AsyncLLM's monitor marks it errored when the engine core process exits (killed for
        # memory, say); it never starts the core again.
        llm = self._process.llm
        return llm is None or llm.errored

    async def prepare(self, handover: bool = False) -> None:
        """Load the adapter now, so that one that cannot load is refused before any request."""
        if self._lora is None:
            return
        try:
            await self._process.llm.add_lora(self._lora)
        except Exception as exc:
            raise EngineError(f"adapter {self.model_version} did not load: {exc}") from exc

    async def generate(self, request: GenerationRequest) -> Generation:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(regex=request.regex) if request.regex else None
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            presence_penalty=request.presence_penalty,
            structured_outputs=structured,
            allowed_token_ids=request.allowed_token_ids,
            logprobs=request.logprobs,
        )
        final = None
        llm = self._process.llm
        try:
            # AsyncLLM aborts the request itself when this coroutine is cancelled (timeouts).
            stream = llm.generate(
                self.text(request.prompt), params, request.request_id, lora_request=self._lora
            )
            async for output in stream:
                final = output
        except Exception as exc:
            raise EngineError(f"generation failed: {exc}") from exc
        if final is None or not final.outputs:
            raise EngineError("the engine returned no output")
        completion = final.outputs[0]
        steps = completion.logprobs or []
        return Generation(
            text=completion.text,
            prompt_tokens=len(final.prompt_token_ids or ()),
            completion_tokens=len(completion.token_ids),
            tokens=[
                step[token].decoded_token or ""
                for token, step in zip(completion.token_ids, steps, strict=False)
            ],
            top_logprobs=[
                {entry.decoded_token or "": entry.logprob for entry in step.values()}
                for step in steps
            ],
        )

    async def check_health(self) -> None:
        try:
            await self._process.llm.check_health()
        except Exception as exc:
            raise EngineError(f"engine unhealthy: {exc}") from exc

    async def close(self) -> None:
        """Unload this version's adapter; the process goes with the last engine on it."""
        try:
            if self._lora is not None and self._process.llm is not None:
                await self._process.llm.remove_lora(self._lora.lora_int_id)
        finally:  # a dead engine core cannot unload: the process must still go
            # Off the event loop: shutting vLLM down waits for its core process (up to 5 s).
            await asyncio.to_thread(self._process.release)
