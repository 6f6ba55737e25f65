"""RecZero and RecOne (METHODS.md §2): teach a model to rate with a think-before-recommend answer.

Examples come from the rating events: at position t of a user's ratings the prompt shows what
came before (their latest ratings, their mean) and the item at t (its mean over everyone else's
ratings), and the true rating is the target. Each user's last rating is held out for validation.

Recipes, both ending in GRPO with TRL's GRPOTrainer and the policy's `rating_weights`:

- `zero` (RecZero): GRPO straight from the base model; the embedded model's base is the
  item-sequence-pretrained one, sampled under the rating grammar (`trainer.constrained`).
- `one` (RecOne): SFT on reasoning samples composed from the data (what the user rates highly,
  the item's strong and weak points for them, how their ratings of such items compare with their
  mean), then the same GRPO.

Validation decodes greedily under the same grammar and predicts the mean of the model's
distribution over the five ratings, as the gateway does (`contract.rating.expected_rating`); it
chooses how much of the served rating is the model's and how much the lean baseline's
(`rating_weight`; `contract.rating.lean_rating`, the gateway's fallback), and scores MAE and RMSE
against that baseline on the same held-out ratings.
"""

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from contract.prompt import ItemView, Rendering
from contract.rating import (
    DIGITS,
    LEAN_WINDOW,
    RATING_WEIGHTS,
    STEP_CHARS,
    RatingInput,
    Stats,
    build_rating_prompt,
    expected_rating,
    lean_rating,
    on_scale,
    rating_input,
    render_rating_answer,
    served_rating,
    user_lean,
)
from reward_rules.terms import Term
from trainer.constrained import RatingConstraint, constrained_generation, greedy_after
from trainer.corpus import Corpus, latest_per_item
from trainer.grpo import run_grpo, spread
from trainer.presets import RatingPreset, Recipe
from trainer.sft import run_sft

log = logging.getLogger(__name__)


class RatingExample(BaseModel):
    """One rating prompt, the true rating (the reward's column) and the SFT target."""

    user_id: str
    prompt: str
    rating: float = Field(description="The true rating.")
    baseline: float = Field(
        description="The lean baseline's prediction from the same data (the gateway's fallback)."
    )
    target: str = Field(description="The SFT completion: composed reasoning, the true rating.")


class RatingExamples(BaseModel):
    rendering: Rendering = Field(description="How their prompts and answers are written.")
    train: list[RatingExample]
    validation: list[RatingExample]


Rated = Sequence[tuple[Any, float]]
"""(item, rating), oldest first; an item is anything with `categories`."""


def _liked(history: Rated, mean: float) -> list[str]:
    counts = Counter(c for item, rating in history if rating > mean for c in item.categories)
    return [category for category, _ in counts.most_common(2)]


def _by_category(history: Rated) -> dict[str, list[float]]:
    ratings: dict[str, list[float]] = defaultdict(list)
    for item, rating in history:
        for category in item.categories:
            ratings[category].append(rating)
    return ratings


def compose_steps(
    history: Rated,
    item: ItemView,
    item_stats: Stats,
    rendering: Rendering,
) -> list[str]:
    """The three reasoning steps, grounded in the data (no teacher model): the user's mean and
    favourite categories; which of the item's categories they rate above or below their mean;
    how their ratings of items sharing a category compare with their mean."""
    mean = sum(r for _, r in history) / len(history) if history else None
    by_category = _by_category(history)
    shared = [r for c in item.categories for r in by_category.get(c, [])]
    fit = None if mean is None or not shared else sum(shared) / len(shared) - mean
    if rendering is Rendering.compact:
        return [
            "new" if mean is None else f"{mean:.1f}",
            "new" if item_stats.mean is None else f"{item_stats.mean:.1f}",
            "none" if fit is None else f"{fit:+.1f}",
        ]
    strong = [c for c in item.categories if mean is not None and _mean(by_category.get(c)) > mean]
    weak = [c for c in item.categories if c not in strong]
    liked = _liked(history, mean) if mean is not None else []
    return [
        "New user: nothing rated yet."
        if mean is None
        else f"Rates {mean:.1f} on average; likes {' and '.join(liked) or 'a bit of everything'}.",
        (f"Others rate it {item_stats.mean:.1f}. " if item_stats.mean is not None else "")
        + f"Strong for them: {', '.join(strong) or 'nothing in particular'}. "
        + f"Weak: {', '.join(weak) or 'nothing in particular'}.",
        "Nothing like it rated yet."
        if fit is None
        else f"They rate such items {abs(fit):.1f} {'above' if fit >= 0 else 'below'} their mean.",
    ]


