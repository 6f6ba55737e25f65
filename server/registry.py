"""The model registry: one folder per version, written atomically, plus the active pointer.

    {registry}/{version}/          HF weights and tokenizer (or a LoRA adapter) + manifest.json
    {registry}/.staging-*/         versions being written (renamed into place when complete) or
                                   being removed (renamed out of place first)

A crash while writing or pruning leaves only a staging folder, never a half-written version.
Which version serves is recorded in Redis (`model:active`) and announced on the `model-updates`
channel; `prune` keeps it and the one before it.
"""

import json
import logging
import math
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from contract.prompt import CONTRACT_VERSION, SUPPORTED_CONTRACTS, Contract, Rendering
from contract.ranking import Blend
from contract.tasks import Task
from server.durable import fsync, fsync_tree, weights_written

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft saves
_STAGING = ".staging-"
REGISTERED, IMPORTED = "registered", "imported"  # `training.method` of versions brought in
REFRESH_METHOD = "grpo-refresh"  # `training.method` in a refreshed version's manifest
BROUGHT_IN = {REGISTERED, IMPORTED}
STALE_STAGING_SECONDS = 86_400.0  # a writer fills its folder within minutes; a day is ample
log = logging.getLogger(__name__)


class Manifest(BaseModel):
    version: str
    parent: str | None = None
    kind: Literal["full", "lora"] = "full"
    contract_version: str = CONTRACT_VERSION
    rendering: Rendering = Field(
        Rendering.rich, description="How its prompts are written (registered models: rich)."
    )
    prompt_history: int = Field(20, ge=0, description="History items its prompts show.")
    chat_template: bool = Field(
        False, description="Its prompts are wrapped in its tokenizer's chat template."
    )
    tasks: list[Task] = Field(
        default_factory=lambda: [Task.rank],
        description="What it was trained for (versions from before tasks existed: ranking).",
    )
    retrieval_prior: float = Field(
        0.0, ge=0, description="How much its served order leans on the retrieval order."
    )
    popularity_penalty: float = Field(
        0.0, ge=0, description="How much popularity its served order takes back."
    )
    rating_weight: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Its served ratings: this much its own, the rest the baseline's.",
    )
    base_model: str | None = Field(None, description="For LoRA: the version it adapts.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    trained_on: str | None = Field(
        None,
        description="Data the model saw, e.g. 'ml-100k:ml-100k:eval-train-split:<digest>' (eval "
        "checks it).",
    )
    training: dict[str, Any] = Field(default_factory=dict)
    data_window: dict[str, Any] = Field(default_factory=dict)
    reward_weights: dict[str, float] = Field(default_factory=dict)
    policy: dict[str, Any] = Field(
        default_factory=dict, description="The business policy it was trained under."
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    index_version: str | None = None

    @field_validator("metrics", mode="before")
    @classmethod
    def _unmeasured(cls, value: object) -> object:
        """A metric that could not be measured is NaN, which JSON writes as null: read it back."""
        if isinstance(value, dict):
            return {key: math.nan if score is None else score for key, score in value.items()}
        return value

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        """A time written without a zone (an edited manifest) is UTC: versions sort by it."""
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    @property
    def contract(self) -> Contract:
        return Contract(
            version=self.contract_version,
            rendering=self.rendering,
            history=self.prompt_history,
            chat=self.chat_template,
            tasks=frozenset(self.tasks),
            rating_weight=self.rating_weight,
            blend=Blend(
                retrieval_prior=self.retrieval_prior, popularity_penalty=self.popularity_penalty
            ),
        )


class RegistryError(Exception):
    """A version that cannot be stored or served. The message may name folders, for the
    operator's command line and log; `public` leaves them out, for open routes (`/readyz`)."""

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public or message


def _is_file(path: Path) -> bool:
    """`Path.is_file`, False for a name the file system cannot hold (over 255 bytes), which
    Python 3.11 raises for."""
    try:
        return path.is_file()
    except OSError:
        return False


def new_version() -> str:
    return datetime.now(UTC).strftime("v%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


class Registry:
    def __init__(self, root: Path):
        self.root = root

    def path(self, version: str) -> Path:
        return self.root / version

    def has(self, version: str) -> bool:
        return _is_file(self.path(version) / MANIFEST)

    def manifest(self, version: str) -> Manifest:
        if Path(version).name != version or version in {".", ".."}:  # a path, not a name
            raise RegistryError(f"'{version}' is not a version name (see `reasonrec models list`)")
        path = self.path(version) / MANIFEST
        if not _is_file(path):
            missing = f"model version '{version}' is not in the registry"
            raise RegistryError(f"{missing} {self.root}", public=missing)
        try:
            manifest = Manifest.model_validate_json(path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: invalid, or not UTF-8
            unreadable = f"model version '{version}' has an unreadable manifest"
            raise RegistryError(f"{unreadable}: {path}: {exc}", public=unreadable) from exc
        if manifest.version != version:  # a folder copied by hand: it would serve the other's
            raise RegistryError(f"folder {version} holds the manifest of {manifest.version}")
        return manifest

    def versions(self) -> list[Manifest]:
        """Every readable version, oldest first; an unreadable one is logged and left out."""
        return self._scan()[0]

    def _scan(self) -> tuple[list[Manifest], list[str]]:
        """The readable versions, oldest first, and the names of the folders left out."""
        if not self.root.is_dir():
            return [], []
        found, left_out = [], []
        for child in self.root.iterdir():
            try:
                if child.name.startswith(".") or not (child / MANIFEST).is_file():
                    continue
                found.append(self.manifest(child.name))
            except (RegistryError, OSError) as exc:  # OSError: a folder this user may not read
                log.warning("model version left out", extra={"reason": str(exc)})
                left_out.append(child.name)
        return sorted(found, key=lambda manifest: manifest.created_at), left_out

    def staging(self) -> Path:
        """A fresh folder to write a version into; `publish` moves it into place."""
        path = self.root / f"{_STAGING}{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            path.mkdir()
        except OSError as exc:
            raise RegistryError(f"cannot write to the model registry {self.root}: {exc}") from exc
        return path

    def check_writable(self) -> None:
        """Raise RegistryError now if no version could be written (before hours of training)."""
        shutil.rmtree(self.staging())

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """A staging folder for one writer, removed if writing or publishing fails; the leftovers
        of writers killed earlier are removed first."""
        self.discard_staging()
        path = self.staging()
        try:
            with weights_written(path):  # a full disk, to safetensors: no OSError
                yield path
        except BaseException:
            _remove(path)
            raise

    def publish(self, staging: Path, manifest: Manifest) -> Path:
        """Write the manifest last, flush everything to disk, then rename: the version appears
        complete or not at all, a machine crash included."""
        target = self.path(manifest.version)
        if target.exists():
            raise RegistryError(f"model version '{manifest.version}' already exists")
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        fsync_tree(staging)
        staging.rename(target)
        fsync(self.root)
        return target

    def register(self, source: Path, manifest: Manifest) -> Path:
        """Copy any Hugging Face causal LM folder into the registry as a new version."""
        if (problem := _not_a_model(source)) is not None:
            raise RegistryError(f"{source} is not a Hugging Face model folder ({problem})")
        with self.staged() as staging:
            try:
                shutil.copytree(source, staging, dirs_exist_ok=True)
            except OSError as exc:  # shutil.Error too: every file that could not be copied
                raise RegistryError(f"{source} could not be copied: {exc}") from exc
            _owner_writable(staging)  # copytree copies a read-only source's folder modes too
            (staging / MANIFEST).unlink(missing_ok=True)
            return self.publish(staging, manifest)

    def prunable(self, keep: int, serving: set[str]) -> list[str]:
        """All but the newest `keep` trained versions (0: none), oldest first; never one in
        `serving` (the active and the previous version: a rollback needs it), a version brought
        in (`models register`, `models import-gguf`: a base to train on, not a product of
        training) or the base a kept adapter runs on. RegistryError while a version folder cannot
        be read."""
        if keep == 0:
            return []
        versions, left_out = self._scan()
        if left_out:  # it may be an adapter whose base would not be kept
            raise RegistryError(
                f"version folders that cannot be read: {', '.join(sorted(left_out))}; nothing "
                f"pruned until they are mended or removed from {self.root}"
            )
        trained = [m.version for m in versions if m.training.get("method") not in BROUGHT_IN]
        kept = {m.version for m in versions} - set(trained[:-keep]) | serving
        kept |= {m.base_model for m in versions if m.version in kept and m.base_model}
        return [m.version for m in versions if m.version not in kept]

    def remove(self, removed: list[str]) -> None:
        """Remove versions (`trainer.prune.prune` chooses them)."""
        for version in removed:
            # Out of sight in one rename, so that no reader sees a half-deleted version.
            hidden = self.root / f"{_STAGING}{uuid.uuid4().hex}"
            self.path(version).rename(hidden)
            _remove(hidden)
        if removed:
            fsync(self.root)

    def discard_staging(self, older_than: float = STALE_STAGING_SECONDS) -> int:
        """Remove staging folders untouched for `older_than` seconds: left behind by writers
        that were killed. Returns how many."""
        leftovers = list(self.root.glob(f"{_STAGING}*")) if self.root.is_dir() else []
        stale = [path for path in leftovers if time.time() - _touched(path) >= older_than]
        for path in stale:
            _remove(path)
        return len(stale)


def _not_a_model(source: Path) -> str | None:
    """Why `source` is not a model folder transformers can load, or None."""
    try:
        config = json.loads((source / "config.json").read_text())
    except FileNotFoundError:
        return "no config.json"
    except (OSError, ValueError) as exc:
        return f"config.json cannot be read: {exc}"
    if not isinstance(config, dict) or not config.get("model_type"):
        return "its config.json names no model_type"
    if not any(source.glob("*.safetensors")) and not any(source.glob("*.bin")):
        return "no weights: no *.safetensors or *.bin file"
    return None


def _owner_writable(path: Path) -> None:
    for folder, _, _ in os.walk(path):
        with suppress(OSError):
            os.chmod(folder, os.stat(folder).st_mode | stat.S_IRWXU)


def _remove(path: Path) -> None:
    """Remove a staging folder, also one holding folders copied read-only."""
    _owner_writable(path)
    shutil.rmtree(path, ignore_errors=True)


def _touched(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # published or removed meanwhile
        return time.time()


def has_chat_template(folder: Path) -> bool:
    """Whether a Hugging Face folder's tokenizer has a chat template (in its own file, as
    transformers 5 saves it, or in tokenizer_config.json, as older versions did)."""
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def base_version(manifest: Manifest) -> str:
    """The full-weights version a version runs on: itself, or the one its adapter adapts."""
    if manifest.kind == "full":
        return manifest.version
    if manifest.base_model is None:
        raise RegistryError(f"LoRA version {manifest.version} names no base model")
    return manifest.base_model


def servable(registry: Registry, version: str) -> Manifest:
    """The version's manifest if a gateway can serve it: a contract it speaks and, for an
    adapter, its adapter files and a full-weights base in the registry. RegistryError otherwise
    (an activation refused, not a gateway or launcher failing to open it)."""
    manifest = registry.manifest(version)
    check_contract(manifest)
    if manifest.kind == "full":
        _loadable(registry, version, manifest.chat_template)
        return manifest
    base = base_version(manifest)
    if base == version or not registry.has(base):
        raise RegistryError(f"LoRA version {version} adapts {base}, which is not in the registry")
    if registry.manifest(base).kind != "full":
        raise RegistryError(f"LoRA version {version} adapts {base}, itself an adapter")
    try:
        _loadable(registry, base, manifest.chat_template)
    except RegistryError as exc:  # said of the version activated, not only of its base
        adapts = f"LoRA version {version} adapts {base}"
        raise RegistryError(f"{adapts}: {exc}", public=f"{adapts}: {exc.public}") from exc
    adapter_rank(registry.path(version))
    if not any((registry.path(version) / name).is_file() for name in ADAPTER_WEIGHTS):
        raise RegistryError(f"LoRA version {version} holds no adapter weights")
    return manifest


def _loadable(registry: Registry, version: str, chat: bool) -> None:
    # A folder left with its manifest alone (weights removed by hand, a copy cut short) was
    # activated, and every gateway then failed to open it; so was one whose chat template
    # (prompts of a chat version go through it) cannot load.
    folder = registry.path(version)
    refused = f"model version {version} cannot be served"
    # The reasons may quote a path of this machine: for the log, not for clients.
    if (problem := _not_a_model(folder)) is not None:
        raise RegistryError(f"{refused}: {problem}", public=f"{refused}: no model in its folder")
    if chat and (problem := _no_chat_template(folder)) is not None:
        raise RegistryError(f"{refused}: {problem}", public=f"{refused}: no chat template")


def _no_chat_template(folder: Path) -> str | None:
    """Why a chat version's tokenizer has no chat template, as far as its files tell (the
    tokenizer itself loads in the gateway), or None."""
    try:
        json.loads((folder / "tokenizer_config.json").read_text())
    except FileNotFoundError:
        pass  # the template may sit in chat_template.jinja
    except (OSError, ValueError) as exc:
        return f"tokenizer_config.json cannot be read: {exc}"
    return None if has_chat_template(folder) else "its tokenizer has no chat template"


def adapter_rank(path: Path) -> int:
    """The rank of the LoRA adapter in a version folder (peft's adapter_config.json)."""
    try:
        return int(json.loads((path / ADAPTER_CONFIG).read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(
            f"{path} holds no readable LoRA adapter: {exc}",
            public=f"{path.name} holds no readable LoRA adapter",
        ) from exc


def stored_parameters(path: Path) -> int:
    """Parameters stored in a version folder's safetensors files (headers only, nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="numpy") as weights:
            total += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    return total


def check_contract(manifest: Manifest) -> None:
    if manifest.contract_version not in SUPPORTED_CONTRACTS:
        raise RegistryError(
            f"model {manifest.version} speaks prompt contract {manifest.contract_version}; this "
            f"gateway speaks {', '.join(sorted(SUPPORTED_CONTRACTS))}"
        )
