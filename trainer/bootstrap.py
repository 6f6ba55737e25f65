"""`reasonrec bootstrap`: the embedded model, from the store's data to an active registry version.

Stages: candidate index -> examples -> tokenizer -> model -> item-sequence pretraining (compact
rendering) -> for ranking, SFT -> GRPO (as RecLLM-R1 trains) ->
for rating, RecOne's SFT or nothing (RecZero) -> GRPO (`trainer.rating`) -> for search, SFT ->
GRPO with the retriever's reward, kept if it validates no worse (`trainer.search`, whose
validation is the version's) -> validation of ranking and rating -> atomic publish -> activation,
only for a model that beats its fallback on every task it was trained for (the gate: the retrieval
order it reranks, the lean baseline, the raw query). Each stage logs and shows progress; the
manifest records what each stage scored.
"""

import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from pydantic import BaseModel, Field
from transformers import PreTrainedTokenizerBase

from contract.prompt import Contract, Rendering
from contract.search import RetrieverKind
from contract.tasks import Task
from reward_rules.policy import Policy, build_terms, catalog_facts
from server.config import Settings
from server.index_files import IndexChanged, check_writable, load_current, publish
from server.interrupts import interruptible
from server.item_index import ItemIndex
from server.policy import read_policy
from server.registry import Manifest, Registry, new_version
from server.search_index import SearchIndex
from server.store import ActiveModelChanged, Store
from trainer.base import base_manifest, for_grpo, load_base, servable
from trainer.corpus import Corpus, NotEnoughData, latest_per_item, read_corpus
from trainer.dataset import ExampleBuilder, Examples, Shape
from trainer.device import select_device
from trainer.examples import Example, in_chat
from trainer.gate import Popularity, activation, validate
from trainer.grpo import run_grpo, spread
from trainer.index_build import build_index, inputs_digest
from trainer.model import build_model, parameter_count, seed_item_embeddings
from trainer.presets import PRESETS, Preset, Recipe
from trainer.pretrain import first_pick_ndcg, pretrain
from trainer.publish import publish_model, validated
from trainer.rating import (
    RatingExampleBuilder,
    RatingExamples,
    train_rating,
    validate_rating,
)
from trainer.search import (
    SearchExampleBuilder,
    SearchExamples,
    catalog_retriever,
    train_search,
)
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
    stages: dict[str, str] = Field(
        default_factory=dict,
        description="Versions published of intermediate stages (`keep_stages`): each kept "
        "task's SFT stage, as `rank_sft` or `search_sft`.",
    )


def _sequences(corpus: Corpus, held_out: bool = False) -> list[list[str]]:
    end = -1 if held_out else None
    return [[item for item, _ in latest_per_item(seq)][:end] for seq in corpus.sequences.values()]


def current_index(corpus: Corpus, settings: Settings) -> ItemIndex | None:
    """The current candidate index, rebuilt first (at its size and seed) and made current when
    the catalog or the interactions changed since it was built: items added through the API
    reach the candidates with the next refresh, not only with `reasonrec index`. None when there
    is none."""
    index = load_current(settings.data_dir)
    if index is None:
        return None
    seed = index.manifest.get("params", {}).get("seed", 0)
    inputs = inputs_digest(corpus.items.values(), _sequences(corpus), index.dim, seed=seed)
    if index.manifest.get("inputs_sha256") == inputs:
        return index
    try:
        return index_corpus(corpus, settings, index.dim, seed, replacing=index.version)
    except IndexChanged:  # `reasonrec index` or a bootstrap published meanwhile: theirs stays
        return load_current(settings.data_dir)


