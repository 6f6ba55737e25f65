"""`reasonrec bootstrap`: the embedded model, from the store's data to an active registry version.

Stages: candidate index -> examples -> tokenizer -> model -> item-sequence pretraining (compact
rendering) -> SFT -> GRPO (as RecLLM-R1 trains) -> validation -> atomic publish -> activation,
only for a model that ranks at least as well as the retrieval order it reranks (the gate). Each
stage logs and shows progress; the manifest records what each stage scored.
"""

import logging
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, Field

from contract.prompt import Contract
from reward_rules.policy import Policy, build_terms, catalog_facts
from server.config import Settings
from server.index_files import publish
from server.item_index import ItemIndex
from server.policy import read_policy
from server.registry import Manifest, Registry, new_version
from server.store import Store
from trainer.corpus import Corpus, read_corpus
from trainer.dataset import ExampleBuilder, Examples, Shape
from trainer.examples import Example
from trainer.gate import Popularity, activation, validate
from trainer.grpo import run_grpo
from trainer.index_build import build_index
from trainer.model import build_model, parameter_count, seed_item_embeddings
from trainer.presets import PRESETS, Preset
from trainer.pretrain import first_pick_ndcg, pretrain
from trainer.publish import publish_model, validated
from trainer.sft import run_sft
from trainer.tokenizer import train_tokenizer

log = logging.getLogger(__name__)


class BootstrapResult(BaseModel):
    version: str
    path: Path
    index_version: str
    activated: bool
    gate: str = Field(description="Why the version was or was not activated, in a sentence.")
    metrics: dict[str, float]
    seconds: float


def index_corpus(corpus: Corpus, settings: Settings, dim: int, seed: int = 0) -> ItemIndex:
    """Build the candidate index from the corpus and make it the current version."""
    sequences = [[item for item, _ in seq] for seq in corpus.sequences.values()]
    index = build_index(list(corpus.items.values()), sequences, dim=dim, seed=seed)
    publish(index, settings.data_dir)
    return index


def _texts(corpus: Corpus, examples: list[Example]) -> list[str]:
    catalog = [f"{item.title} {' '.join(item.categories)}" for item in corpus.items.values()]
    return catalog + [e.prompt + e.target for e in examples[:200]]


def _examples(
    corpus: Corpus, index: ItemIndex, shape: Shape, preset: Preset, seed: int
) -> Examples:
    """SFT examples at sampled positions, and each validation user's last interaction."""
    builder = ExampleBuilder(corpus, index, shape)
    train = list(builder.sample(preset.sft_examples, seed))
    validation = builder.validation(preset.validation_users, seed)
    log.info("examples built", extra={"train": len(train), "validation": len(validation)})
    if not train:
        raise ValueError("no training examples: the store needs users with 3+ interactions")
    return Examples(train=train, validation=validation)


def train_model(
    corpus: Corpus,
    index: ItemIndex,
    examples: Examples,
    preset: Preset,
    policy: Policy,
    shape: Shape,
    seed: int,
    novelty_floor: float,
):
    """Every training stage; returns the model, its tokenizer and what each stage scored (each
    validated with `novelty_floor`)."""
    tokenizer = train_tokenizer(
        _texts(corpus, examples.train), list(corpus.items), preset.vocab_size
    )
    model = build_model(tokenizer, preset.model, seed=seed)
    vectors = {item_id: index.vector(item_id) for item_id in index.item_ids}
    seeded = seed_item_embeddings(model, tokenizer, vectors, seed=seed)
    log.info("model built", extra={"parameters": parameter_count(model), "seeded_items": seeded})
    stages: dict[str, float] = {}
    if preset.pretrain is not None:
        pretrained = pretrain(model, tokenizer, corpus, preset.pretrain, shape.contract.history)
        stages["pretrain_seconds"] = pretrained.seconds
        stages["pretrain_ndcg@10"] = first_pick_ndcg(model, tokenizer, examples.validation)
    model = run_sft(model, tokenizer, examples.train, preset.sft)
    popularity = Popularity.of(corpus.popularity, index)
    stages["sft_ndcg@10"] = validate(
        model, tokenizer, examples.validation, popularity, novelty_floor
    )["ndcg@10"]
    grpo_examples = examples.train[: preset.grpo_examples]
    with tempfile.TemporaryDirectory(prefix="reasonrec-grpo-") as scratch:
        facts = catalog_facts(corpus.items.values(), policy)
        terms = build_terms(policy, facts, corpus.popularity)
        model = run_grpo(model, tokenizer, grpo_examples, terms, preset.grpo, Path(scratch))
    return model, tokenizer, stages


def contract(preset: Preset, settings: Settings) -> Contract:
    history = settings.prompt_history if preset.prompt_history is None else preset.prompt_history
    return Contract(rendering=preset.rendering, history=history)


async def bootstrap(
    settings: Settings,
    store: Store,
    preset_name: str = "default",
    seed: int = 0,
    trained_on: str | None = None,
    force: bool = False,
) -> BootstrapResult:
    """Train and publish a version; activate it when no version is active and it passes the gate
    (or `force`)."""
    started = time.perf_counter()
    preset = PRESETS[preset_name]
    corpus = await read_corpus(store)
    index = index_corpus(corpus, settings, preset.index_dim, seed)
    shape = Shape(
        candidates=settings.candidates,
        history=settings.prompt_history,
        contract=contract(preset, settings),
    )
    examples = _examples(corpus, index, shape, preset, seed)
    policy = read_policy(settings.policy_file)
    model, tokenizer, stages = train_model(
        corpus, index, examples, preset, policy, shape, seed, settings.novelty_floor
    )
    popularity = Popularity.of(corpus.popularity, index)
    metrics = stages | validate(
        model, tokenizer, examples.validation, popularity, settings.novelty_floor
    )
    registry = Registry(settings.registry_path)
    manifest = Manifest(
        version=new_version(),
        trained_on=trained_on,
        rendering=shape.contract.rendering,
        prompt_history=shape.contract.history,
        training={
            "method": "pretrain+sft+grpo" if preset.pretrain else "sft+grpo",
            "preset": preset_name,
            "seed": seed,
            "parameters": parameter_count(model),
            "candidates": shape.candidates,
            "retrieval_history": shape.history,
            "sft_examples": len(examples.train),
            "grpo_examples": min(len(examples.train), preset.grpo_examples),
            **preset.model_dump(include={"pretrain", "sft", "grpo"}),
        },
        data_window=corpus.window(),
        reward_weights=policy.weights,
        policy=policy.model_dump(mode="json"),
        index_version=index.version,
    )
    manifest = validated(manifest, metrics)
    path = publish_model(registry, model, tokenizer, manifest)
    activated, gate = activation(metrics, await store.active_model() is not None, force)
    if activated:
        await store.set_active_model(manifest.version)
    log.info("bootstrap published", extra={"version": manifest.version, "gate": gate})
    return BootstrapResult(
        version=manifest.version,
        path=path,
        index_version=index.version,
        activated=activated,
        gate=gate,
        metrics=metrics,
        seconds=round(time.perf_counter() - started, 1),
    )
