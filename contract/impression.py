"""The impression record: one served list, as the gateway logs it and the trainer reads it back.

One class writes and reads the stream entry, so the two sides cannot drift apart by a field name.
Entries logged by earlier versions (no `rendering`, no `k`) still read.
"""

import json

from pydantic import BaseModel, Field

from contract.prompt import Rendering


class Impression(BaseModel):
    request_id: str
    user_id: str
    model_version: str = Field("", description="Empty when no model served the list.")
    # Finite: one logged as nan sorted at random among the examples and was written as null.
    ts: float = Field(description="Unix time the list was served.", allow_inf_nan=False)
    source: str = Field("", description="`llm` or `fallback`.")
    fallback_reason: str = ""
    items: list[str] = Field(default_factory=list, description="The ids shown, in order.")
    candidates: list[str] = Field(default_factory=list, description="In retrieval order.")
    prompt: str = Field("", description="Empty when the list was not worth a prompt.")
    rendering: Rendering = Field(
        Rendering.rich, description="Lists logged before renderings: rich."
    )
    output: str = Field("", description="The model's completion, as generated.")

    @property
    def k(self) -> int:
        """How many items the list ranks (at least 1, so that an empty list still scores)."""
        return max(len(self.items), 1)

    def fields(self) -> dict[str, str]:
        """The stream entry: flat strings, lists as JSON."""
        entry = self.model_dump(mode="json")
        entry |= {
            "ts": repr(self.ts),
            "items": json.dumps(self.items),
            "candidates": json.dumps(self.candidates),
            "k": str(len(self.items)),
        }
        return entry

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "Impression":
        entry = {key: value for key, value in fields.items() if key != "k"}
        for key in ("items", "candidates"):
            entry[key] = json.loads(entry.get(key) or "[]")
        entry["rendering"] = entry.get("rendering") or Rendering.rich
        return cls.model_validate(entry)
