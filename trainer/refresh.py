"""One refresh: logged feedback -> GRPO from the active version -> gate -> atomic publish.

`reasonrec train --once` runs it; `reasonrec trainer` runs it on a schedule. A Redis lock makes
sure no two refreshes run at once, whichever process starts them. Its holder renews it every
RENEW_SECONDS, through Redis errors; a refresh that finds its lock gone (lapsed, another holder's,
or not renewed for LOCK_SECONDS) publishes nothing: it ends "skipped", its reason "lost the refresh
lock: ...". Lost while the version was being written, the version is published but not activated.
"""

import asyncio
import copy
import errno
import json
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from peft import PeftModel
from pydantic import BaseModel
from redis.exceptions import RedisError
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from contract.prompt import Contract, Rendering, render_answer
from contract.ranking import target_items
from contract.rating import STEP_CHARS
from contract.tasks import Task
from reward_rules.policy import Policy, build_terms, catalog_facts
from server.active_model import refreshed_with_lora
from server.config import Settings
from server.durable import WeightsNotWritten
from server.item_index import ItemIndex
from server.logs import describe, refresh_id_var
from server.policy import read_policy
from server.registry import (
    REFRESH_METHOD,
    Manifest,
    Registry,
    RegistryError,
    base_version,
    new_version,
)
from server.search_index import SearchIndex
from server.store import PRUNING_SECONDS, ActiveModelChanged, Store
from trainer import metrics
from trainer.bootstrap import current_index
from trainer.constrained import RatingConstraint
from trainer.corpus import Corpus, read_corpus
from trainer.dataset import ExampleBuilder, Shape
from trainer.device import select_device
from trainer.examples import Example, in_chat
from trainer.feedback_log import KEEP_FACTOR, ConsumeResult, FeedbackLog, LoggedExample
from trainer.gate import Gate, Popularity, refresh_gate, validate
from trainer.grpo import STATE_FILE, Stopped, run_grpo
from trainer.presets import GrpoSettings
from trainer.prune import PruneBusy, prune, prune_held
from trainer.publish import publish_model, validated
from trainer.rating import RatingExampleBuilder, RatingExamples, validate_rating
from trainer.search import (
    SearchExampleBuilder,
    SearchExamples,
    catalog_retriever,
    validate_search,
)
from trainer.threads import finish_in_thread

log = logging.getLogger(__name__)
# The holder renews the lock while it works; a killed holder's lock lapses within LOCK_SECONDS.
LOCK_SECONDS = 30
RENEW_SECONDS = 10
# How long publishing waits for a prune: a live one renews its lock before each removal, one
# killed frees it within PRUNING_SECONDS.
PRUNE_WAIT_SECONDS = 6 * PRUNING_SECONDS
MIN_RATED_USERS = 4  # users with 2+ ratings, before the held-out part is cut
RATING_GATE_USERS = 64  # held-out ratings of a version whose rating a refresh does not train
# Held-out last interactions a search version's queries are gated on: enough that one user's
# hit turning into a miss (1/256 of NDCG@10) is inside the tolerance (0.01).
SEARCH_GATE_USERS = 256

RefreshOutcome = Literal["published", "rejected", "skipped"]


class RefreshBusy(RuntimeError):
    """Another refresh holds the lock."""


# What the line a refresh ends with says: enough to tell one refresh from the next.
FINISHED_FIELDS = {"outcome", "reason", "parent", "version", "seconds"}


class RefreshResult(BaseModel):
    outcome: RefreshOutcome
    reason: str
    parent: str | None
    version: str | None = None
    consumed: ConsumeResult
    train_examples: int = 0
    fresh_examples: int = 0
    holdout_examples: int = 0
    rating_examples: int = 0
    rating_holdout_examples: int = 0
    reward_mean: float | None = None
    lora_rank: int | None = None
    gate: Gate | None = None
    seconds: float = 0.0