def _mean(values: list[float] | None) -> float:
    return sum(values) / len(values) if values else -math.inf


def _whole(rating: float, up: bool) -> int:
    """The rating in whole stars, as the answer writes it. A half star goes up or down by `up`,
    which alternates between examples: the model's expected rating, which is served, then
    learns the half (`round` sent 2.5 and 4.5 down, 1.5 and 3.5 up)."""
    return int(on_scale(math.floor(rating + 0.5) if up else math.ceil(rating - 0.5)))


class RatingExampleBuilder:
    def __init__(self, corpus: Corpus, rendering: Rendering, history: int):
        self.corpus, self.rendering, self.history = corpus, rendering, history
        totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for ratings in corpus.ratings.values():
            for item, value in ratings:
                totals[item][0] += value
                totals[item][1] += 1
        self.totals = totals
        everything = [v for ratings in corpus.ratings.values() for _, v in ratings]
        self.everyone = (sum(everything), len(everything))

    def _without(self, item: str, value: float) -> Stats:
        """The item's stats over everyone else's ratings (its own is the answer)."""
        total, count = self.totals.get(item, (0.0, 0))
        return Stats.of(total - value, count - 1)

    def example(self, user_id: str, t: int) -> RatingExample:
        ratings = self.corpus.ratings[user_id]
        items = self.corpus.items
        item_id, value = ratings[t]
        rated = latest_per_item(ratings[:t])
        before = [(items[i], r) for i, r in rated]
        user = Stats.of(sum(r for _, r in before), len(before))
        item_stats = self._without(item_id, value)
        everyone = Stats.of(self.everyone[0] - value, self.everyone[1] - 1)
        latest = [(r, Stats.of(*self.totals[i])) for i, r in rated[-LEAN_WINDOW:]]
        lean = user_lean(everyone, latest)
        data: RatingInput = rating_input(
            self.corpus.profiles.get(user_id, {}),
            before,
            user,
            items[item_id],
            item_stats,
            self.history,
            lean,
        )
        steps = compose_steps(before, data.item, item_stats, self.rendering)
        return RatingExample(
            user_id=user_id,
            prompt=build_rating_prompt(data, self.rendering),
            rating=value,
            baseline=lean_rating(everyone, item_stats, lean),
            target=render_rating_answer(steps, _whole(value, up=t % 2 == 1), self.rendering),
        )

    def recent(self, users: int, holdout: float) -> RatingExamples:
        """The latest rating of the `users` who rated most recently, given everything before it
        (what a refresh learns from: the rating feedback that arrived); the newest `holdout`
        share is held out for the gate."""
        rated = [u for u, ratings in self.corpus.ratings.items() if len(ratings) >= 2]
        newest = sorted(rated, key=lambda u: self.corpus.rated_at.get(u, 0.0))[-users:]
        examples = [self.example(u, len(self.corpus.ratings[u]) - 1) for u in newest]
        cut = len(examples) - max(1, round(holdout * len(examples)))
        return RatingExamples(
            rendering=self.rendering, train=examples[:cut], validation=examples[cut:]
        )

    def build(self, count: int, validation_users: int, seed: int) -> RatingExamples:
        """`count` training positions (never a user's last rating) and the last rating of up to
        `validation_users` users with at least two."""
        rng = np.random.default_rng(seed)
        ratings = self.corpus.ratings
        eligible = sorted(user for user, rated in ratings.items() if len(rated) >= 2)
        held = rng.choice(len(eligible), size=min(validation_users, len(eligible)), replace=False)
        validation = [self.example(eligible[i], len(ratings[eligible[i]]) - 1) for i in held]
        pool = [(u, t) for u, rated in ratings.items() for t in range(len(rated) - 1)]
        picked = rng.choice(len(pool), size=min(count, len(pool)), replace=False) if pool else []
        train = [self.example(*pool[i]) for i in sorted(picked)]
        log.info(
            "rating examples built", extra={"train": len(train), "validation": len(validation)}
        )
        return RatingExamples(rendering=self.rendering, train=train, validation=validation)


