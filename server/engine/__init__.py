"""The engine: one interface, two implementations (in-process vLLM, remote OpenAI-compatible vLLM).

The gateway builds one at startup and never asks which it has.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable

from pydantic import BaseModel, Field

from contract.prompt import Contract
from server.vocabulary import ItemTokens

# Most log-probabilities one step may return: k (at most 50) plus the spare ids. Engines are
# started with it (vLLM's --max-logprobs).
MAX_LOGPROBS = 64
# Log-probabilities after the grammar mask and the allowed tokens: what the answer chose among.
LOGPROBS_MODE = "processed_logprobs"
# A request's engine call ends within the LLM budget and each of its Redis reads within Redis's
# timeout: one holding an outgoing version past this (or past the budget, when that is longer) is
# stuck, and the version's memory is needed back.
MIN_RELEASE_SECONDS = 60.0


def release_seconds(llm_timeout_ms: int) -> float:
    """How long after a swap a request may still use the outgoing version."""
    return max(MIN_RELEASE_SECONDS, llm_timeout_ms / 1000 + 1)


class EngineError(Exception):
    """The engine could not produce an answer (down, overloaded, refused the request)."""


class GenerationRequest(BaseModel):
    request_id: str
    prompt: str
    regex: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtracted from tokens already generated (vLLM's)."
    )
    allowed_token_ids: list[int] | None = Field(
        None, description="The only tokens it may generate (see server.vocabulary)."
    )
    logprobs: int | None = Field(
        None,
        ge=1,
        le=MAX_LOGPROBS,
        description="Return this many of the likeliest tokens at each step, with their "
        "log-probabilities after the grammar and the other constraints.",
    )


class Generation(BaseModel):
    text: str
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    tokens: list[str] = Field(default_factory=list, description="Each generated token's text.")
    top_logprobs: list[dict[str, float]] = Field(
        default_factory=list, description="Per generated token, when asked: text -> logprob."
    )

    def after(self, tag: str) -> dict[str, float]:
        """The log-probabilities of the step right after the text first reaches `tag`, however
        the tokens split it (a pretrained tokenizer given the tags as new tokens may still spell
        one in pieces); empty when it never does or the step was not returned."""
        text = ""
        for step, token in enumerate(self.tokens):
            text += token
            if text.endswith(tag):
                return self.top_logprobs[step + 1] if step + 1 < len(self.top_logprobs) else {}
        return {}


class Engine(ABC):
    """Generates completions for one model version."""

    model_version: str
    # How the version reads prompts and its item tokens, from its manifest and tokenizer
    # (`server.active_model.open_engine` sets both).
    contract: Contract = Contract()
    items: ItemTokens | None = None
    # Its chat template, for a version whose contract says `chat` (prompt -> the text sent).
    template: Callable[[str], str] | None = None

    def text(self, prompt: str) -> str:
        """The text the model reads for a prompt."""
        return self.template(prompt) if self.template else prompt

    @abstractmethod
    async def generate(self, request: GenerationRequest) -> Generation:
        """Complete one prompt; raises EngineError. Cancelling the call aborts the request."""

    async def prepare(self, handover: bool = False) -> None:
        """Get ready to serve before the first request; raises EngineError if it cannot.
        `handover`: another engine serves until this one is ready, so it may wait. Nothing to
        do unless an engine says otherwise."""
        return None

    @property
    def dead(self) -> bool:
        """Whether this engine can never answer again, so the version must be opened anew (an
        in-process engine whose core process died). A remote server is restarted by whatever
        launched it: never."""
        return False

    @abstractmethod
    async def check_health(self) -> None:
        """Raise EngineError if the engine cannot serve."""

    @abstractmethod
    async def close(self) -> None:
        """Release the engine (processes, memory, connections)."""
