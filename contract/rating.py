"""The rating task's contract (RecZero / RecOne): how a model is asked to rate an item and how its
think-before-recommend answer is read.

Inputs, as METHODS.md §2 lists them: the user's recent rated items with their ratings, the
user's mean rating, the item's attributes and its mean rating. Two renderings, as for ranking:

- `compact`, for the embedded model (every item is one token):

      age=24 gender=F
      #12=4, #7=5, #301=3
      user mean=3.6 n=57 lean=+0.4
      item #55 mean=3.2 n=120

- `rich`, for pretrained LMs: the same facts in English, items with their titles and categories.

Answer, both renderings: four tagged steps in this order, each non-empty, the last a whole
number from 1 to 5:

    <user>what this user likes</user><item>the item's strong and weak points for them</item>
    <match>how well they fit</match><rating>4</rating>

`rating_pattern` is the grammar the gateway serves with; `parse_rating` never raises.
"""

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from contract.prompt import (
    MAX_CHAR_BYTES,
    SEPARATOR,
    VISIBLE,
    ItemView,
    Rendering,
    compact_profile,
    item_line,
    profile_line,
    ref,
)

STEPS = ("user", "item", "match")
RATING_TAG = "<rating>"
TAGS = tuple(f"<{name}>" for name in (*STEPS, "rating")) + tuple(
    f"</{name}>" for name in (*STEPS, "rating")
)
MIN_RATING, MAX_RATING = 1, 5
DIGITS = tuple(str(value) for value in range(MIN_RATING, MAX_RATING + 1))

# A reasoning step's length at most: the compact rendering's steps are numbers, and a cap keeps a
# weak model's greedy answer from running on until the token budget cuts its rating off.
STEP_CHARS = {Rendering.compact: 16, Rendering.rich: 160}
MAX_ITEMS = 50  # per request: a product page or a short list, not a catalog

RATE_INSTRUCTIONS = (
    "You are a recommender. Predict how this user will rate the item, from 1 (hated it) to "
    "5 (loved it). Think before you rate."
)
RATE_FORMAT = (
    "Answer as <user>what this user likes</user><item>the item's strong and weak points for "
    "them</item><match>how well they fit</match><rating>one whole number from 1 to 5</rating>."
)
_STEP = r"\s*<{0}>([^<>]*)</{0}>"
_ANSWER = re.compile(
    "^" + "".join(_STEP.format(name) for name in STEPS) + r"\s*<rating>\s*([^<>]*?)\s*</rating>\s*$"
)
_NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?$")


def on_scale(value: float) -> float:
    """`value` clipped to the rating scale [MIN_RATING, MAX_RATING]."""
    return min(max(value, MIN_RATING), MAX_RATING)


class RatedView(BaseModel):
    item: ItemView
    rating: float


class Stats(BaseModel):
    """A mean rating and how many ratings it is over (0: none yet)."""

    mean: float | None = None
    count: int = Field(0, ge=0)

    @classmethod
    def of(cls, total: float, count: int) -> "Stats":
        return cls(mean=total / count, count=count) if count > 0 else cls()


# Shrinkage of the bias baseline (Koren, "Factor in the neighbors", 2008): an item's or a user's
# mean moves away from the global one only as its ratings add up.
ITEM_SHRINK = 25.0
USER_SHRINK = 10.0
NO_RATINGS_MEAN = 3.0  # the scale's middle, for a store that holds no rating yet


def item_bias(item: Stats, mean: float) -> float:
    if item.mean is None:
        return 0.0
    return item.count * (item.mean - mean) / (item.count + ITEM_SHRINK)


def bias_rating(everyone: Stats, item: Stats, user_ratings: Sequence[tuple[float, Stats]]) -> float:
    """The baseline prediction, regularised user + item biases, clipped to [1, 5].

    `everyone`: every rating; `item`: the rated item's; `user_ratings`: the user's ratings, each
    with its item's stats. One pass: item biases first, the user's from what they leave.
    """
    mean = NO_RATINGS_MEAN if everyone.mean is None else everyone.mean
    residual = sum(value - mean - item_bias(stats, mean) for value, stats in user_ratings)
    user = residual / (len(user_ratings) + USER_SHRINK)
    return on_scale(mean + user + item_bias(item, mean))