class HeldLock:
    """The refresh lock while `refresh_lock` holds it. `lost` says why it may no longer be held
    (None while it is): renewal found it gone, or no renewal got through for LOCK_SECONDS, after
    which it lapses."""

    def __init__(self, store: Store, token: str, taken_at: float):
        self.store, self.token = store, token
        self.renewed_at = taken_at  # monotonic: when the last renewal that held it was sent
        self._gone: str | None = None
        self._done = asyncio.Event()

    @property
    def lost(self) -> str | None:
        if self._gone is None and time.monotonic() - self.renewed_at >= LOCK_SECONDS:
            return f"not renewed for {LOCK_SECONDS} s"
        return self._gone

    def done(self) -> None:
        """Ask `keep` to end at its next tick."""
        self._done.set()

    async def keep(self) -> None:
        """Renew every RENEW_SECONDS until `done`, or until the lock is found gone; a Redis error
        is logged and the next tick tries again. It ends between renewals, never cancelled in
        one: the release that follows runs on connections no cancellation cut off."""
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), RENEW_SECONDS)
            if self._done.is_set():
                return
            sent = time.monotonic()
            try:
                held = await self.store.renew_trainer_lock(self.token, LOCK_SECONDS)
            except RedisError as exc:
                log.warning("refresh lock not renewed", extra={"reason": describe(exc)})
                if reason := self.lost:
                    log.error("refresh lock lost", extra={"reason": reason})
                continue
            if not held:
                self._gone = "it lapsed, or another refresh took it"
                log.error("refresh lock lost", extra={"reason": self._gone})
                return
            self.renewed_at = sent


@asynccontextmanager
async def refresh_lock(store: Store) -> AsyncIterator[HeldLock]:
    token, taken_at = uuid.uuid4().hex, time.monotonic()
    if not await store.take_trainer_lock(token, LOCK_SECONDS):
        raise RefreshBusy("another refresh is running (Redis lock held)")
    lock = HeldLock(store, token, taken_at)
    renewing = asyncio.create_task(lock.keep())
    try:
        yield lock
    finally:
        lock.done()
        await asyncio.gather(renewing, return_exceptions=True)
        try:
            await store.release_trainer_lock(token)
        except RedisError as exc:  # it lapses within LOCK_SECONDS; the refresh itself is done
            log.warning("refresh lock not released", extra={"reason": describe(exc)})


def trainer_dir(settings: Settings) -> Path:
    return settings.data_dir / "trainer"


def _as_example(logged: LoggedExample) -> Example:
    target = target_items(logged.candidates, logged.positives, logged.k)
    return Example(
        user_id=logged.user_id,
        prompt=logged.prompt,
        candidates=logged.candidates,
        positives=logged.positives,
        k=min(logged.k, len(logged.candidates)),
        target=render_answer("", target),
    )


def fresh_examples(
    corpus: Corpus,
    index: ItemIndex | None,
    settings: Settings,
    contract: Contract,
    policy: Policy,
    gated: set[str],
) -> list[Example]:
    """Recent histories as the gateway would prompt them today for the active version, with the
    current index and the business policy. They add what users did without a logged list
    (organic feedback); logged lists keep their own prompts, as served. None of a user in
    `gated`, whose latest interaction the gate holds out: trained on, the gate would score the
    candidate on what it was just taught."""
    if index is None or not settings.refresh_fresh_examples:
        return []
    shape = Shape(
        candidates=settings.candidates, history=settings.prompt_history, contract=contract
    )
    builder = ExampleBuilder(corpus, index, shape, policy)
    return builder.fresh(settings.refresh_fresh_examples, exclude=gated)


def gated_users(holdout: list[Example], rating: RatingExamples | None) -> set[str]:
    """The users whose ranking or rating the gate scores: a held-out list's click and a held-out
    rating are often their user's latest interaction."""
    rated = rating.validation if rating else []
    return {example.user_id for example in [*holdout, *rated]}


