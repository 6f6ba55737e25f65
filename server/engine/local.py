"""In-process vLLM (`AsyncLLM`): the embedded default. The engine core runs in a child process."""

import logging
import os
from pathlib import Path

from server.engine import Engine, EngineError, Generation, GenerationRequest

log = logging.getLogger(__name__)


class LocalEngine(Engine):
    def __init__(
        self,
        model_dir: Path,
        model_version: str,
        max_model_len: int | None,
        kv_cache_bytes: int,
        cpu_threads: str,
        dtype: str,
    ):
        # vLLM reads its CPU thread binding from the environment of the engine process it spawns.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(model_dir),
            served_model_name=model_version,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_bytes,
            dtype=dtype,
            enforce_eager=True,  # compilation buys nothing for a small model and costs start time
            enable_prefix_caching=True,
            seed=0,
        )
        self.model_version = model_version
        self._llm = AsyncLLM.from_engine_args(args)
        log.info("local engine ready", extra={"model_version": model_version})

    async def generate(self, request: GenerationRequest) -> Generation:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = StructuredOutputsParams(regex=request.regex) if request.regex else None
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            presence_penalty=request.presence_penalty,
            structured_outputs=structured,
        )
        final = None
        try:
            # AsyncLLM aborts the request itself when this coroutine is cancelled (timeouts).
            async for output in self._llm.generate(request.prompt, params, request.request_id):
                final = output
        except Exception as exc:
            raise EngineError(f"generation failed: {exc}") from exc
        if final is None or not final.outputs:
            raise EngineError("the engine returned no output")
        completion = final.outputs[0]
        return Generation(
            text=completion.text,
            prompt_tokens=len(final.prompt_token_ids or ()),
            completion_tokens=len(completion.token_ids),
        )

    async def check_health(self) -> None:
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineError(f"engine unhealthy: {exc}") from exc

    async def close(self) -> None:
        # Drop the last reference now: AsyncLLM.__del__ shuts down again, which fails noisily if
        # it only runs at interpreter exit.
        llm, self._llm = self._llm, None
        llm.shutdown()
        del llm