def index_corpus(
    corpus: Corpus,
    settings: Settings,
    dim: int,
    seed: int = 0,
    current: bool = True,
    held_out: bool = False,
    replacing: str | None = None,
) -> ItemIndex:
    """Build the candidate index from the corpus and (with `current`) make it the current
    version, the one gateways load. `held_out`: without each user's last interaction, which
    bootstrap's validation holds out; an index that learnt it retrieved the held-out item
    (on synthetic data the retrieval order's validation NDCG@10 read 0.207 against 0.164),
    flattering the retrieval baseline the gate compares with and the blend's retrieval prior.
    `replacing`: publish only while that version is current (`IndexChanged` otherwise)."""
    sequences = _sequences(corpus, held_out)
    index = build_index(list(corpus.items.values()), sequences, dim=dim, seed=seed)
    if current:
        publish(index, settings.data_dir, replacing=replacing)
    return index


def _texts(corpus: Corpus, examples: list[Example]) -> list[str]:
    catalog = [f"{item.title} {' '.join(item.categories)}" for item in corpus.items.values()]
    return catalog + [e.prompt + e.target for e in examples]


def _examples(
    corpus: Corpus, index: ItemIndex, shape: Shape, policy: Policy, preset: Preset, seed: int
) -> Examples:
    """SFT examples at sampled positions, and each validation user's last interaction, their
    candidates what the policy would serve. Without the ranking task they only measure what
    pretraining learned, and may be none."""
    builder = ExampleBuilder(corpus, index, shape, policy)
    train = list(builder.sample(preset.sft_examples, seed))
    validation = builder.validation(preset.validation_users, seed)
    log.info("examples built", extra={"train": len(train), "validation": len(validation)})
    if not train and Task.rank in shape.contract.tasks:
        raise NotEnoughData("no training examples: the store needs users with 3+ positive events")
    return Examples(train=train, validation=validation)


class Plan(BaseModel, arbitrary_types_allowed=True):
    """What a bootstrap trains: the tasks, the rating task's recipe and examples, the search
    task's examples and the retriever its reward runs."""

    tasks: frozenset[Task] = frozenset({Task.rank})
    recipe: Recipe = Recipe.one
    rating: RatingExamples | None = None
    search: SearchExamples | None = None
    retriever: SearchIndex | None = None
    keep_stages: frozenset[Task] = Field(
        frozenset(), description="Tasks whose SFT stage's model is kept too (for evaluation)."
    )

    def joint_sft(self) -> list:
        """Examples of other tasks that join ranking's SFT: SFT on them after ranking's would
        make the model forget how to rank."""
        if Task.rank not in self.tasks:
            return []
        rating = self.rating.train if self.rating and self.recipe is Recipe.one else []
        return [*rating, *(self.search.train if self.search else [])]


def _embedded_model(
    corpus: Corpus,
    index: ItemIndex,
    examples: Examples,
    preset: Preset,
    plan: Plan,
    seed: int,
    device: torch.device,
):
    """A tokenizer trained on the data (one token per item) and a fresh model whose item
    embeddings start from the index vectors."""
    # 200 prompts of each task (the first 200 of them all were every one a ranking prompt)
    rating = plan.rating.train[:200] if plan.rating else []
    search = plan.search.train[:200] if plan.search else []
    tokenizer = train_tokenizer(
        _texts(corpus, [*examples.train[:200], *rating, *search]),
        list(corpus.items),
        preset.vocab_size,
        plan.tasks,
    )
    model = build_model(tokenizer, preset.model, seed=seed)
    seeded = seed_item_embeddings(model, tokenizer, _vectors(index), seed=seed)
    log.info("model built", extra={"parameters": parameter_count(model), "seeded_items": seeded})
    return model.to(device), tokenizer


def _vectors(index: ItemIndex) -> dict[str, np.ndarray]:
    return {item_id: index.vector(item_id) for item_id in index.item_ids}