def split_logged(
    logged: list[LoggedExample], holdout: float, rendering: Rendering, newest: int
) -> tuple[list[Example], list[Example]]:
    """The `newest` lists with a positive among their candidates whose prompt was written in
    `rendering`, oldest first; the newest share held out. Not all of them: the gate answers
    every held-out list with two models, and the log holds many more."""
    usable = sorted(
        (e for e in logged if set(e.positives) & set(e.candidates) and e.rendering == rendering),
        key=lambda e: e.ts,
    )[-newest:]
    cut = len(usable) - max(1, round(holdout * len(usable)))
    examples = [_as_example(e) for e in usable]
    return examples[:cut], examples[cut:]


class Training(BaseModel):
    """What GRPO's log says about a run: the mean reward, and whether any group had a spread."""

    reward_mean: float | None
    learned: bool
    lora_rank: int | None = None


def read_training(output_dir: Path) -> Training:
    history = json.loads((output_dir / STATE_FILE).read_text())["log_history"]
    steps = [entry for entry in history if "reward" in entry]
    rewards = [entry["reward"] for entry in steps]
    # A group whose completions all score the same has zero advantage: no gradient but the KL.
    learned = any(entry.get("frac_reward_zero_std", 0.0) < 1.0 for entry in steps)
    return Training(reward_mean=sum(rewards) / len(rewards) if rewards else None, learned=learned)


async def refresh_once(
    settings: Settings, store: Store, progress: bool = True, force: bool = False
) -> RefreshResult:
    """`force`: publish a candidate that ranks worse than the retrieval order (the gate against
    the active version still applies)."""
    started = time.perf_counter()
    # Every line until "refresh finished" carries it (threads started with to_thread too): a
    # sidecar's log interleaves refreshes with the lines between them.
    tagged = refresh_id_var.set(uuid.uuid4().hex[:12])
    try:
        async with refresh_lock(store) as lock:
            result = await _refresh(settings, store, progress, force, lock)
            if result.outcome == "published" and not lock.lost:
                await _prune(settings, store)
        result.seconds = round(time.perf_counter() - started, 1)
        metrics.RUNS.labels(result.outcome).inc()
        if result.outcome == "published":
            metrics.LAST_SUCCESS.set(time.time())
        log.info("refresh finished", extra=result.model_dump(include=FINISHED_FIELDS))
    except RefreshBusy:
        raise
    except asyncio.CancelledError:  # Ctrl-C, SIGTERM: its last line too
        log.info("refresh stopped")
        raise
    except Exception as exc:  # its last line, with its id: the sidecar goes on, `train --once` ends
        metrics.RUNS.labels("failed").inc()
        log.error(
            "refresh failed", extra={"reason": describe(exc)}, exc_info=not _environmental(exc)
        )
        raise
    finally:
        refresh_id_var.reset(tagged)
    return result


async def _prune(settings: Settings, store: Store) -> None:
    """Keep the newest REASONREC_KEEP_VERSIONS versions. A failure is logged, not raised: the
    refresh it follows is published."""
    try:
        removed = await prune(Registry(settings.registry_path), store, settings.keep_versions)
    except (OSError, RedisError, RegistryError, PruneBusy) as exc:
        log.warning("registry not pruned", extra={"reason": describe(exc)})
        return
    if removed:
        log.info("registry pruned", extra={"removed": removed})


def _shortage(
    manifest: Manifest, logged: int, rating: RatingExamples | None, min_lists: int
) -> str | None:
    """Why there is too little to learn from for one of the tasks refreshed, if there is
    (`rating`: None when rating is not refreshed)."""
    if Task.rank in manifest.tasks and logged < min_lists:
        return (
            f"{logged} logged lists with a positive and a {manifest.rendering.value} prompt, "
            f"{min_lists} needed (REASONREC_REFRESH_MIN_LISTS)"
        )
    if rating is None:  # rating is not refreshed
        if Task.rank in manifest.tasks:
            return None
        if Task.rate in manifest.tasks:
            return "rating refresh is off (REASONREC_REFRESH_RATING_EXAMPLES=0), nothing to train"
        return "refresh trains ranking and rating; this version does neither"
    rated = len(rating.train) + len(rating.validation)
    if rated < MIN_RATED_USERS:
        return f"{rated} users with 2+ ratings to learn rating from, {MIN_RATED_USERS} needed"
    return None


