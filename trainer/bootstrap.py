"""`reasonrec bootstrap`: the embedded model, from the store's data to an active registry version.

Stages: candidate index -> examples -> tokenizer -> model -> item-sequence pretraining (compact
rendering) -> SFT -> GRPO (as RecLLM-R1 trains) -> validation -> atomic publish -> activation,
only for a model that ranks at least as well as the retrieval order it reranks (the gate). Each
stage logs and shows progress; the manifest records what each stage scored.
"""

import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from contract.prompt import ANSWER_TAG, Contract, parse_answer, ref
from contract.ranking import served_order
from reward_rules.metrics import mean_self_information, ndcg_at_k
from reward_rules.policy import Policy, build_terms, catalog_facts
from server.config import Settings
from server.item_index import ItemIndex, publish
from server.policy import read_policy
from server.registry import Manifest, Registry, new_version
from server.store import Store
from trainer.constrained import answer_constraint, constrained_generation
from trainer.corpus import Corpus, read_corpus
from trainer.dataset import ExampleBuilder, Examples, Shape
from trainer.examples import Example
from trainer.grpo import run_grpo
from trainer.model import build_model, parameter_count, seed_item_embeddings
from trainer.presets import PRESETS, Preset
from trainer.pretrain import first_pick_ndcg, pretrain
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


def beats_retrieval(metrics: dict[str, float]) -> bool:
    """The gate: a model must rank its validation users at least as well as the retrieval order."""
    return metrics.get("ndcg@10", 0.0) >= metrics.get("retrieval_ndcg@10", 0.0)


def activation(metrics: dict[str, float], other_active: bool, force: bool) -> tuple[bool, str]:
    """Whether a new version becomes active, and why, in a sentence for the operator."""
    ours, theirs = metrics.get("ndcg@10", 0.0), metrics.get("retrieval_ndcg@10", 0.0)
    beats = beats_retrieval(metrics)
    verdict = "ranks at least as well as" if beats else "ranks WORSE than"
    said = (
        f"the model {verdict} the retrieval order on {int(metrics.get('validation_users', 0))} "
        f"validation users (NDCG@10 {ours:.4f} vs {theirs:.4f})"
    )
    if other_active:
        return False, f"{said}; another version is active, so this one was not activated"
    if beats or force:
        return True, f"{said}; activated" + ("" if beats else " (forced)")
    return (
        False,
        f"{said}; NOT activated: the gateway serves the retrieval order (--force overrides)",
    )


def build_index(corpus: Corpus, settings: Settings, dim: int, seed: int = 0) -> ItemIndex:
    """Build the candidate index from the corpus and make it the current version."""
    sequences = [[item for item, _ in seq] for seq in corpus.sequences.values()]
    index = ItemIndex.build(list(corpus.items.values()), sequences, dim=dim, seed=seed)
    publish(index, settings.data_dir)
    return index


def _texts(corpus: Corpus, examples: list[Example]) -> list[str]:
    catalog = [f"{item.title} {' '.join(item.categories)}" for item in corpus.items.values()]
    return catalog + [e.prompt + e.target for e in examples[:200]]


# How much the served order may lean on the retrieval order (server.recommend.blended); validation
# picks one per model. Measured on ML-100K outside the project: 0.25 added 0.002 NDCG@10. The
# largest weights come close to the retrieval order itself, a choice always left to validation.
RETRIEVAL_PRIORS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)

# The served lists' novelty may fall at most this far below the retrieval order's: a model
# trained on what users chose learns popularity, and a prior that trades a little accuracy for
# the catalog's long tail is preferred to the most accurate one that recommends only hits.
NOVELTY_FLOOR = 0.95


