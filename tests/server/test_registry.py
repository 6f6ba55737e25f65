"""The model registry: atomic versions, manifests, registration, contract checks, and an app
whose active model speaks a contract this gateway does not."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from safetensors import SafetensorError
from typer.testing import CliRunner

from cli import app
from contract.prompt import CONTRACT_VERSION
from contract.tasks import Task
from server.config import Settings
from server.durable import WeightsNotWritten
from server.registry import (
    ADAPTER_CONFIG,
    MANIFEST,
    Manifest,
    Registry,
    RegistryError,
    adapter_rank,
    base_version,
    check_contract,
    has_chat_template,
    new_version,
    servable,
    stored_parameters,
)
from server.store import BeingRemoved, Store, open_store
from tests.conftest import command_env
from tests.server.helpers import (
    metric,
    post_events,
    publish_version,
    put_items,
    write_model,
)
from trainer.cli import EXIT_BUSY
from trainer.prune import prune

T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def names(registry: Registry) -> list[str]:
    return [manifest.version for manifest in registry.versions()]


# Atomic publishing -----------------------------------------------------------------------------


def test_staging_is_invisible_until_published(registry: Registry) -> None:
    staging = registry.staging()
    write_model(staging)
    # Even a manifest written early does not make a staging folder a version.
    (staging / MANIFEST).write_text(Manifest(version="v1").model_dump_json())
    assert registry.versions() == []

    target = registry.publish(staging, Manifest(version="v1"))

    assert target == registry.path("v1")
    assert names(registry) == ["v1"]
    assert not staging.exists()
    assert (target / "config.json").is_file() and (target / MANIFEST).is_file()


def test_a_writer_that_never_publishes_leaves_no_version(registry: Registry) -> None:
    publish_version(registry, "v1")
    for _ in range(2):  # two writers that crashed half way
        write_model(registry.staging())
    assert names(registry) == ["v1"]

    assert registry.discard_staging() == 0  # they may still be writing
    assert registry.discard_staging(older_than=0) == 2

    assert [path.name for path in registry.root.iterdir()] == ["v1"]
    assert names(registry) == ["v1"]
    assert registry.discard_staging(older_than=0) == 0


def test_discard_staging_without_a_registry_folder(tmp_path: Path) -> None:
    assert Registry(tmp_path / "absent").discard_staging() == 0
    assert Registry(tmp_path / "absent").versions() == []


def test_publish_refuses_an_existing_version(registry: Registry) -> None:
    first = publish_version(registry, "v1", metrics={"ndcg": 0.3})
    staging = registry.staging()
    write_model(staging)

    with pytest.raises(RegistryError, match="'v1' already exists"):
        registry.publish(staging, Manifest(version="v1", metrics={"ndcg": 0.9}))

    # The published version is untouched; the refused writer's folder is a leftover.
    assert registry.manifest("v1").metrics == {"ndcg": 0.3}
    assert sorted(path.name for path in first.iterdir()) == [
        "config.json",
        MANIFEST,
        "model.safetensors",
    ]
    assert registry.discard_staging(older_than=0) == 1


def test_a_failed_writer_leaves_no_staging_and_the_next_one_clears_old_leftovers(
    registry: Registry, tmp_path: Path
) -> None:
    killed = registry.staging()  # a writer killed a day ago
    os.utime(killed, (time.time() - 86_401, time.time() - 86_401))
    source = tmp_path / "hf"
    source.mkdir()
    write_model(source)
    (source / "weights.bin").symlink_to(tmp_path / "gone")  # a dangling link: copy fails

    with pytest.raises(RegistryError, match="could not be copied"):
        registry.register(source, Manifest(version="v1"))

    assert list(registry.root.iterdir()) == []
    assert names(registry) == []


def test_manifest_round_trip(registry: Registry) -> None:
    manifest = Manifest(
        version="v2",
        parent="v1",
        kind="lora",
        base_model="v1",
        created_at=T0,
        trained_on="ml-100k:eval-train-split",
        training={"lr": 1e-5, "steps": 10, "nested": {"beta": 0.04}},
        data_window={"from": "2024-01-01", "events": 1234},
        reward_weights={"format": 0.2, "accuracy": 1.0},
        metrics={"ndcg@10": 0.41},
        index_version="20240101T000000000000Z-0123456789ab",
    )
    staging = registry.staging()
    write_model(staging)
    registry.publish(staging, manifest)

    assert registry.manifest("v2") == manifest
    assert registry.manifest("v2").created_at.tzinfo is not None


def test_manifest_defaults_to_this_contract() -> None:
    manifest = Manifest(version="v1")
    assert manifest.contract_version == CONTRACT_VERSION
    assert manifest.tasks == [Task.rank] and manifest.contract.tasks == {Task.rank}
    assert manifest.kind == "full"
    assert manifest.created_at.tzinfo is not None


def test_manifest_of_an_unknown_version(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="'nope' is not in the registry"):
        registry.manifest("nope")


def test_a_writer_stopped_by_a_full_disk_is_an_os_error(registry: Registry) -> None:
    """safetensors reports a full disk as its own error, no OSError: the commands that write a
    version printed a traceback for it."""
    full = "Error while serializing: I/O error: No space left on device (os error 28)"
    refused = pytest.raises(WeightsNotWritten, match=r"weights not written to .*No space left")
    with refused, registry.staged():
        raise SafetensorError(full)
    assert list(registry.root.iterdir()) == []


def test_versions_sorted_by_created_at(registry: Registry) -> None:
    # Names in the opposite order of creation: the sort must use created_at.
    for version, days in [("a", 3), ("b", 1), ("c", 2), ("d", 0)]:
        publish_version(registry, version, created_at=T0 + timedelta(days=days))
    assert names(registry) == ["d", "b", "c", "a"]


def test_versions_ignore_folders_without_a_manifest(registry: Registry) -> None:
    publish_version(registry, "v1")
    (registry.root / "stray").mkdir()
    (registry.root / "notes.txt").write_text("not a version")
    assert names(registry) == ["v1"]


def test_new_versions_are_unique_and_named_by_time() -> None:
    made = {new_version() for _ in range(100)}
    assert len(made) == 100
    assert all(version.startswith("v20") for version in made)


# Registering an existing model folder ----------------------------------------------------------


def test_register_copies_a_model_folder(registry: Registry, tmp_path: Path) -> None:
    source = tmp_path / "hf-model"
    (source / "sub").mkdir(parents=True)
    write_model(source)
    (source / "sub" / "tokenizer.json").write_text("{}")
    # A manifest in the source belongs to another registry: it is replaced.
    (source / MANIFEST).write_text(json.dumps({"version": "elsewhere"}))

    target = registry.register(source, Manifest(version="v1", parent=None))

    assert target == registry.path("v1")
    assert (target / "config.json").read_text() == (source / "config.json").read_text()
    assert (target / "sub" / "tokenizer.json").is_file()
    assert registry.manifest("v1").version == "v1"
    # The source is copied, not moved.
    assert (source / "config.json").is_file()
    assert json.loads((source / MANIFEST).read_text()) == {"version": "elsewhere"}
    assert not list(registry.root.glob(".staging-*"))


def test_register_refuses_a_folder_without_config(registry: Registry, tmp_path: Path) -> None:
    source = tmp_path / "not-a-model"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"\x00")

    with pytest.raises(RegistryError, match=r"no config\.json"):
        registry.register(source, Manifest(version="v1"))

    assert registry.versions() == []
    # Refused before anything was written: no staging folder to clean up.
    assert not list(registry.root.glob(".staging-*"))


@pytest.mark.parametrize(
    ("config", "weights", "problem"),
    [
        ("{}", True, "names no model_type"),
        ("not json", True, "config.json cannot be read"),
        ('{"model_type": "llama"}', False, "no weights"),
    ],
)
def test_register_refuses_a_folder_transformers_could_not_load(
    registry: Registry, tmp_path: Path, config: str, weights: bool, problem: str
) -> None:
    source = tmp_path / "almost"
    source.mkdir()
    (source / "config.json").write_text(config)
    if weights:
        (source / "model.safetensors").write_bytes(b"\x00")
    with pytest.raises(RegistryError, match=problem):
        registry.register(source, Manifest(version="v1"))
    assert registry.versions() == []


def test_a_read_only_source_is_registered_as_a_version_that_can_be_removed(
    registry: Registry, tmp_path: Path
) -> None:
    source = tmp_path / "shipped"
    (source / "sub").mkdir(parents=True)
    write_model(source)
    for folder in (source / "sub", source):
        folder.chmod(0o555)  # as a read-only mount or a package's data would be
    try:
        target = registry.register(source, Manifest(version="v1"))
    finally:
        for folder in (source, source / "sub"):
            folder.chmod(0o755)
    assert all(os.stat(folder).st_mode & 0o200 for folder in (target, target / "sub"))


@pytest.mark.parametrize("typed", ["v1/", "./v1", "../models/v1"])
def test_a_path_is_not_a_version_name(registry: Registry, typed: str) -> None:
    publish_version(registry, "v1")
    with pytest.raises(RegistryError, match="is not a version name"):
        registry.manifest(typed)


def test_an_unwritable_registry_is_a_registry_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    registry = Registry(tmp_path / "file" / "models")  # under a file: nothing can be made
    with pytest.raises(RegistryError, match="cannot write to the model registry"):
        registry.check_writable()


def test_a_manifest_time_without_a_zone_is_read_as_utc(registry: Registry) -> None:
    publish_version(registry, "v-new")
    old = publish_version(registry, "v-old")
    manifest = json.loads((old / MANIFEST).read_text())
    (old / MANIFEST).write_text(json.dumps(manifest | {"created_at": "2020-01-01T00:00:00"}))
    assert names(registry) == ["v-old", "v-new"]


# Pruning ---------------------------------------------------------------------------------------


def test_prune_keeps_the_newest_the_serving_and_the_bases_of_kept_adapters(
    registry: Registry,
) -> None:
    for age, version in enumerate(["v0", "v1", "v2", "v3", "v4", "v5"]):
        created = T0 + timedelta(hours=age)
        fields = {"kind": "lora", "base_model": "v1"} if version == "v5" else {}
        publish_version(registry, version, created_at=created, **fields)
    imported = {"method": "imported", "format": "gguf"}  # a base to train on, not a product
    publish_version(registry, "v-gguf", created_at=T0 - timedelta(hours=1), training=imported)

    chosen = registry.prunable(keep=1, serving={"v2", "v3"})
    assert chosen == ["v0", "v4"]
    registry.remove(chosen)
    # v1: the base the kept adapter needs; the imported model is no version training made
    assert names(registry) == ["v-gguf", "v1", "v2", "v3", "v5"]
    assert not list(registry.root.glob(".*"))  # nothing left behind
    assert registry.prunable(keep=1, serving={"v2", "v3"}) == []


def test_nothing_is_pruned_while_a_version_cannot_be_read(registry: Registry) -> None:
    """An unreadable version may be the adapter that keeps its base: left out of the listing,
    its base was chosen for removal."""
    for age, version in enumerate(["base", "v1", "adapter"]):
        fields = {"kind": "lora", "base_model": "base"} if version == "adapter" else {}
        publish_version(registry, version, created_at=T0 + timedelta(hours=age), **fields)
    (registry.root / "adapter" / "manifest.json").write_bytes(b'{"version": "caf\xe9"}')

    with pytest.raises(RegistryError, match="cannot be read: adapter; nothing pruned"):
        registry.prunable(keep=1, serving={"adapter"})
    assert names(registry) == ["base", "v1"]  # listed without it, as before


def test_prune_keep_zero_removes_nothing(registry: Registry) -> None:
    publish_version(registry, "v1")
    assert registry.prunable(keep=0, serving=set()) == []
    assert registry.prunable(keep=1, serving=set()) == []
    assert names(registry) == ["v1"]


def test_models_prune_keeps_what_redis_says_is_served(
    settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(settings.registry_path)
    for age, version in enumerate(["v0", "v1", "v2", "v3"]):
        publish_version(registry, version, created_at=T0 + timedelta(hours=age))
    client = redis.Redis.from_url(redis_url)
    client.set(f"{settings.key_prefix}:model:active", "v0")
    client.set(f"{settings.key_prefix}:model:previous", "v1")
    for name, value in {"REDIS_URL": redis_url, "KEY_PREFIX": settings.key_prefix}.items():
        monkeypatch.setenv(f"REASONREC_{name}", value)
    monkeypatch.setenv("REASONREC_DATA_DIR", str(settings.data_dir))

    result = CliRunner().invoke(app, ["models", "prune", "--keep", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["v2"]
    assert names(registry) == ["v0", "v1", "v3"]
    monkeypatch.setenv("REASONREC_KEEP_VERSIONS", "0")
    assert CliRunner().invoke(app, ["models", "prune"]).output == ""
    assert CliRunner().invoke(app, ["models", "prune", "--keep", "0"]).exit_code == 2


def test_one_prune_at_a_time(
    settings: Settings, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two at once: the second to finish ended the first's refusal of activations while the
    first was still removing, and could remove a version activated meanwhile."""
    registry = Registry(settings.registry_path)
    for age, version in enumerate(["v0", "v1", "v2"]):
        publish_version(registry, version, created_at=T0 + timedelta(hours=age))
    client = redis.Redis.from_url(redis_url)
    client.set(f"{settings.key_prefix}:model:prune-lock", "another prune")
    for name, value in {"REDIS_URL": redis_url, "KEY_PREFIX": settings.key_prefix}.items():
        monkeypatch.setenv(f"REASONREC_{name}", value)
    monkeypatch.setenv("REASONREC_DATA_DIR", str(settings.data_dir))

    busy = CliRunner().invoke(app, ["models", "prune", "--keep", "1"])
    assert busy.exit_code == EXIT_BUSY and "another prune is running" in busy.output
    assert names(registry) == ["v0", "v1", "v2"]
    client.delete(f"{settings.key_prefix}:model:prune-lock")
    done = CliRunner().invoke(app, ["models", "prune", "--keep", "1"])
    assert done.exit_code == 0 and done.output.split() == ["v0", "v1"], done.output
    assert not client.exists(f"{settings.key_prefix}:model:prune-lock")  # released