def recent_ratings(
    corpus: Corpus, manifest: Manifest, users: int, holdout: float
) -> RatingExamples:
    """The latest rating of the `users` most recently active raters, the newest `holdout` share
    held out, prompted as the version prompts."""
    builder = RatingExampleBuilder(corpus, manifest.rendering, manifest.prompt_history)
    return builder.recent(users, holdout)


# Errors of the machine, not of the code: a full disk, a read-only or failing one, a folder the
# trainer may not write to.
MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def _environmental(exc: Exception) -> bool:
    """A store or registry gone (or held by a prune), a disk full: the reason is the news. A
    traceback is for bugs, a file missing or a timeout among them (both OSErrors)."""
    if isinstance(exc, RedisError | RegistryError | WeightsNotWritten | PruneBusy):
        return True
    return isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS


async def _refresh(
    settings: Settings, store: Store, progress: bool, force: bool, lock: HeldLock
) -> RefreshResult:
    feedback = FeedbackLog(
        store, trainer_dir(settings), keep=KEEP_FACTOR * settings.refresh_logged_examples
    )
    consumed = await feedback.consume()
    # Before anything can skip: items added through the API reach the candidates even while a
    # refresh has too little feedback to train on.
    corpus = await read_corpus(store)
    index = await finish_in_thread(current_index, corpus, settings)
    parent = await store.active_model()
    if parent is None:
        return RefreshResult(
            outcome="skipped", reason="no active model", parent=None, consumed=consumed
        )
    registry = Registry(settings.registry_path)
    manifest = registry.manifest(parent)
    ranks = Task.rank in manifest.tasks
    logged = list(feedback.logged.values()) if ranks else []
    train, holdout = split_logged(
        logged, settings.gate_holdout, manifest.rendering, settings.refresh_logged_examples
    )
    rates = Task.rate in manifest.tasks and settings.refresh_rating_examples > 0
    rating = (
        recent_ratings(corpus, manifest, settings.refresh_rating_examples, settings.gate_holdout)
        if rates
        else None
    )
    if reason := _shortage(manifest, len(train) + len(holdout), rating, settings.refresh_min_lists):
        return RefreshResult(outcome="skipped", reason=reason, parent=parent, consumed=consumed)
    registry.check_writable()  # a read-only registry fails now, not after the training
    policy = read_policy(settings.policy_file)
    facts = catalog_facts(corpus.items.values(), policy)
    if rating is None and Task.rate in manifest.tasks:
        # Rating not refreshed, still gated, every example held out: ranking's GRPO changes the
        # weights that rate too, and a version that rated worse would pass unseen.
        rating = recent_ratings(corpus, manifest, RATING_GATE_USERS, holdout=1.0)
    fresh = (
        await asyncio.to_thread(
            fresh_examples,
            corpus,
            index,
            settings,
            manifest.contract,
            policy,
            gated_users(holdout, rating),
        )
        if ranks
        else []
    )
    # Its held-out targets are users' latest interactions, which fresh examples teach: the gate
    # scores searches of other users (a small store may leave it few).
    search = (
        held_out_searches(corpus, manifest, SEARCH_GATE_USERS, {e.user_id for e in fresh})
        if Task.search in manifest.tasks
        else None
    )
    lessons = Lessons(
        ranking=train + fresh,
        holdout=holdout,
        popularity=Popularity.of(corpus.popularity, index),
        terms=build_terms(policy, facts, corpus.popularity) if ranks else [],
        rating=rating,
        rating_terms=build_terms(policy, facts, corpus.popularity, Task.rate) if rates else [],
        # Search is not trained by a refresh, but gated: ranking's GRPO changes the weights that
        # write the queries too, and a version that searched worse would pass unseen.
        search=search,
        retriever=(
            await asyncio.to_thread(catalog_retriever, corpus, settings.search_retriever)
            if search is not None and search.validation
            else None  # nothing to gate on: the dense retriever would embed the catalog for none
        ),
    )
    grpo = GrpoSettings(
        max_steps=settings.refresh_grpo_steps,
        max_completion_length=settings.max_answer_tokens,
        progress=progress,
    )
    # In a thread: the event loop must stay free to renew the lock while the model trains.
    # Ctrl-C or SIGTERM ends the training at its next step, the lock held until it has ended.
    stop = threading.Event()
    candidate, tokenizer, training, gate = await finish_in_thread(
        _train_and_gate,
        registry,
        manifest,
        lessons,
        grpo,
        settings,
        force,
        stop,
        on_cancel=stop.set,
    )
    _record(gate, training.reward_mean)
    result = RefreshResult(
        outcome="rejected",
        reason="gate failed",
        parent=parent,
        consumed=consumed,
        train_examples=len(train),
        fresh_examples=len(fresh),
        holdout_examples=len(holdout),
        rating_examples=len(rating.train) if rating else 0,
        rating_holdout_examples=len(rating.validation) if rating else 0,
        reward_mean=training.reward_mean,
        lora_rank=training.lora_rank,
        gate=gate,
    )
    if gate is None:
        reason = "no reward signal: every group's completions scored the same"
        return result.model_copy(update={"outcome": "skipped", "reason": reason})
    if not gate.passed:
        reason = "gate failed: the candidate " + "; ".join(gate.failures)
        return result.model_copy(update={"reason": reason})
    if lock.lost:  # another refresh may be running: it publishes, not this one
        reason = f"lost the refresh lock: {lock.lost}; nothing published"
        return result.model_copy(update={"outcome": "skipped", "reason": reason})
    base, adapter = base_version(manifest), isinstance(candidate, PeftModel)
    # No prune between the check and the version in place: it could remove the base meanwhile.
    # Waited for: a trained candidate is not thrown away for a prune.
    async with prune_held(store, wait=PRUNE_WAIT_SECONDS):
        if adapter and not registry.has(base):
            # Activations moved on while it trained and a prune removed the base: an adapter on
            # it could never be served.
            reason = f"gate passed; nothing published: its base {base} was pruned while it trained"
            return result.model_copy(update={"outcome": "skipped", "reason": reason})
        child = child_manifest(manifest, adapter, policy.model_dump(mode="json"), result)
        version = child.version
        try:
            # In a thread too: saving the weights takes seconds, the lock must go on being renewed.
            await finish_in_thread(publish_model, registry, candidate, tokenizer, child)
        except asyncio.CancelledError:  # stopped (SIGTERM) while it wrote: the thread finished
            if registry.has(version):
                log.warning(
                    "refresh stopped: published, not activated",
                    extra={"version": version, "parent": parent},
                )
            raise
    if lock.lost:
        reason = f"gate passed; not activated: lost the refresh lock while publishing: {lock.lost}"
        log.warning("refresh not activated", extra={"version": version, "reason": lock.lost})
        return result.model_copy(
            update={"outcome": "published", "reason": reason, "version": version}
        )
    reason = "gate passed"
    try:
        await store.set_active_model(version, replacing=parent)
    except ActiveModelChanged as exc:  # an operator rolled back or forward meanwhile: theirs wins
        reason = f"gate passed; not activated: {exc.active} became active while it trained"
        log.warning("refresh not activated", extra={"version": version, "active": exc.active})
    except RedisError as exc:  # published all the same: said so, with its name (it read "failed")
        reason = f"gate passed; not activated: Redis failed: {describe(exc)}"
        log.warning("refresh not activated", extra={"version": version, "reason": describe(exc)})
    return result.model_copy(update={"outcome": "published", "reason": reason, "version": version})