def _answer(model, tokenizer, example: Example, budget: int) -> tuple[str, dict[str, float]]:
    """The greedy completion and each candidate's score as its first answer item (the scores
    after the answer constraint, as vLLM's processed log-probabilities are)."""
    inputs = tokenizer(text=example.prompt, return_tensors="pt")
    output = model.generate(
        **inputs,
        max_new_tokens=budget,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    answer = tokenizer.convert_tokens_to_ids(ANSWER_TAG)
    if answer not in new or new.index(answer) + 1 >= len(output.scores):
        return text, {}
    logprobs = output.scores[new.index(answer) + 1][0].log_softmax(-1)
    tokens = {item: tokenizer.convert_tokens_to_ids(ref(item)) for item in example.candidates}
    if any(token in (None, tokenizer.unk_token_id) for token in tokens.values()):
        return text, {}  # items are not single tokens: no first-pick scores to read
    scored = {item: float(logprobs[token]) for item, token in tokens.items()}
    return text, {item: score for item, score in scored.items() if math.isfinite(score)}


@torch.no_grad()
def validate(
    model, tokenizer, examples: list[Example], popularity: Mapping[str, int]
) -> dict[str, float]:
    """Answers on held-out last interactions: NDCG@k and novelty of the model vs the retrieval
    order (novelty from `popularity`, the training interactions per item).

    Decoding follows the answer grammar, as vLLM's structured outputs do when serving, and the
    served order is chosen as the gateway chooses it (`contract.ranking.served_order`) with the
    retrieval prior among RETRIEVAL_PRIORS that `choose_prior` picks: the figures are what the
    gateway would serve with `retrieval_prior`; `invalid_rate` counts answers still repaired.
    """
    model.eval()
    budget = 8 + 6 * max((e.k for e in examples), default=0) + 60
    constraint = answer_constraint(tokenizer, examples, budget) if examples else None
    with constrained_generation(model, constraint):
        answers = [_answer(model, tokenizer, example, budget) for example in examples]
    total = sum(popularity.values())
    scored = {p: _served(examples, answers, p, popularity, total) for p in RETRIEVAL_PRIORS}
    retrieval = _scored([e.candidates[: e.k] for e in examples], examples, popularity, total)
    prior = choose_prior(scored, retrieval)
    chosen = scored[prior]
    return {
        "validation_users": float(len(examples)),
        "ndcg@10": chosen.ndcg,
        "novelty@10": chosen.novelty,
        "first_pick_ndcg@10": scored[0.0].ndcg,
        "retrieval_ndcg@10": retrieval.ndcg,
        "retrieval_novelty@10": retrieval.novelty,
        "retrieval_prior": prior,
        "invalid_rate": chosen.invalid,
    }


class Served(BaseModel):
    """Means over validation lists."""

    ndcg: float
    novelty: float
    invalid: float = 0.0


def choose_prior(scored: Mapping[float, Served], retrieval: Served) -> float:
    """The most accurate prior whose lists keep novelty within NOVELTY_FLOOR of the retrieval
    order's; when none does, the most novel one (the largest prior, nearest retrieval).

    >>> retrieval = Served(ndcg=0.10, novelty=10.0)
    >>> choose_prior({0.0: Served(ndcg=0.13, novelty=9.0), 1.0: Served(ndcg=0.12, novelty=9.6),
    ...               2.0: Served(ndcg=0.11, novelty=9.9)}, retrieval)
    1.0
    """
    floor = NOVELTY_FLOOR * retrieval.novelty

    def preference(prior: float) -> tuple[bool, float, float]:
        served = scored[prior]
        novel = served.novelty >= floor
        return novel, served.ndcg if novel else served.novelty, -prior

    return max(scored, key=preference)


def _served(
    examples: list[Example],
    answers: list[tuple[str, dict[str, float]]],
    prior: float,
    popularity: Mapping[str, int],
    total: int,
) -> Served:
    """The lists the gateway would serve with `prior`, scored, with the repaired share."""
    lists, invalid = [], 0
    for example, (text, scores) in zip(examples, answers, strict=True):
        ranked, repaired = served_order(
            parse_answer(text), scores, example.candidates, example.k, prior
        )
        invalid += repaired
        lists.append(ranked)
    served = _scored(lists, examples, popularity, total)
    served.invalid = invalid / max(len(examples), 1)
    return served


def _scored(
    lists: list[list[str]], examples: list[Example], popularity: Mapping[str, int], total: int
) -> Served:
    n = max(len(examples), 1)
    pairs = list(zip(lists, examples, strict=True))
    return Served(
        ndcg=sum(ndcg_at_k(ranked, e.positives, e.k) for ranked, e in pairs) / n,
        novelty=sum(mean_self_information(ranked, popularity, total) for ranked, _ in pairs) / n,
    )


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
):
    """Every training stage; returns the model, its tokenizer and what each stage scored."""
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
    stages["sft_ndcg@10"] = validate(model, tokenizer, examples.validation, corpus.popularity)[
        "ndcg@10"
    ]
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
    index = build_index(corpus, settings, preset.index_dim, seed)
    shape = Shape(
        candidates=settings.candidates,
        history=settings.prompt_history,
        contract=contract(preset, settings),
    )
    examples = _examples(corpus, index, shape, preset, seed)
    policy = read_policy(settings.policy_file)
    model, tokenizer, stages = train_model(corpus, index, examples, preset, policy, shape, seed)
    metrics = stages | validate(model, tokenizer, examples.validation, corpus.popularity)
    registry = Registry(settings.registry_path)
    staging = registry.staging()
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    manifest = Manifest(
        version=new_version(),
        trained_on=trained_on,
        rendering=shape.contract.rendering,
        prompt_history=shape.contract.history,
        retrieval_prior=metrics["retrieval_prior"],
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
        metrics=metrics,
        index_version=index.version,
    )
    path = registry.publish(staging, manifest)
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