def train_model(
    corpus: Corpus,
    index: ItemIndex,
    examples: Examples,
    preset: Preset,
    policy: Policy,
    shape: Shape,
    plan: Plan,
    seed: int,
    novelty_floor: float,
    device: torch.device,
    start: tuple[PeftModel, PreTrainedTokenizerBase] | None = None,
):
    """Every training stage of the plan's tasks, on `device`, from `start` (a pretrained base
    under LoRA adapters, and its tokenizer) or from a model and tokenizer built for the data;
    returns the model, its tokenizer, what each stage scored (ranking validated with
    `novelty_floor`) and the SFT stage's model of each task in `plan.keep_stages` (by name:
    `rank_sft`, `search_sft`)."""
    stages: dict[str, float] = {}
    kept = {}
    if start is not None:
        model, tokenizer = start
    else:
        model, tokenizer = _embedded_model(corpus, index, examples, preset, plan, seed, device)
        if preset.pretrain is not None:
            history = shape.contract.history
            pretrained = pretrain(model, tokenizer, corpus, preset.pretrain, history)
            stages["pretrain_seconds"] = pretrained.seconds
            if examples.validation:
                ndcg = first_pick_ndcg(model, tokenizer, examples.validation)
                stages["pretrain_ndcg@10"] = ndcg
    facts = catalog_facts(corpus.items.values(), policy)
    joint = plan.joint_sft()
    if Task.rank in plan.tasks:
        model = run_sft(model, tokenizer, [*examples.train, *joint], preset.sft)
        popularity = Popularity.of(corpus.popularity, index)
        stages["sft_ndcg@10"] = validate(
            model, tokenizer, examples.validation, popularity, novelty_floor
        )["ndcg@10"]
        if Task.rank in plan.keep_stages:
            kept["rank_sft"] = copy.deepcopy(model)
        grpo_examples = spread(examples.train, preset.grpo_examples, seed)
        grpo = preset.grpo
        if start is not None and preset.item_tokens:
            model = for_grpo(model)
            grpo = grpo.model_copy(update={"lora_rank": preset.lora_rank})
        with tempfile.TemporaryDirectory(prefix="reasonrec-grpo-") as scratch:
            terms = build_terms(policy, facts, corpus.popularity)
            model = run_grpo(model, tokenizer, grpo_examples, terms, grpo, Path(scratch))
    if plan.rating is not None:
        with tempfile.TemporaryDirectory(prefix="reasonrec-grpo-") as scratch:
            terms = build_terms(policy, facts, corpus.popularity, Task.rate)
            model, rated = train_rating(
                model,
                tokenizer,
                plan.rating,
                preset.rate,
                plan.recipe,
                terms,
                Path(scratch),
                sft=Task.rank not in plan.tasks,
            )
        stages |= rated
    # Search trains last: `train_search` validates the model it returns, and nothing changes it
    # after, so its figures are the final model's.
    if plan.search is not None and plan.retriever is not None:
        with tempfile.TemporaryDirectory(prefix="reasonrec-grpo-") as scratch:
            model, after_sft, searched = train_search(
                model,
                tokenizer,
                plan.search,
                preset.search,
                plan.retriever,
                Path(scratch),
                sft=Task.rank not in plan.tasks,
                keep_sft=Task.search in plan.keep_stages,
            )
        stages |= searched
        if after_sft is not None:
            kept["search_sft"] = after_sft
    return model, tokenizer, stages, kept


def validate_tasks(
    model,
    tokenizer,
    examples: Examples,
    popularity: Popularity,
    plan: Plan,
    novelty_floor: float,
) -> dict[str, float]:
    """Ranking's and rating's validation metrics (see `trainer.gate.validate` and
    `validate_rating`); search's come with its training (`train_search`), the last stage."""
    metrics: dict[str, float] = {}
    if Task.rank in plan.tasks:
        metrics |= validate(model, tokenizer, examples.validation, popularity, novelty_floor)
    if plan.rating is not None:
        metrics |= validate_rating(model, tokenizer, plan.rating.validation, plan.rating.rendering)
    return metrics


def _rating_examples(
    corpus: Corpus, shape: Shape, preset: Preset, seed: int
) -> RatingExamples | None:
    if Task.rate not in shape.contract.tasks:
        return None
    builder = RatingExampleBuilder(corpus, shape.contract.rendering, shape.contract.history)
    rating = builder.build(preset.rate.sft_examples, preset.rate.validation_users, seed)
    if not rating.train or not rating.validation:
        raise NotEnoughData("no rating examples: the store needs users with 2+ rating events")
    return rating