# The user's lean: how far their latest ratings sit above (+) or below (-) what the bias model
# expects of those items, the newest weighted most. Ratings come in sessions and moods: on
# ML-100K's split a user's last rating follows their latest few far more than their all-time
# mean (item bias plus this lean, as a predictor alone: RMSE 0.968, against 1.039 for the bias
# baseline). Half-life and shrinkage were chosen on that split's training ratings.
LEAN_WINDOW = 10  # ratings; older ones weigh under 4% of the newest
LEAN_HALF_LIFE = 2.0  # ratings
LEAN_SHRINK = 1.0


def user_lean(everyone: Stats, latest: Sequence[tuple[float, Stats]]) -> float | None:
    """The user's lean from `latest`, their ratings oldest first, each with its item's stats;
    None when there are none."""
    window = latest[-LEAN_WINDOW:]
    if not window:
        return None
    mean = NO_RATINGS_MEAN if everyone.mean is None else everyone.mean
    weights = [0.5 ** ((len(window) - 1 - k) / LEAN_HALF_LIFE) for k in range(len(window))]
    residuals = [value - mean - item_bias(stats, mean) for value, stats in window]
    weighted = sum(w * r for w, r in zip(weights, residuals, strict=True))
    return weighted / (sum(weights) + LEAN_SHRINK)


def lean_rating(everyone: Stats, item: Stats, lean: float | None) -> float:
    """The lean baseline: the global mean, the item's bias and the user's `lean` (`user_lean`;
    None: no ratings), clipped to [1, 5]. What the rating prompt's numbers predict with no model,
    and what the gateway serves when the model cannot answer."""
    mean = NO_RATINGS_MEAN if everyone.mean is None else everyone.mean
    value = mean + (lean or 0.0) + item_bias(item, mean)
    return on_scale(value)


# The weights validation may give the model's rating against the lean baseline's; never 0, so
# the model always has a say. Ratings are noisy and two predictors err differently: measured on
# ML-100K, the mix predicts better than either alone.
RATING_WEIGHTS = (0.25, 0.5, 0.75, 1.0)


def served_rating(model: float, baseline: float, weight: float) -> float:
    """What the gateway serves: the model's rating mixed with the lean baseline's (`lean_rating`,
    also what it serves without a model)."""
    return weight * model + (1 - weight) * baseline


class RatingInput(BaseModel):
    profile: dict[str, str | int | float | bool] = Field(default_factory=dict)
    history: list[RatedView] = Field(default_factory=list, description="Oldest first.")
    user: Stats = Field(default_factory=Stats)
    item: ItemView
    item_stats: Stats = Field(default_factory=Stats)
    lean: float | None = Field(None, description="The user's lean (`user_lean`); None: no ratings.")


@dataclass(frozen=True)
class RatingAnswer:
    """One rating completion, as parsed: the three reasoning steps and the rating (None when it
    is not a number in [1, 5]). `well_formed`: every tag once, in order, each step non-empty,
    and the rating a number in [1, 5]."""

    steps: tuple[str, ...]
    rating: float | None
    well_formed: bool


def rating_input(
    profile: dict,
    history: Sequence[tuple[object, float]],
    user: Stats,
    item: object,
    item_stats: Stats,
    shown: int,
    lean: float | None = None,
) -> RatingInput:
    """What the prompt shows: the last `shown` of `history` ((item, rating), oldest first)."""
    recent = history[-shown:] if shown else []
    return RatingInput(
        profile=profile,
        history=[RatedView(item=_view(i), rating=rating) for i, rating in recent],
        user=user,
        item=_view(item),
        item_stats=item_stats,
        lean=lean,
    )


def _view(item: object) -> ItemView:
    return ItemView.model_validate(item, from_attributes=True)


def number(value: float) -> str:
    """A rating as prompts write it: a whole number as one ("4"), else one decimal ("3.5")."""
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _stats(stats: Stats) -> str:
    return "mean=none n=0" if stats.mean is None else f"mean={stats.mean:.1f} n={stats.count}"


def _lean(value: float | None) -> str:
    return "none" if value is None else f"{value:+.1f}"


def _compact(data: RatingInput) -> str:
    history = SEPARATOR.join(f"{ref(e.item.item_id)}={number(e.rating)}" for e in data.history)
    return (
        f"{compact_profile(data.profile)}\n{history}\n"
        f"user {_stats(data.user)} lean={_lean(data.lean)}\n"
        f"item {ref(data.item.item_id)} {_stats(data.item_stats)}\n"
    )