def load_version(
    registry: Registry, manifest: Manifest, trainable: bool = False
) -> PreTrainedModel | PeftModel:
    """A version's model: its weights, or its base's weights with its adapters on top."""
    if manifest.kind == "full":
        return AutoModelForCausalLM.from_pretrained(registry.path(manifest.version))
    base = AutoModelForCausalLM.from_pretrained(registry.path(base_version(manifest)))
    path = registry.path(manifest.version)
    return PeftModel.from_pretrained(base, path, is_trainable=trainable)


@dataclass(frozen=True)
class Lessons:
    """What a refresh trains on and gates with, per task the version was trained for."""

    ranking: list[Example]
    holdout: list[Example]
    popularity: Popularity
    terms: list
    rating: RatingExamples | None
    rating_terms: list
    search: SearchExamples | None = None
    retriever: SearchIndex | None = None

    def in_chat(self, tokenizer: PreTrainedTokenizerBase) -> "Lessons":
        """The prompts as the gateway sends them to a chat model: inside its chat template
        (the impression log keeps them without)."""

        rating = self.rating
        if rating is not None:
            rating = rating.model_copy(
                update={
                    "train": in_chat(rating.train, tokenizer),
                    "validation": in_chat(rating.validation, tokenizer),
                }
            )
        search = self.search
        if search is not None:
            search = search.model_copy(update={"validation": in_chat(search.validation, tokenizer)})
        ranking, holdout = in_chat(self.ranking, tokenizer), in_chat(self.holdout, tokenizer)
        return replace(self, ranking=ranking, holdout=holdout, rating=rating, search=search)