def _search_plan(
    corpus: Corpus, shape: Shape, preset: Preset, seed: int, retriever: RetrieverKind
) -> tuple[SearchExamples | None, SearchIndex | None]:
    """The search task's examples and the retriever its reward runs (the gateway's kind)."""
    if Task.search not in shape.contract.tasks:
        return None, None
    contract = shape.contract
    builder = SearchExampleBuilder(
        corpus,
        contract.rendering,
        contract.history,
        preset.search.typed_share,
        preset.search.items_named,
    )
    search = builder.build(preset.search.sft_examples, preset.search.validation_users, seed)
    if not search.train or not search.validation:
        raise NotEnoughData("no search examples: the store needs users with 3+ positive events")
    return search, catalog_retriever(corpus, retriever)


def _trained_fields(tasks: frozenset[Task], base: Manifest | None) -> set[str]:
    """The preset's settings that the training used."""
    stages = {"sft", "grpo", "lora_rank", "item_tokens"} if base else {"pretrain", "sft", "grpo"}
    return stages | {str(task) for task in tasks & {Task.rate, Task.search}}


def contract(
    preset: Preset, settings: Settings, tasks: frozenset[Task], base: Manifest | None = None
) -> Contract:
    """How the version's prompts are written: the preset's rendering, or for a pretrained base
    the rich one (its tokenizer has no item tokens) in its chat template if it has one."""
    if base is not None:
        return Contract(
            rendering=Rendering.rich,
            history=settings.prompt_history,
            chat=base.chat_template,
            tasks=tasks,
        )
    history = settings.prompt_history if preset.prompt_history is None else preset.prompt_history
    return Contract(rendering=preset.rendering, history=history, tasks=tasks)


