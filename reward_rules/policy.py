"""The business policy: which reward terms train the model, with what weights, and the hard
constraints every served list obeys. One file is the source of truth for both loops: the trainer
builds its reward terms from it (`build_terms`) and the gateway passes each answer through
`apply_constraints`.

A policy is YAML, validated by the pydantic model `Policy`; `parse_policy` / `load_policy` report
every problem with the line it is on. How facts are read from an item (what "promoted" and
"available" mean) is part of the policy too, see `item_facts`. Pure: no I/O beyond
`load_policy` reading the one file it is given.
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from contract.tasks import Task
from reward_rules.terms import TERMS, Catalog, Term, split_at_category_cap

DEFAULT_WEIGHTS: dict[str, float] = {
    "format": 1.0,
    "accuracy": 1.0,
    "diversity": 0.2,
    "novelty": 0.1,
}
"""The weights used before policy files existed; `DEFAULT_POLICY` keeps them."""
DEFAULT_RATING_WEIGHTS: dict[str, float] = {"rating_format": 1.0, "rating_accuracy": 1.0}
"""METHODS.md §2's reward: format and accuracy summed, in [-1, 2]."""


def _term_of(task: Task):
    def known(name: str) -> str:
        names = [n for n, cls in TERMS.items() if cls.task is task]
        if name not in names:
            raise ValueError(f"unknown {task} term {name!r}; known terms: {', '.join(names)}")
        return name

    return AfterValidator(known)


TermName = Annotated[str, _term_of(Task.rank)]
RatingTermName = Annotated[str, _term_of(Task.rate)]


def _number(value: object) -> object:
    """YAML reads `yes`, `on` and `true` as booleans, which pydantic would take as 1."""
    if isinstance(value, bool):
        raise ValueError("a number is needed here, not true or false")
    return value