def test_a_prune_stopped_by_sigterm_finishes_the_version_at_hand_and_gives_the_lock_back(
    settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    """Killed with the lock, a prune held every other one off for 5 minutes; and it printed
    nothing of what it had removed."""
    registry = Registry(settings.registry_path)
    for age, version in enumerate(["v0", "v1", "v2", "v3"]):
        publish_version(registry, version, created_at=T0 + timedelta(hours=age))
    # Each removal takes a second: the signal comes during the second one.
    script = (
        "import sys, time; from server.registry import Registry; from cli import main\n"
        "remove = Registry.remove\n"
        "Registry.remove = lambda self, versions: (time.sleep(1), remove(self, versions))\n"
        "sys.argv = ['reasonrec', 'models', 'prune', '--keep', '1']; main()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], env=command_env(settings), stdout=subprocess.PIPE, text=True
    )
    lock = f"{settings.key_prefix}:model:prune-lock"
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    while not client.exists(lock) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=60)

    assert process.returncode == 128 + signal.SIGTERM
    printed = stdout.split()
    assert printed[:2] == ["v0", "v1"] and "v2" not in printed, stdout
    assert names(registry) == ["v2", "v3"]
    assert not client.exists(lock)
    # Only the removed stay refused activation (until the marks lapse): v2 may be again.
    marked = client.smembers(f"{settings.key_prefix}:model:pruning")
    assert marked == {b"v0", b"v1"}, marked