async def bootstrap(
    settings: Settings,
    store: Store,
    preset_name: str = "default",
    seed: int = 0,
    trained_on: str | None = None,
    force: bool = False,
    tasks: frozenset[Task] = frozenset({Task.rank}),
    recipe: Recipe = Recipe.one,
    keep_stages: frozenset[Task] = frozenset(),
    base: str | None = None,
) -> BootstrapResult:
    """Train a version for `tasks` (the rating task with `recipe`) and publish it; activate it
    when no version is active and it passes every task's gate (or `force`). `keep_stages`: also
    publish these tasks' SFT stages as versions of their own (never activated), so that
    `reasonrec eval` can serve them. `base`: a pretrained version of the registry to train LoRA
    adapters on (ranking only), published as a LoRA version of it; raises RegistryError for a
    base it cannot train from."""
    started = time.perf_counter()
    preset = PRESETS[preset_name]
    registry = Registry(settings.registry_path)
    registry.check_writable()
    check_writable(settings.data_dir)  # the index is published beside the model
    parent = base_manifest(registry, base, tasks) if base else None
    device = select_device(settings.train_device)
    policy = read_policy(settings.policy_file)
    with interruptible():  # from the store's read on: under asyncio.run, Ctrl-C waited for it
        corpus = await read_corpus(store)
        shape = Shape(
            candidates=settings.candidates,
            history=settings.prompt_history,
            contract=contract(preset, settings, tasks, parent),
        )
        # First: a store that cannot train rating says so before the index is built.
        rating = _rating_examples(corpus, shape, preset, seed)
        # Training and validation read an index without the held-out items; gateways get one
        # of everything, current only once the version is published: a bootstrap that fails
        # leaves serving as it was.
        index = index_corpus(corpus, settings, preset.index_dim, seed, current=False, held_out=True)
        served = index_corpus(corpus, settings, preset.index_dim, seed, current=False)
        examples = _examples(corpus, index, shape, policy, preset, seed)
        item_tokens = parent is not None and preset.item_tokens
        start = None
        if parent is not None:
            vectors = _vectors(index) if item_tokens else None
            start = load_base(registry, parent, preset.lora_rank, device, vectors, seed)
        if start is not None and parent.chat_template:
            chat = start[1]
            examples = Examples(
                train=in_chat(examples.train, chat), validation=in_chat(examples.validation, chat)
            )
        search, retriever = _search_plan(corpus, shape, preset, seed, settings.search_retriever)
        plan = Plan(
            tasks=tasks,
            recipe=recipe,
            rating=rating,
            search=search,
            retriever=retriever,
            keep_stages=keep_stages,
        )
        model, tokenizer, stages, kept = train_model(
            corpus,
            index,
            examples,
            preset,
            policy,
            shape,
            plan,
            seed,
            settings.novelty_floor,
            device,
            start,
        )
        popularity = Popularity.of(corpus.popularity, index)
        metrics = stages | validate_tasks(
            model, tokenizer, examples, popularity, plan, settings.novelty_floor
        )
        adapter = parent is not None and not item_tokens
        if item_tokens:
            model = servable(model, item_tokens)
            kept = {name: servable(stage, item_tokens) for name, stage in kept.items()}
        manifest = Manifest(
            version=new_version(),
            trained_on=trained_on,
            rendering=shape.contract.rendering,
            prompt_history=shape.contract.history,
            chat_template=shape.contract.chat,
            kind="lora" if adapter else "full",
            base_model=parent.version if adapter else None,
            training={
                "method": _method(preset, parent),
                **({"base": parent.version} if parent else {}),
                "tasks": sorted(tasks),
                **({"rate_recipe": recipe.value} if Task.rate in tasks else {}),
                **({"search_retriever": settings.search_retriever.value} if search else {}),
                "preset": preset_name,
                "seed": seed,
                "parameters": parameter_count(model),
                "candidates": shape.candidates,
                "retrieval_history": shape.history,
                "sft_examples": len(examples.train),
                "grpo_examples": min(len(examples.train), preset.grpo_examples),
                **preset.model_dump(include=_trained_fields(tasks, parent)),
            },
            data_window=corpus.window(),
            reward_weights=policy.weights,
            policy=policy.model_dump(mode="json"),
            index_version=served.version,
            tasks=sorted(tasks),
        )
        manifest = validated(manifest, metrics)
        path = publish_model(registry, model, tokenizer, manifest)
        publish(served, settings.data_dir)
        kept = {
            name: _publish_stage(registry, stage, tokenizer, manifest, name.replace("_", " "))
            for name, stage in kept.items()
        }
    active = await store.active_model()
    # A version missing from the registry (emptied under a Redis that outlived it) serves nobody.
    other_active = active is not None and registry.has(active)
    activated, gate = activation(metrics, tasks, other_active, force)
    if activated:
        try:
            await store.set_active_model(manifest.version, replacing=active, checked=True)
        except ActiveModelChanged:  # another bootstrap's version, activated while this trained
            activated, gate = activation(metrics, tasks, True, force)
    log.info("bootstrap published", extra={"version": manifest.version, "gate": gate})
    return BootstrapResult(
        version=manifest.version,
        path=path,
        index_version=served.version,
        activated=activated,
        gate=gate,
        metrics=metrics,
        seconds=round(time.perf_counter() - started, 1),
        stages=kept,
    )


def _method(preset: Preset, base: Manifest | None) -> str:
    if base is not None:
        tokens = ", items as new tokens" if preset.item_tokens else ""
        return f"lora-sft+grpo on {base.version}{tokens}"
    return "pretrain+sft+grpo" if preset.pretrain else "sft+grpo"


def _publish_stage(registry: Registry, model, tokenizer, manifest: Manifest, stage: str) -> str:
    training = {**manifest.training, "stage": stage}
    staged = manifest.model_copy(update={"version": new_version(), "training": training})
    publish_model(registry, model, tokenizer, staged)
    return staged.version