def held_out_searches(
    corpus: Corpus, manifest: Manifest, users: int, apart: set[str]
) -> SearchExamples:
    """The last interaction of up to `users` users not in `apart`, prompted as the version prompts
    searches."""
    builder = SearchExampleBuilder(corpus, manifest.rendering, manifest.prompt_history, 0.0)
    return builder.build(0, users, seed=0, apart=apart)


def _scores(model, tokenizer, lessons: Lessons, settings: Settings) -> dict[str, float]:
    scores: dict[str, float] = {}
    if lessons.holdout:
        scores |= validate(
            model, tokenizer, lessons.holdout, lessons.popularity, settings.novelty_floor
        )
    if lessons.rating is not None and lessons.rating.validation:
        rating = lessons.rating
        scores |= validate_rating(model, tokenizer, rating.validation, rating.rendering)
    if lessons.search is not None and lessons.search.validation and lessons.retriever is not None:
        search = lessons.search
        scores |= validate_search(
            model, tokenizer, search.validation, search.rendering, lessons.retriever
        )
    return scores


def _train(
    model, tokenizer, lessons: Lessons, grpo: GrpoSettings, scratch: Path, stop: threading.Event
) -> tuple[PreTrainedModel | PeftModel, Training]:
    """GRPO on each task's examples in turn; the training read from the last run. `Stopped`
    once `stop` is set."""
    training = Training(reward_mean=None, learned=False)
    runs = []
    if lessons.ranking:
        runs.append((lessons.ranking, lessons.terms, grpo, None))
    if lessons.rating is not None and lessons.rating.train:
        constraint = RatingConstraint(tokenizer, STEP_CHARS[lessons.rating.rendering])
        budget = grpo.model_copy(update={"max_completion_length": constraint.length})
        runs.append((lessons.rating.train, lessons.rating_terms, budget, constraint))
    for n, (examples, terms, settings, constraint) in enumerate(runs):
        output = scratch / str(n)
        model = run_grpo(model, tokenizer, examples, terms, settings, output, constraint, stop)
        ran = read_training(output)
        learned = training.learned or ran.learned
        training = ran.model_copy(update={"learned": learned})
    return model, training