def _pruned_to_one(settings: Settings, registry: Registry) -> list[str]:
    """What a prune to the newest version removes, with v3 active."""

    async def body() -> list[str]:
        async with open_store(settings) as store:
            await store.set_active_model("v3")
            return await prune(registry, store, keep=1)

    return asyncio.run(body())


def test_a_version_being_pruned_cannot_be_activated(settings: Settings) -> None:
    async def body() -> tuple[BaseException | None, str | None]:
        async with open_store(settings) as store:
            await store.mark_pruning(["v0"])
            try:
                await store.set_active_model("v0")
            except BeingRemoved as exc:
                refused = exc
            await store.unmark_pruning(["v0"])
            await store.set_active_model("v0")  # once removed, or kept, it may be again
            return refused, await store.active_model()

    refused, active = asyncio.run(body())
    assert str(refused) == "model version 'v0' is being removed from the registry"
    assert active == "v0"


def test_a_version_activated_as_it_is_chosen_for_pruning_is_kept(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator's activation between the choice and the removal had its folder removed
    under the gateways."""
    registry = Registry(settings.registry_path)
    for age, version in enumerate(["v0", "v1", "v2", "v3"]):
        publish_version(registry, version, created_at=T0 + timedelta(hours=age))
    marking = Store.mark_pruning

    async def activated_first(store: Store, versions: list[str]) -> set[str]:
        if len(versions) > 1:  # the first marks, of all chosen; later ones renew them
            await store.set_active_model("v0")  # the operator, just before
        return await marking(store, versions)

    monkeypatch.setattr(Store, "mark_pruning", activated_first)

    assert _pruned_to_one(settings, registry) == ["v1", "v2"]
    assert names(registry) == ["v0", "v3"]  # v0 active, v3 the previous


def test_a_pruned_version_stays_refused_to_an_activation_checked_before_it_was_removed(
    settings: Settings,
) -> None:
    """The route checks that the version is there, then activates it: a prune between the two
    left every gateway pointed at a folder gone."""
    registry = Registry(settings.registry_path)
    for age, version in enumerate(["v0", "v1", "v2"]):
        publish_version(registry, version, created_at=T0 + timedelta(hours=age))

    async def body() -> list[str]:
        async with open_store(settings) as store:
            await store.set_active_model("v2")
            removed = await prune(registry, store, keep=1)
            with pytest.raises(BeingRemoved):  # checked before, activated now
                await store.set_active_model("v0")
            return removed

    assert asyncio.run(body()) == ["v0", "v1"]
    assert names(registry) == ["v2"]


def test_a_version_activated_once_the_marks_lapsed_is_kept(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, rdb
) -> None:
    """A prune longer than its marks (a slow disk, many large versions) removed a version
    activated after they lapsed."""
    registry = Registry(settings.registry_path)
    for age, version in enumerate(["v0", "v1", "v2", "v3"]):
        publish_version(registry, version, created_at=T0 + timedelta(hours=age))
    removing = Registry.remove

    def slow(self: Registry, versions: list[str]) -> None:
        if versions == ["v0"]:  # the marks and the lock lapse; the operator activates v1
            rdb.delete(f"{settings.key_prefix}:model:pruning")
            rdb.delete(f"{settings.key_prefix}:model:prune-lock")
            rdb.set(f"{settings.key_prefix}:model:active", "v1")
        removing(self, versions)

    monkeypatch.setattr(Registry, "remove", slow)

    assert _pruned_to_one(settings, registry) == ["v0", "v2"]
    assert names(registry) == ["v1", "v3"]
    assert not rdb.exists(f"{settings.key_prefix}:model:prune-lock")  # taken again, released


# Contract versions -----------------------------------------------------------------------------


# LoRA versions and weights ---------------------------------------------------------------------


def test_base_version_of_a_full_version_and_of_an_adapter() -> None:
    assert base_version(Manifest(version="v1")) == "v1"
    assert base_version(Manifest(version="v2", kind="lora", base_model="v1")) == "v1"
    with pytest.raises(RegistryError, match="v3 names no base model"):
        base_version(Manifest(version="v3", kind="lora"))


def test_a_version_is_servable_only_with_what_serving_it_needs(registry: Registry) -> None:
    """Each passed the activation and broke later: the gateway refused it while the pointer named
    it, and the vLLM launcher stopped the vLLM that served and crash-looped."""
    publish_version(registry, "v1")
    adapter = publish_version(registry, "a1", kind="lora", base_model="v1")
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({"r": 8}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    publish_version(registry, "a2", kind="lora", base_model="a1")
    publish_version(registry, "a3", kind="lora", base_model="a3")
    publish_version(registry, "a4", kind="lora", base_model="v1")
    weightless = publish_version(registry, "a5", kind="lora", base_model="v1")
    (weightless / ADAPTER_CONFIG).write_text(json.dumps({"r": 8}))
    template = {"chat_template": "{{ messages[0]['content'] }}"}
    (publish_version(registry, "c1", chat_template=True) / "tokenizer_config.json").write_text(
        json.dumps(template)
    )
    (publish_version(registry, "c2", chat_template=True) / "tokenizer_config.json").write_text("{")
    publish_version(registry, "c3", chat_template=True)  # no tokenizer files at all
    chat_adapter = publish_version(registry, "c4", kind="lora", base_model="v1", chat_template=True)
    for name, text in [(ADAPTER_CONFIG, '{"r": 8}'), ("adapter_model.safetensors", "")]:
        (chat_adapter / name).write_text(text)

    assert servable(registry, "a1").base_model == "v1"
    assert servable(registry, "c1").chat_template
    for version, problem in [
        ("a2", "LoRA version a2 adapts a1, itself an adapter"),
        ("a3", "LoRA version a3 adapts a3, which is not in the registry"),
        ("a4", "a4 holds no readable LoRA adapter"),
        ("a5", "LoRA version a5 holds no adapter weights"),
        ("c2", "model version c2 cannot be served: tokenizer_config.json cannot be read"),
        ("c3", "model version c3 cannot be served: its tokenizer has no chat template"),
        ("c4", "LoRA version c4 adapts v1: model version v1 cannot be served: its tokenizer"),
    ]:
        with pytest.raises(RegistryError, match=problem):
            servable(registry, version)


def test_a_folder_copied_by_hand_is_not_read_as_the_version_it_names(
    registry: Registry,
) -> None:
    """It was served with the other version's weights and listed twice."""
    shutil.copytree(publish_version(registry, "v1"), registry.path("v9"))

    with pytest.raises(RegistryError, match="folder v9 holds the manifest of v1"):
        registry.manifest("v9")
    assert names(registry) == ["v1"]


def test_adapter_rank_reads_peft_config(tmp_path: Path) -> None:
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    assert adapter_rank(tmp_path) == 8
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(RegistryError, match="no readable LoRA adapter"):
        adapter_rank(tmp_path)
    with pytest.raises(RegistryError, match="no readable LoRA adapter"):
        adapter_rank(tmp_path / "missing")


def test_parameter_count_reads_safetensors_headers(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({"a": np.zeros((3, 4), np.float32)}, tmp_path / "model-1.safetensors")
    save_file(
        {"b": np.zeros(5, np.float16), "c": np.zeros((2, 2, 2))}, tmp_path / "model-2.safetensors"
    )
    assert stored_parameters(tmp_path) == 12 + 5 + 8
    assert stored_parameters(tmp_path / "empty") == 0


def test_check_contract_accepts_this_gateways_contract() -> None:
    check_contract(Manifest(version="v1", contract_version=CONTRACT_VERSION))


def test_check_contract_refuses_an_unknown_contract() -> None:
    with pytest.raises(RegistryError) as refused:
        check_contract(Manifest(version="v9", contract_version="999"))
    message = str(refused.value)
    # It names the model, the contract it speaks and the one the gateway speaks.
    assert "v9" in message
    assert "999" in message
    assert f"gateway speaks {CONTRACT_VERSION}" in message


def test_app_with_a_model_of_another_contract_serves_in_fallback(
    settings: Settings,
    make_client: Callable[..., TestClient],
    rdb: redis.Redis,
    key_prefix: str,
) -> None:
    registry = Registry(settings.registry_path)
    publish_version(registry, "v-future", contract_version="999")
    rdb.set(f"{key_prefix}:model:active", "v-future")
    client = make_client()
    put_items(client, "a", "b", "c")
    events = [{"user_id": f"u{n}", "item_id": "a", "type": "click"} for n in range(3)]
    assert post_events(client, *events).status_code == 200
    no_model_before = metric(client, "reasonrec_fallbacks_total", reason="no_model")

    ready = client.get("/readyz")
    response = client.post("/v1/recommend", json={"user_id": "u0", "k": 2})

    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "degraded"
    assert body["model_version"] is None
    assert body["checks"]["redis"] == "ok"
    assert "v-future" in body["checks"]["engine"]
    assert "999" in body["checks"]["engine"]
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["source"] == "fallback" and served["degraded"] is True
    assert served["model_version"] is None
    # The retrieval order: popular and new items, less the one u0 has seen.
    assert sorted(item["item_id"] for item in served["items"]) == ["b", "c"]
    assert metric(client, "reasonrec_fallbacks_total", reason="no_model") == no_model_before + 1


def test_app_with_an_active_version_missing_from_the_registry(
    settings: Settings,
    make_client: Callable[..., TestClient],
    rdb: redis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rdb.set(f"{key_prefix}:model:active", "v-gone")
    client = make_client()

    body = client.get("/readyz").json()

    assert body["status"] == "degraded"
    assert "'v-gone' is not in the registry" in body["checks"]["engine"]
    # The route is open: the folder it was looked for in goes to the log only.
    assert str(settings.registry_path) not in body["checks"]["engine"]
    refused = [r for r in caplog.records if r.getMessage() == "model swap refused"]
    assert refused and str(settings.registry_path) in refused[0].reason


def test_a_registry_error_keeps_folders_out_of_its_public_text(tmp_path: Path) -> None:
    with pytest.raises(RegistryError) as refused:
        adapter_rank(tmp_path / "v7")
    assert str(tmp_path) in str(refused.value)
    assert refused.value.public == "v7 holds no readable LoRA adapter"
    assert str(tmp_path) not in refused.value.public


@pytest.mark.parametrize(
    ("files", "chat"),
    [
        ({"chat_template.jinja": "{{ messages }}"}, True),  # transformers 5 writes it apart
        ({"tokenizer_config.json": '{"chat_template": "{{ messages }}"}'}, True),
        ({"tokenizer_config.json": '{"chat_template": null}'}, False),
        ({"tokenizer_config.json": "not json"}, False),
        ({}, False),
    ],
)
def test_a_folder_has_a_chat_template_where_transformers_keeps_one(
    tmp_path: Path, files: dict[str, str], chat: bool
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert has_chat_template(tmp_path) is chat


def test_a_version_is_on_disk_before_it_is_visible(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename alone can show a complete-looking version of truncated files after a power
    loss: every file and folder is flushed before the rename, the registry's entry after."""
    flushed: list[str] = []
    flush = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: flushed.append(os.readlink(f"/proc/self/fd/{fd}")) or flush(fd)
    )
    staging = registry.staging()
    write_model(staging)

    target = registry.publish(staging, Manifest(version="v1"))

    written = {str(staging / name) for name in ("config.json", "model.safetensors", MANIFEST)}
    assert written <= set(flushed[:-2])
    assert flushed[-2:] == [str(staging), str(registry.root)]
    assert (target / MANIFEST).is_file()