def _average(stats: Stats, who: str) -> str:
    if stats.mean is None:
        return f"{who}: no ratings yet."
    return f"{who}: {stats.mean:.1f} on average over {stats.count} ratings."


def _rich(data: RatingInput) -> str:
    lines = [RATE_INSTRUCTIONS, RATE_FORMAT, "", profile_line(data.profile)]
    lines.append(_average(data.user, "The user rates"))
    if data.lean is not None:
        side = "above" if data.lean >= 0 else "below"
        lines.append(f"Lately they rate {abs(data.lean):.1f} {side} what others give such items.")
    if data.history:
        lines.append("Recent ratings, oldest first:")
        lines += [f"- {item_line(e.item)} | rated {number(e.rating)}" for e in data.history]
    else:
        lines.append("Recent ratings: none.")
    lines += ["Item to rate:", item_line(data.item), _average(data.item_stats, "Others rate it")]
    lines.append("")
    return "\n".join(lines)


def build_rating_prompt(data: RatingInput, rendering: Rendering = Rendering.rich) -> str:
    return _compact(data) if rendering is Rendering.compact else _rich(data)


def _clean(text: str, limit: int) -> str:
    return " ".join(re.sub(r"[<>]", "", text).split())[:limit].strip() or "-"


def render_rating_answer(
    steps: Sequence[str], rating: float, rendering: Rendering = Rendering.rich
) -> str:
    """The text a model should produce (SFT targets are written with it)."""
    limit = STEP_CHARS[rendering]
    parts = [
        f"<{name}>{_clean(text, limit)}</{name}>" for name, text in zip(STEPS, steps, strict=True)
    ]
    return "".join(parts) + f"<rating>{number(rating)}</rating>"


def rating_pattern(rendering: Rendering = Rendering.rich) -> str:
    """A regex that only admits well-formed answers with a whole-number rating and steps of at
    most STEP_CHARS characters; given to vLLM's structured outputs. A step starts with a visible
    character, so none is blank."""
    body = f"{VISIBLE}[^<>]{{0,{STEP_CHARS[rendering] - 1}}}"
    steps = "".join(f"<{name}>{body}</{name}>" for name in STEPS)
    return steps + f"<rating>[{''.join(DIGITS)}]</rating>"


def rating_answer_budget(rendering: Rendering) -> int:
    """Tokens that hold any answer of `rating_pattern` (at most one a byte), plus the end of
    sequence: a rich answer's 480 characters of steps overran the ranking answer's budget."""
    tags = sum(len(f"<{name}></{name}>") for name in (*STEPS, "rating"))
    return tags + len(STEPS) * STEP_CHARS[rendering] * MAX_CHAR_BYTES + 1 + 1


def parse_rating(text: str) -> RatingAnswer:
    match = _ANSWER.match(text)
    if match is None:
        return RatingAnswer(steps=(), rating=None, well_formed=False)
    steps = tuple(part.strip() for part in match.groups()[: len(STEPS)])
    raw = match.group(len(STEPS) + 1)
    rating = float(raw) if _NUMBER.match(raw) else None
    if rating is not None and not MIN_RATING <= rating <= MAX_RATING:
        rating = None
    return RatingAnswer(steps=steps, rating=rating, well_formed=all(steps) and rating is not None)


def expected_rating(logprobs: dict[str, float]) -> float | None:
    """The mean of the model's distribution over the five ratings, from one step's
    log-probabilities (text -> logprob); None when no rating is among them.

    The served rating: a model unsure between 3 and 4 predicts about 3.5, which a written
    whole number cannot say (and which MAE and RMSE reward).
    """
    weights = dict.fromkeys(range(MIN_RATING, MAX_RATING + 1), 0.0)
    for text, lp in logprobs.items():
        # Summed: "4" and " 4" are two tokens of one rating (one overwrote the other).
        if text.strip() in DIGITS and math.isfinite(lp):
            weights[int(text.strip())] += math.exp(min(lp, 0.0))  # above 0 is no probability
    total = sum(weights.values())
    if not total:
        return None
    return sum(value * weight for value, weight in weights.items()) / total