def expected(constraint: RatingConstraint, scores: torch.Tensor | None) -> float | None:
    """The mean of the model's distribution over the five ratings, from the scores of the step
    where it writes one (vLLM's processed log-probabilities, as served); None where it wrote
    none."""
    if scores is None:
        return None
    logprobs = scores.log_softmax(-1)
    digits = zip(DIGITS, constraint.digits, strict=True)
    return expected_rating({digit: float(logprobs[token]) for digit, token in digits})


def errors(predicted: Sequence[float], true: Sequence[float]) -> dict[str, float]:
    diffs = [p - t for p, t in zip(predicted, true, strict=True)]
    if not diffs:
        return {"mae": math.nan, "rmse": math.nan}
    return {
        "mae": sum(abs(d) for d in diffs) / len(diffs),
        "rmse": math.sqrt(sum(d * d for d in diffs) / len(diffs)),
    }


def validate_rating(
    model, tokenizer, examples: Sequence[RatingExample], rendering: Rendering
) -> dict[str, float]:
    """The model's ratings of held-out ratings, and the served rating's weight chosen on them.

    A failed answer predicts the baseline, as the gateway's fallback would. Reported: the model
    alone (`rate_model_*`), the lean baseline (`rate_baseline_*`), and what the gateway serves
    with the chosen `rating_weight` (`rate_mae`, `rate_rmse`; chosen and scored on the same
    ratings, so slightly optimistic when the weight is below 1).
    """
    model.eval()
    constraint = RatingConstraint(tokenizer, STEP_CHARS[rendering])
    prompts = [example.prompt for example in examples]
    with constrained_generation(model, constraint):
        greedy = greedy_after(
            model,
            tokenizer,
            prompts,
            constraint.length,
            constraint.rating[0],
            "validation (rating)",
        )
    ratings = [expected(constraint, scores) for _, scores in greedy]
    failed = sum(rating is None for rating in ratings)
    predicted = [
        example.baseline if rating is None else rating
        for example, rating in zip(examples, ratings, strict=True)
    ]
    true = [e.rating for e in examples]
    baselines = [e.baseline for e in examples]

    def served(weight: float) -> dict[str, float]:
        mixed = [served_rating(m, b, weight) for m, b in zip(predicted, baselines, strict=True)]
        return errors(mixed, true)

    weight = min(RATING_WEIGHTS, key=lambda w: (served(w)["rmse"], -w))
    alone, chosen, baseline = served(1.0), served(weight), errors(baselines, true)
    return {
        "rate_mae": chosen["mae"],
        "rate_rmse": chosen["rmse"],
        "rating_weight": weight,
        "rate_model_mae": alone["mae"],
        "rate_model_rmse": alone["rmse"],
        "rate_baseline_mae": baseline["mae"],
        "rate_baseline_rmse": baseline["rmse"],
        "rate_failed": failed / max(len(examples), 1),
        "rate_validation_ratings": len(examples),
    }


def train_rating(
    model,
    tokenizer,
    examples: RatingExamples,
    preset: RatingPreset,
    recipe: Recipe,
    terms: Sequence[tuple[Term, float]],
    scratch: Path,
    sft: bool = True,
):
    """The recipe's stages; returns the model and what each stage scored on validation.

    `sft=False`: RecOne's SFT already ran (with ranking's, in one model for both tasks).
    """
    stages: dict[str, float] = {}
    constraint = RatingConstraint(tokenizer, STEP_CHARS[examples.rendering])
    if recipe is Recipe.one and sft:
        model = run_sft(model, tokenizer, examples.train, preset.sft)
    stage = "rate_sft_rmse" if recipe is Recipe.one else "rate_base_rmse"
    scores = validate_rating(model, tokenizer, examples.validation, examples.rendering)
    stages[stage] = scores["rate_model_rmse"]
    grpo = preset.grpo if recipe is Recipe.one else preset.zero_grpo
    model = run_grpo(
        model,
        tokenizer,
        spread(examples.train, preset.grpo_examples),
        terms,
        grpo.model_copy(update={"max_completion_length": constraint.length}),
        scratch,
        constraint=constraint,
    )
    return model, stages
