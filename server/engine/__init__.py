"""The engine: one interface, two implementations (in-process vLLM, remote OpenAI-compatible vLLM).

The gateway builds one at startup and never asks which it has.
"""

from abc import ABC, abstractmethod

from pydantic import BaseModel, Field

from server.prompt import Contract


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


class Generation(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int


class Engine(ABC):
    """Generates completions for one model version."""

    model_version: str
    # How the version reads prompts, from its manifest (`server.active_model.open_engine` sets it).
    contract: Contract = Contract()

    @abstractmethod
    async def generate(self, request: GenerationRequest) -> Generation:
        """Complete one prompt; raises EngineError. Cancelling the call aborts the request."""

    async def prepare(self) -> None:
        """Get ready to serve before the first request; raises EngineError if it cannot.
        Nothing to do unless an engine says otherwise."""
        return None

    @abstractmethod
    async def check_health(self) -> None:
        """Raise EngineError if the engine cannot serve."""

    @abstractmethod
    async def close(self) -> None:
        """Release the engine (processes, memory, connections)."""