Weight = Annotated[float, BeforeValidator(_number), Field(ge=0.0, allow_inf_nan=False)]
Boost = Annotated[float, BeforeValidator(_number), Field(ge=0.0, le=10.0, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class FactNames(BaseModel):
    """Which item attribute marks an item promoted or unavailable (section `attributes`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    promoted: Name = Field(
        "promoted",
        description="An item is promoted when its `promoted` field is true or this attribute is "
        "truthy.",
    )
    available: Name = Field(
        "available",
        description="An item is unavailable when its `available` field is false or this "
        "attribute is present and not truthy.",
    )


class Constraints(BaseModel):
    """Hard constraints the gateway applies to every served list (section `constraints`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exclude_unavailable: bool = Field(True, description="Never serve an unavailable item.")
    max_per_category: Annotated[int, BeforeValidator(_number)] | None = Field(
        None, ge=1, description="At most this many items of one category per list; null = no cap."
    )
    boost: dict[Name, Boost] = Field(
        default_factory=dict,
        description="Fact or attribute name -> boost (0-10); boost b moves an item up b*k places.",
    )
    item_boost: Boost = Field(
        0.0,
        description="Each item's own `boost` field is multiplied by this and added to its boost.",
    )


class Policy(BaseModel):
    """A business policy. Fields are checked as a policy file is read; see docs/training.md,
    "Business policy", for the file format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Declared before `weights` so that the weights' validator can see them.
    constraints: Constraints = Field(default_factory=Constraints)
    attributes: FactNames = Field(default_factory=FactNames)
    weights: dict[TermName, Weight] = Field(
        default_factory=lambda: dict(DEFAULT_WEIGHTS),
        description="Ranking reward term -> weight (>= 0). Replaces the default weights as a "
        "whole: a term left out has weight 0.",
    )
    rating_weights: dict[RatingTermName, Weight] = Field(
        default_factory=lambda: dict(DEFAULT_RATING_WEIGHTS),
        description="Rating reward term -> weight (>= 0), for models trained to rate; replaces "
        "the defaults as a whole.",
    )

    @field_validator("weights", "rating_weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        if not any(weights.values()):
            raise ValueError("at least one weight must be positive, or training has no reward")
        constraints = info.data.get("constraints")
        if weights.get("category_cap") and constraints and constraints.max_per_category is None:
            raise ValueError("category_cap needs constraints.max_per_category")
        return weights

    def summary(self) -> str:
        """One line: the positive weights and the constraints in force.

        >>> Policy(weights={"format": 1}, constraints={"boost": {"new": 1}}).summary()
        'weights format=1; constraints exclude_unavailable boost new=+1'
        """
        weights = " ".join(f"{name}={weight:g}" for name, weight in self.weights.items() if weight)
        c = self.constraints
        rules = ["exclude_unavailable"] if c.exclude_unavailable else []
        if c.max_per_category is not None:
            rules.append(f"max_per_category={c.max_per_category}")
        if c.boost:
            rules.append("boost " + " ".join(f"{n}=+{b:g}" for n, b in c.boost.items()))
        if c.item_boost:
            rules.append(f"item_boost={c.item_boost:g}")
        line = f"weights {weights}; constraints {' '.join(rules) or 'none'}"
        if self.rating_weights != DEFAULT_RATING_WEIGHTS:
            rating = " ".join(f"{n}={w:g}" for n, w in self.rating_weights.items() if w)
            line += f"; rating weights {rating}"
        if self.attributes != FactNames():
            names = self.attributes
            line += f"; attributes promoted={names.promoted} available={names.available}"
        return line


DEFAULT_POLICY = Policy()
"""Today's weights; unavailable items excluded, no category cap, no boosts."""


# --- item facts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemFacts:
    """What the policy needs to know about one item, read by `item_facts`.

    `flags` are the names of the item's truthy attributes (for `boost`); `boost` is the item's own
    boost field; `created_at` is in Unix seconds (None: unknown).
    """

    categories: frozenset[str] = frozenset()
    available: bool = True
    promoted: bool = False
    flags: frozenset[str] = frozenset()
    boost: float = 0.0
    created_at: float | None = None


def truthy(value: Any) -> bool:
    """How an attribute value reads as a yes/no: true, a non-zero number, or the strings "true",
    "yes" or "1" (any case; catalogs imported from CSV have strings).

    >>> [truthy(v) for v in (True, 1, 0.5, "Yes", False, 0, "no", "", None)]
    [True, True, True, True, False, False, False, False, False]
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        return value.strip().lower() in {"true", "yes", "1"}
    return False


def _seconds(value: datetime | float | None) -> float | None:
    if value is None:
        return None
    return value.timestamp() if isinstance(value, datetime) else float(value)


def item_facts(item: Any, policy: Policy = DEFAULT_POLICY) -> ItemFacts:
    """The facts of an item (a `server.schemas.Item` or any object with some of its fields:
    `categories`, `attributes`, `available`, `promoted`, `boost`, `created_at`; missing = default).

    Promoted: the `promoted` field is true, or the attribute named by `policy.attributes.promoted`
    (default `promoted`) is truthy. Available: the `available` field is true (or absent) and the
    attribute named by `policy.attributes.available` (default `available`) is absent or truthy.

    >>> from types import SimpleNamespace as Item
    >>> facts = item_facts(Item(categories=["Shoes"], attributes={"promoted": "yes", "stock": 0}))
    >>> facts.promoted, facts.available, sorted(facts.flags)
    (True, True, ['promoted'])
    >>> stock = Policy(attributes={"available": "in_stock"})
    >>> item_facts(Item(attributes={"in_stock": 0}), stock).available
    False
    """
    attributes: Mapping[str, Any] = getattr(item, "attributes", None) or {}
    names = policy.attributes
    available = bool(getattr(item, "available", True))
    if names.available in attributes:
        available = available and truthy(attributes[names.available])
    promoted = bool(getattr(item, "promoted", False)) or truthy(attributes.get(names.promoted))
    return ItemFacts(
        categories=frozenset(getattr(item, "categories", None) or ()),
        available=available,
        promoted=promoted,
        flags=frozenset(name for name, value in attributes.items() if truthy(value)),
        boost=float(getattr(item, "boost", 0.0) or 0.0),
        created_at=_seconds(getattr(item, "created_at", None)),
    )


def catalog_facts(items: Iterable[Any], policy: Policy = DEFAULT_POLICY) -> dict[str, ItemFacts]:
    """`item_facts` of each item, by its `item_id`."""
    return {item.item_id: item_facts(item, policy) for item in items}


# --- hard constraints --------------------------------------------------------------------------

_UNKNOWN = ItemFacts()


def boost_of(facts: ItemFacts, policy: Policy) -> float:
    """The item's total boost: the sum of `constraints.boost[name]` over the names that hold for
    it, plus `constraints.item_boost` times its own boost field. The names `promoted` and
    `available` mean the item's facts (as `item_facts` read them); any other name means an
    attribute of that name that is truthy.

    >>> policy = Policy(constraints={"boost": {"promoted": 0.5, "new": 0.25}})
    >>> boost_of(ItemFacts(promoted=True, flags=frozenset({"new"})), policy)
    0.75
    """
    constraints = policy.constraints
    facts_by_name = {"promoted": facts.promoted, "available": facts.available}
    total = constraints.item_boost * facts.boost
    for name, boost in constraints.boost.items():
        if facts_by_name.get(name, name in facts.flags):
            total += boost
    return total


def apply_constraints(
    ranked: Sequence[str], facts: Mapping[str, ItemFacts], k: int, policy: Policy
) -> list[str]:
    """The list to serve: the policy's hard constraints applied to `ranked` (best first).

    1. Repeated ids are dropped (the first stays). Ids without facts are taken as available items
       without categories, boost or flags (the gateway only passes catalog items).
    2. With `exclude_unavailable`, unavailable items are dropped: never served, not even to fill k.
    3. Boosts re-rank what is left: the item at position i (from 0) is sorted by i - b * k, where
       b is its total boost (`boost_of`); on a tie the larger boost goes first, then the earlier
       item. So a boost of 1 moves an item up a whole page of k places (past unboosted items),
       0.5 half a page, and items with equal boosts keep their relative order.
    4. `max_per_category`: walking the re-ranked list, an item that would put a category over the
       cap is skipped and later items backfill its place (`split_at_category_cap`). If that leaves
       fewer than k items, the skipped ones are appended in order: the cap gives way rather than
       serving a short list. When each item has at most one category, the cap is met whenever the
       candidates allow it; the walk is greedy, so with items in several categories another
       choice could sometimes fit the cap where it does not.

    The result has min(k, number of servable distinct ids) ids, each from `ranked`.

    >>> facts = {
    ...     "a": ItemFacts(categories=frozenset({"Drama"})),
    ...     "b": ItemFacts(categories=frozenset({"Drama"})),
    ...     "c": ItemFacts(available=False),
    ...     "d": ItemFacts(categories=frozenset({"Comedy"}), promoted=True),
    ... }
    >>> policy = Policy(constraints={"max_per_category": 1, "boost": {"promoted": 0.5}})
    >>> apply_constraints(["a", "b", "c", "d"], facts, 2, policy)  # d up 1 place; b over the cap
    ['a', 'd']
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    constraints = policy.constraints
    order = list(dict.fromkeys(ranked))
    if constraints.exclude_unavailable:
        order = [item for item in order if facts.get(item, _UNKNOWN).available]
    boosts = [boost_of(facts.get(item, _UNKNOWN), policy) for item in order]
    if any(boosts):
        positions = sorted(range(len(order)), key=lambda i: (i - boosts[i] * k, -boosts[i]))
        order = [order[i] for i in positions]
    categories = {item: facts.get(item, _UNKNOWN).categories for item in order}
    kept, skipped = split_at_category_cap(order, categories, constraints.max_per_category)
    return (kept + skipped)[:k]


# --- reward terms ------------------------------------------------------------------------------


def build_terms(
    policy: Policy,
    facts: Mapping[str, ItemFacts],
    popularity: Mapping[str, int],
    task: Task = Task.rank,
) -> list[tuple[Term, float]]:
    """(term, weight) for each of `task`'s terms with a positive weight, in the policy's order,
    built from the same item facts the gateway uses. `popularity` counts training interactions per
    item (for novelty).
    """
    catalog = Catalog(
        categories={i: f.categories for i, f in facts.items()},
        promoted=frozenset(i for i, f in facts.items() if f.promoted),
        unavailable=frozenset(i for i, f in facts.items() if not f.available),
        created_at={i: f.created_at for i, f in facts.items() if f.created_at is not None},
        popularity=popularity,
        max_per_category=policy.constraints.max_per_category,
    )
    return [
        (TERMS[name].build(catalog), weight)
        for name, weight in (policy.rating_weights if task is Task.rate else policy.weights).items()
        if weight
    ]


# --- reading policy files ----------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    line: int
    message: str


class PolicyError(ValueError):
    """Every problem found in a policy file; `str()` gives one `SOURCE:LINE: message` per line."""

    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source = source
        self.problems = list(problems)
        super().__init__(self.lines())

    def lines(self) -> list[str]:
        return [f"{self.source}:{p.line}: {p.message}" for p in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _line_of(root: yaml.Node, loc: tuple[int | str, ...]) -> int:
    """The line (from 1) of the deepest node on pydantic's error path `loc` that the file has.

    A mapping member is found by its key, and its key's line is the answer (for `[key]` errors,
    and for a value on the key's line). A path leaving the file (a missing field) stops at the
    last node that exists: the section the field belongs in.
    """
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            # YAML keeps the last of equal keys, so the last is the one validated
            match = next((kv for kv in reversed(node.value) if kv[0].value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


_CONTAINS_ITSELF = "an alias refers to what contains it"


def _structure_problems(root: yaml.Node) -> list[Problem]:
    """Keys given twice (YAML keeps the last without a word; in a policy that is a mistake) and
    aliases to a mapping or list they are inside of (a structure that contains itself). Each node
    is walked once: aliases nested in aliases would otherwise multiply the walk by every level."""
    problems: list[Problem] = []
    done: set[int] = set()

    def walk(node: yaml.Node, within: frozenset[int]) -> None:
        if id(node) in within:
            problems.append(Problem(node.start_mark.line + 1, _CONTAINS_ITSELF))
            return
        if id(node) in done:
            return
        done.add(id(node))
        within |= {id(node)}
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        problems.append(
                            Problem(key.start_mark.line + 1, f"{key.value!r} is given twice")
                        )
                    seen.add(key.value)
                walk(value, within)
        elif isinstance(node, yaml.SequenceNode):
            for child in node.value:
                walk(child, within)

    walk(root, frozenset())
    return problems


def _message(error: Mapping[str, Any]) -> str:
    loc = [str(part) or "''" for part in error["loc"] if part != "[key]"]
    where = ".".join(loc)
    text = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    if error["type"] == "extra_forbidden":
        text = "unknown field"
    return f"{where}: {text}" if where else text


class _UnreadableTag(Exception):
    def __init__(self, node: yaml.ScalarNode):
        super().__init__(f"{node.value!r} cannot be read as {node.tag.rsplit(':', 1)[-1]}")
        self.line = node.start_mark.line + 1


def _read_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for lines) and its value. Raises what PyYAML raises, and
    _UnreadableTag for a scalar its tag does not fit (`!!float abc`, a date `2024-02-30`), which
    PyYAML reports as a bare ValueError or KeyError with no line."""
    loader = yaml.SafeLoader(text)  # checks the characters already
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        for node in _scalars(root):
            if node.tag != "tag:yaml.org,2002:str":  # `2024-02-30` resolves as a date, and fails
                try:
                    loader.construct_object(node)
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise _UnreadableTag(node) from exc
        return root, loader.construct_document(root)
    finally:
        loader.dispose()


def _scalars(root: yaml.Node) -> Iterator[yaml.ScalarNode]:
    """Every scalar node once (aliases share nodes)."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            yield node
        elif isinstance(node, yaml.MappingNode):
            stack += [part for pair in node.value for part in pair]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse and validate a policy given as YAML text; `source` names it in error messages.

    Raises `PolicyError` listing every problem with its line (from 1).
    """
    try:
        root, data = _read_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PolicyError(source, [Problem(line, f"not valid YAML: {exc.problem}")]) from exc
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        line = text.count("\n", 0, exc.position) + 1
        raise PolicyError(source, [Problem(line, f"not valid YAML: {exc.reason}")]) from exc
    except RecursionError as exc:
        raise PolicyError(source, [Problem(1, "not valid YAML: nested too deeply")]) from exc
    except _UnreadableTag as exc:
        raise PolicyError(source, [Problem(exc.line, f"not valid YAML: {exc}")]) from exc
    if root is None or not isinstance(data, dict):
        line = 1 if root is None else root.start_mark.line + 1
        message = "a policy is a mapping with weights, constraints and/or attributes"
        raise PolicyError(source, [Problem(line, message)])
    problems = _structure_problems(root)
    if any(problem.message == _CONTAINS_ITSELF for problem in problems):
        # validating a structure that contains itself would never end
        raise PolicyError(source, sorted(problems, key=lambda p: p.line))
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        problems += [Problem(_line_of(root, e["loc"]), _message(e)) for e in exc.errors()]
    if problems:
        raise PolicyError(source, sorted(problems, key=lambda p: p.line))
    return policy


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at `path` (`PolicyError` names the file in each line)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(str(path), [Problem(1, "not UTF-8 text")]) from exc
    except OSError as exc:  # missing, a folder, not readable
        raise PolicyError(str(path), [Problem(1, f"cannot be read: {exc.strerror}")]) from exc
    return parse_policy(text, str(path))