def _train_and_gate(
    registry: Registry,
    parent: Manifest,
    lessons: Lessons,
    grpo: GrpoSettings,
    settings: Settings,
    force: bool = False,
    stop: threading.Event | None = None,
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase, Training, Gate | None]:
    """GRPO from the parent's weights, ranking then rating; both models answer the held-out
    lists and ratings for the gate. Once `stop` is set, `Stopped` at the end of the GRPO step
    under way, before the gate when training is over, or between the gate's two models.

    A large parent trains LoRA adapters instead of all weights (an adapter parent goes on
    training its own). No gate (None) when GRPO had nothing to learn from: publishing would copy
    the parent.
    """
    tokenizer = AutoTokenizer.from_pretrained(registry.path(base_version(parent)))
    if parent.chat_template:
        lessons = lessons.in_chat(tokenizer)
    device = select_device(settings.train_device)
    active = load_version(registry, parent).to(device)  # stays as it serves, for the gate
    if parent.kind == "lora":
        candidate = load_version(registry, parent, trainable=True).to(device)
    else:
        candidate = copy.deepcopy(active)
        if refreshed_with_lora(settings, registry.path(parent.version)):
            grpo = grpo.model_copy(update={"lora_rank": settings.refresh_lora_rank})
    stop = stop or threading.Event()
    with tempfile.TemporaryDirectory(prefix="reasonrec-refresh-") as scratch:
        candidate, training = _train(candidate, tokenizer, lessons, grpo, Path(scratch), stop)
    if stop.is_set():
        raise Stopped("stopped before the gate")
    training.lora_rank = lora_rank(candidate)
    if not training.learned:
        return candidate, tokenizer, training, None
    active_scores = _scores(active, tokenizer, lessons, settings)
    if stop.is_set():  # scoring both models may take minutes: a pod's grace period is shorter
        raise Stopped("stopped at the gate")
    gate = refresh_gate(
        active_scores, _scores(candidate, tokenizer, lessons, settings), settings, force
    )
    return candidate, tokenizer, training, gate


def lora_rank(model: PreTrainedModel | PeftModel) -> int | None:
    return model.peft_config["default"].r if isinstance(model, PeftModel) else None


def _record(gate: Gate | None, reward_mean: float | None) -> None:
    if reward_mean is not None:
        metrics.REWARD_MEAN.set(reward_mean)
    if gate is None or "ndcg@10" not in gate.candidate:
        return
    metrics.GATE_NDCG.labels("active").set(gate.active["ndcg@10"])
    metrics.GATE_NDCG.labels("candidate").set(gate.candidate["ndcg@10"])


def child_manifest(
    parent: Manifest, adapter: bool, policy: dict, result: RefreshResult
) -> Manifest:
    """What a refresh publishes of its candidate (`result`, gated) trained from `parent`."""
    return validated(parent, result.gate.candidate).model_copy(
        update={
            "version": new_version(),
            "parent": parent.version,
            "kind": "lora" if adapter else "full",
            "base_model": base_version(parent) if adapter else None,
            "created_at": datetime.now(UTC),
            # Live feedback, which may hold an eval split's test interactions: the parent's
            # `trained_on` would let `reasonrec eval --model` score it on them.
            "trained_on": None,
            "training": {
                "method": REFRESH_METHOD,
                "train_examples": result.train_examples,
                "fresh_examples": result.fresh_examples,
                "holdout_examples": result.holdout_examples,
                "rating_examples": result.rating_examples,
                "rating_holdout_examples": result.rating_holdout_examples,
                "reward_mean": result.reward_mean,
                "lora_rank": result.lora_rank,
            },
            "reward_weights": policy["weights"],
            "policy": policy,
        }
    )
