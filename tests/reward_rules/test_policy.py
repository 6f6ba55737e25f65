import doctest
import pickle
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.answer import Answer
from contract.rating import RatingAnswer
from contract.tasks import Task
from reward_rules import policy as policy_module
from reward_rules.policy import (
    DEFAULT_POLICY,
    DEFAULT_WEIGHTS,
    ItemFacts,
    Policy,
    PolicyError,
    apply_constraints,
    boost_of,
    build_terms,
    catalog_facts,
    item_facts,
    load_policy,
    parse_policy,
)
from reward_rules.terms import TERMS, Availability, CategoryCap

ROOT = Path(__file__).resolve().parents[2]
RANK_TERMS = [name for name, cls in TERMS.items() if cls.task is Task.rank]
# A loaded machine must not turn a slow example into a failure.
relaxed = settings(deadline=None)


def facts(
    *cats: str, available: bool = True, promoted: bool = False, flags: tuple[str, ...] = ()
) -> ItemFacts:
    return ItemFacts(
        categories=frozenset(cats),
        available=available,
        promoted=promoted,
        flags=frozenset(flags),
    )


def policy(**constraints: Any) -> Policy:
    return Policy(constraints=constraints)


def test_docstring_examples_hold() -> None:
    assert doctest.testmod(policy_module).failed == 0


class TestPolicyModel:
    def test_default_keeps_the_weights_used_before_policies(self) -> None:
        assert DEFAULT_WEIGHTS == {"format": 1, "accuracy": 1, "diversity": 0.2, "novelty": 0.1}
        assert DEFAULT_POLICY.weights == DEFAULT_WEIGHTS
        assert DEFAULT_POLICY.constraints.exclude_unavailable  # the gateway drops them today
        assert DEFAULT_POLICY.constraints.max_per_category is None
        assert DEFAULT_POLICY.constraints.boost == {}

    def test_shipped_default_file_is_the_default_policy(self) -> None:
        assert load_policy(ROOT / "policies/default.yaml") == DEFAULT_POLICY

    def test_shipped_promotion_policy(self) -> None:
        promote = load_policy(ROOT / "policies/promote.yaml")
        assert promote.weights["promotion"] == 1
        assert promote.constraints.boost == {"promoted": 0.5}
        assert promote.constraints.max_per_category == 3

    def test_docs_document_every_field(self) -> None:
        page = (ROOT / "docs" / "training.md").read_text()
        section = page.split("\n## Business policy\n", 1)[1].split("\n## ", 1)[0]
        fields = []
        for name, info in Policy.model_fields.items():
            nested = getattr(info.annotation, "model_fields", {})
            fields += [f"{name}.{sub}" for sub in nested] or [name]
        assert {"weights", "constraints.boost", "attributes.promoted"} <= set(fields)
        assert [name for name in fields if f"`{name}`" not in section] == []
        assert [name for name in TERMS if f"`{name}`" not in section] == []
        assert "reasonrec policy check" in section

    def test_empty_file_sections_take_defaults(self) -> None:
        assert parse_policy("constraints: {max_per_category: 2}\n").weights == DEFAULT_WEIGHTS

    def test_a_policy_is_immutable(self) -> None:
        with pytest.raises(ValueError, match="frozen"):
            DEFAULT_POLICY.constraints.exclude_unavailable = False  # type: ignore[misc]


class TestParseErrors:
    @pytest.mark.parametrize("where", ["missing.yaml", "."])
    def test_a_file_that_cannot_be_read_is_a_policy_error(self, where: str, tmp_path: Path) -> None:
        with pytest.raises(PolicyError, match="cannot be read"):
            load_policy(tmp_path / where)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            # not YAML: the parser's line
            ("weights:\n  format: 1\n  accuracy: [1\n", [(4, "not valid YAML")]),
            # empty file: nothing to read, line 1
            ("", [(1, "a policy is a mapping")]),
            # a list, not a mapping
            ("# policy\n- format\n", [(2, "a policy is a mapping")]),
            # an unknown term: the line of its key
            ("weights:\n  format: 1\n  promo: 0.3\n", [(3, "unknown rank term 'promo'")]),
            # a negative weight: the line of the term
            ("weights:\n  format: 1\n\n  accuracy: -1\n", [(4, "weights.accuracy")]),
            # a weight that is not a number
            ("weights: {format: one}\n", [(1, "weights.format")]),
            # every weight zero: no reward to train on, reported at `weights`
            ("# x\nweights:\n  format: 0\n", [(2, "at least one weight must be positive")]),
            # category_cap without a cap to reward
            ("weights:\n  category_cap: 1\n", [(1, "needs constraints.max_per_category")]),
            # a cap below 1, inside a nested block
            ("constraints:\n  max_per_category: 0\n", [(2, "max_per_category")]),
            # a boost above 10
            ("constraints:\n  boost:\n    promoted: 11\n", [(3, "constraints.boost.promoted")]),
            # a misspelt field is not silently ignored
            ("constraints:\n  exclude_unavailble: true\n", [(2, "unknown field")]),
            ("wieghts: {format: 1}\n", [(1, "wieghts: unknown field")]),
            # a key given twice: YAML keeps the last silently; we do not
            ("weights:\n  format: 1\n  format: 2\n", [(3, "'format' is given twice")]),
            # an empty attribute name
            ("attributes:\n  promoted: ''\n", [(2, "attributes.promoted")]),
            # an alias to what contains it: a structure without end
            ("&a\nconstraints: *a\n", [(1, "an alias refers to what contains it")]),
            ("weights: &w\n  format: 1\n  again: *w\n", [(1, "refers to what contains it")]),
            # a character YAML does not allow: the line it is on
            ("weights:\n  format: 1\x01\n", [(2, "special characters are not allowed")]),
            ("# \x0c\nweights: {format: 1}\n", [(1, "special characters are not allowed")]),
            # an explicit tag that does not fit its value: the line of the value
            ("weights:\n  format: !!float abc\n", [(2, "'abc' cannot be read as float")]),
            ("weights:\n  format: !!int abc\n", [(2, "cannot be read as int")]),
            ("weights:\n  format: !!bool abc\n", [(2, "cannot be read as bool")]),
            ("weights: " + "[" * 3000 + "]" * 3000 + "\n", [(1, "nested too deeply")]),
            # YAML's booleans are not numbers: `true` would have been a cap of 1, `yes` weight 1
            ("constraints:\n  max_per_category: true\n", [(2, "a number is needed")]),
            ("weights:\n  format: yes\n  accuracy: 1\n", [(2, "a number is needed")]),
            # every problem is reported, in line order
            (
                "weights:\n  promo: 1\n  format: -1\nconstraints:\n  max_per_category: 0\n",
                [(2, "promo"), (3, "format"), (5, "max_per_category")],
            ),
        ],
    )
    def test_cases(self, text: str, expected: list[tuple[int, str]]) -> None:
        with pytest.raises(PolicyError) as caught:
            parse_policy(text, "p.yaml")
        problems = caught.value.problems
        assert [p.line for p in problems] == [line for line, _ in expected]
        for problem, (_, fragment) in zip(problems, expected, strict=True):
            assert fragment in problem.message
        assert str(caught.value).splitlines()[0].startswith(f"p.yaml:{expected[0][0]}: ")

    @pytest.mark.parametrize(
        ("text", "line"),
        [("weights:\n\n  format: !!timestamp abc\n", 3), ("weights:\n  format: 2024-02-30\n", 2)],
    )
    def test_a_timestamp_that_is_none_is_an_error_at_its_line(self, text: str, line: int) -> None:
        """Imported with vLLM, lm-format-enforcer makes PyYAML read every timestamp as text (the
        gateway's case): the value then fails as a number. Either way an error at its line."""
        with pytest.raises(PolicyError) as caught:
            parse_policy(text)
        [problem] = caught.value.problems
        assert problem.line == line
        assert "cannot be read as timestamp" in problem.message or "number" in problem.message

    @pytest.mark.timeout(60)
    def test_aliases_nested_in_aliases_are_read_once(self) -> None:
        """Ten references at each of nine levels is 10^9 values expanded: read as a tree, such a
        file of 500 bytes would hold the gateway's start for hours."""
        levels = ["weights:", "  l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
        levels += [f"  l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, 10)]
        with pytest.raises(PolicyError, match="unknown rank term 'l0'"):
            parse_policy("\n".join(levels))

    @relaxed
    @given(
        st.lists(st.sampled_from(RANK_TERMS), min_size=1, unique=True),
        st.data(),
        st.lists(st.sampled_from(["", "# note", "   # indented note"]), max_size=3),
    )
    def test_error_line_is_the_offending_line(
        self, names: list[str], data: st.DataObject, filler: list[str]
    ) -> None:
        # A valid policy (category_cap needs a cap), then one weight made invalid.
        bad = data.draw(st.sampled_from(names))
        value = data.draw(st.sampled_from(["-1", "oops", ".nan", "[1]"]))
        lines = ["constraints:", "  max_per_category: 2", "weights:"]
        for name in names:
            lines += [f"  {line}" if line else line for line in filler]
            lines.append(f"  {name}: {value if name == bad else '0.5'}")
        text = "\n".join(lines) + "\n"
        with pytest.raises(PolicyError) as caught:
            parse_policy(text)
        offending = [i for i, line in enumerate(lines, 1) if line.startswith(f"  {bad}:")]
        assert [p.line for p in caught.value.problems] == offending[-1:]

    def test_load_names_the_file(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text("weights:\n  novelty: -2\n")
        with pytest.raises(PolicyError, match=re.escape(f"{path}:2: weights.novelty")):
            load_policy(path)

    def test_binary_file_is_reported_not_raised(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.yaml"
        path.write_bytes(b"\xff\xfe\x00")
        with pytest.raises(PolicyError, match="not UTF-8"):
            load_policy(path)


class TestItemFacts:
    @pytest.mark.parametrize(
        ("item", "names", "expected"),
        [
            # nothing known: available, not promoted, no categories
            (SimpleNamespace(), {}, ItemFacts()),
            # the item's own fields
            (
                SimpleNamespace(categories=["A"], promoted=True, available=False, boost=2.0),
                {},
                ItemFacts(frozenset({"A"}), available=False, promoted=True, boost=2.0),
            ),
            # attribute `promoted` (truthy) promotes; `available: false` makes it unavailable
            (
                SimpleNamespace(attributes={"promoted": True, "available": False}),
                {},
                ItemFacts(available=False, promoted=True, flags=frozenset({"promoted"})),
            ),
            # strings and numbers read as yes/no: "no" and 0 are no
            (
                SimpleNamespace(attributes={"promoted": "no", "available": 0}),
                {},
                ItemFacts(available=False),
            ),
            # the field wins for unavailable: an attribute cannot make it available again
            (
                SimpleNamespace(available=False, attributes={"available": True}),
                {},
                ItemFacts(available=False, flags=frozenset({"available"})),
            ),
            # renamed attributes; the default names then mean nothing special
            (
                SimpleNamespace(attributes={"featured": 1, "in_stock": False, "promoted": 0}),
                {"promoted": "featured", "available": "in_stock"},
                ItemFacts(available=False, promoted=True, flags=frozenset({"featured"})),
            ),
        ],
    )
    def test_cases(self, item: Any, names: dict[str, str], expected: ItemFacts) -> None:
        assert item_facts(item, Policy(attributes=names)) == expected

    def test_created_at_becomes_unix_seconds(self) -> None:
        when = datetime(2024, 1, 1, tzinfo=UTC)
        assert item_facts(SimpleNamespace(created_at=when)).created_at == when.timestamp()
        assert item_facts(SimpleNamespace(created_at=12)).created_at == 12.0

    def test_reads_server_items(self) -> None:
        from server.schemas import Item

        item = Item(
            item_id="sku-1",
            title="Trail shoes",
            categories=["shoes"],
            attributes={"new": True},
            promoted=True,
            created_at=datetime(2024, 1, 1, tzinfo=UTC),
        )
        expected = ItemFacts(
            frozenset({"shoes"}),
            promoted=True,
            flags=frozenset({"new"}),
            created_at=item.created_at.timestamp(),
        )
        assert catalog_facts([item]) == {"sku-1": expected}


ITEMS = [f"i{n}" for n in range(8)]
item_ids = st.sampled_from(ITEMS)
fact_values = st.builds(
    ItemFacts,
    categories=st.frozensets(st.sampled_from("ABC"), max_size=2),
    available=st.booleans(),
    promoted=st.booleans(),
    flags=st.frozensets(st.sampled_from(["new", "sale"]), max_size=2),
    boost=st.sampled_from([0.0, 1.0]),
)
catalogs = st.dictionaries(item_ids, fact_values)
policies = st.builds(
    Policy,
    constraints=st.fixed_dictionaries(
        {
            "exclude_unavailable": st.booleans(),
            "max_per_category": st.none() | st.integers(1, 3),
            "boost": st.dictionaries(
                st.sampled_from(["promoted", "new", "sale"]), st.sampled_from([0.0, 0.25, 1.0])
            ),
            "item_boost": st.sampled_from([0.0, 0.5]),
        }
    ),
)
rankings = st.lists(item_ids, max_size=12)
ks = st.integers(1, 6)


def _servable(ranked: list[str], catalog: dict[str, ItemFacts], rules: Policy) -> list[str]:
    unique = list(dict.fromkeys(ranked))
    if not rules.constraints.exclude_unavailable:
        return unique
    return [item for item in unique if catalog.get(item, ItemFacts()).available]


class TestApplyConstraints:
    CATALOG: ClassVar[dict[str, ItemFacts]] = {
        "a": facts("Drama"),
        "b": facts("Drama"),
        "c": facts("Drama", available=False),
        "d": facts("Comedy", promoted=True),
        "e": facts("Comedy", flags=("new",)),
        "f": facts(),
    }

    @pytest.mark.parametrize(
        ("ranked", "k", "rules", "expected"),
        [
            # no constraint in force: the first k, unchanged
            (["a", "b", "d"], 2, policy(exclude_unavailable=False), ["a", "b"]),
            # repeated ids are served once
            (["a", "a", "b"], 2, policy(), ["a", "b"]),
            # an unavailable item is dropped and the next one backfills
            (["c", "a", "b"], 2, policy(), ["a", "b"]),
            # ... unless the policy allows unavailable items
            (["c", "a", "b"], 2, policy(exclude_unavailable=False), ["c", "a"]),
            # ids without facts are served as plain available items
            (["zz", "a"], 2, policy(), ["zz", "a"]),
            # cap 1: the second drama is skipped, the comedy backfills
            (["a", "b", "d"], 2, policy(max_per_category=1), ["a", "d"]),
            # cap 2 with k 3: the third drama gives way to a comedy
            (
                ["a", "b", "c", "f", "d"],
                3,
                policy(max_per_category=2, exclude_unavailable=False),
                ["a", "b", "f"],
            ),
            # not enough other categories: the cap gives way rather than a short list, and the
            # skipped item comes last
            (["a", "b", "d"], 3, policy(max_per_category=1), ["a", "d", "b"]),
            # fewer servable items than k: all of them
            (["c", "a"], 5, policy(), ["a"]),
            # boost 0.5 with k 2 moves d up one place: past b, not past a
            (["a", "b", "d"], 2, policy(boost={"promoted": 0.5}), ["a", "d"]),
            # boost 1 with k 2 moves d up two places: first
            (["a", "b", "d"], 2, policy(boost={"promoted": 1}), ["d", "a"]),
            # a fractional move: e (boost 0.5, k 3) moves up 1.5 places, past f but not past b
            (["a", "b", "f", "e"], 3, policy(boost={"new": 0.5}), ["a", "b", "e"]),
            # boosts by any truthy attribute add up with the promoted boost
            (["a", "b", "e", "d"], 2, policy(boost={"new": 1, "promoted": 0.5}), ["e", "a"]),
            # boost first, then the cap: the boosted comedy d takes the comedy slot before e
            (["e", "a", "d"], 2, policy(max_per_category=1, boost={"promoted": 1}), ["d", "a"]),
            # an unavailable item is not served even with a boost
            (["a", "c"], 2, policy(boost={"available": 0}), ["a"]),
        ],
    )
    def test_cases(self, ranked: list[str], k: int, rules: Policy, expected: list[str]) -> None:
        assert apply_constraints(ranked, self.CATALOG, k, rules) == expected

    def test_k_below_one_is_refused(self) -> None:
        with pytest.raises(ValueError, match="k must be at least 1"):
            apply_constraints(["a"], self.CATALOG, 0, DEFAULT_POLICY)

    def test_item_boost_scales_the_items_own_boost(self) -> None:
        catalog = {"a": ItemFacts(), "b": ItemFacts(boost=2.0)}
        assert boost_of(catalog["b"], policy(item_boost=0.5)) == 1.0
        assert apply_constraints(["a", "b"], catalog, 1, policy(item_boost=0.5)) == ["b"]
        assert apply_constraints(["a", "b"], catalog, 1, DEFAULT_POLICY) == ["a"]

    @relaxed
    @given(rankings, catalogs, ks, policies)
    def test_serves_min_k_servable_distinct_candidates(
        self, ranked: list[str], catalog: dict[str, ItemFacts], k: int, rules: Policy
    ) -> None:
        served = apply_constraints(ranked, catalog, k, rules)
        assert len(served) == len(set(served)) == min(k, len(_servable(ranked, catalog, rules)))
        assert set(served) <= set(ranked)

    @relaxed
    @given(rankings, catalogs, ks, policies)
    def test_never_serves_an_excluded_item(
        self, ranked: list[str], catalog: dict[str, ItemFacts], k: int, rules: Policy
    ) -> None:
        served = apply_constraints(ranked, catalog, k, rules)
        if rules.constraints.exclude_unavailable:
            assert all(catalog.get(item, ItemFacts()).available for item in served)

    @relaxed
    @given(rankings, st.dictionaries(item_ids, st.sampled_from("ABC")), ks, st.integers(1, 3))
    def test_meets_the_cap_whenever_the_candidates_allow(
        self, ranked: list[str], category: dict[str, str], k: int, cap: int
    ) -> None:
        # One category per item (or none): a list meeting the cap exists exactly when the
        # uncategorised items plus min(cap, items) per category reach k.
        catalog = {item: facts(cat) for item, cat in category.items()}
        unique = list(dict.fromkeys(ranked))
        per_category = {cat: sum(category.get(i) == cat for i in unique) for cat in "ABC"}
        feasible = sum(i not in category for i in unique)
        feasible += sum(min(cap, n) for n in per_category.values())
        served = apply_constraints(ranked, catalog, k, policy(max_per_category=cap))
        counts = [sum(category.get(i) == cat for i in served) for cat in "ABC"]
        if feasible >= k:
            assert max(counts) <= cap

    @relaxed
    @given(rankings, catalogs, ks)
    def test_without_constraints_serves_the_ranking(
        self, ranked: list[str], catalog: dict[str, ItemFacts], k: int
    ) -> None:
        served = apply_constraints(ranked, catalog, k, policy(exclude_unavailable=False))
        assert served == list(dict.fromkeys(ranked))[:k]

    @relaxed
    @given(rankings, catalogs, ks, policies)
    def test_boosts_move_items_up_at_most_b_times_k_places(
        self, ranked: list[str], catalog: dict[str, ItemFacts], k: int, rules: Policy
    ) -> None:
        # Boosts alone: no cap, nothing dropped.
        boosts = rules.constraints.boost
        rules = policy(
            exclude_unavailable=False, boost=boosts, item_boost=rules.constraints.item_boost
        )
        unique = list(dict.fromkeys(ranked))
        served = apply_constraints(ranked, catalog, k, rules)
        boost = {item: boost_of(catalog.get(item, ItemFacts()), rules) for item in unique}
        for position, item in enumerate(served):
            assert position >= unique.index(item) - boost[item] * k
        # items with equal boosts keep their order
        for level in set(boost.values()):
            same = [item for item in served if boost[item] == level]
            assert same == sorted(same, key=unique.index)

    @relaxed
    @given(rankings, catalogs, ks, policies)
    def test_served_lists_earn_full_constraint_rewards(
        self, ranked: list[str], catalog: dict[str, ItemFacts], k: int, rules: Policy
    ) -> None:
        # One source of truth: what the gateway serves is what the trainer's terms score best.
        served = apply_constraints(ranked, catalog, k, rules)
        example = {"candidates": list(dict.fromkeys(ranked)), "k": k}
        answer = Answer("", tuple(served), True)
        unavailable = {item for item, f in catalog.items() if not f.available}
        if rules.constraints.exclude_unavailable and served:
            assert Availability(unavailable)(answer, example) in (None, 1.0)
        cap = rules.constraints.max_per_category
        if cap is not None and k > cap and served:
            categories = {item: f.categories for item, f in catalog.items()}
            value = CategoryCap(categories, cap)(answer, example)
            counts = Counter(c for item in served for c in categories.get(item, ()))
            assert (value == 1.0) == all(n <= cap for n in counts.values())


class TestBuildTerms:
    CATALOG: ClassVar[dict[str, ItemFacts]] = {
        "a": ItemFacts(frozenset({"A"}), promoted=True, created_at=1.0),
        "b": ItemFacts(frozenset({"A"}), available=False, created_at=2.0),
        "c": ItemFacts(frozenset({"B"})),
    }

    def test_default_policy_builds_todays_terms(self) -> None:
        built = build_terms(DEFAULT_POLICY, self.CATALOG, {"a": 3})
        assert [(term.name, weight) for term, weight in built] == list(DEFAULT_WEIGHTS.items())

    def test_every_term_can_be_built_and_pickled(self) -> None:
        every = Policy(weights=dict.fromkeys(RANK_TERMS, 1.0), constraints={"max_per_category": 1})
        built = build_terms(every, self.CATALOG, {"a": 3, "c": 1})
        assert [term.name for term, _ in built] == RANK_TERMS
        rating = build_terms(every, self.CATALOG, {}, Task.rate)
        assert [term.name for term, _ in rating] == ["rating_format", "rating_accuracy"]
        example = {"candidates": ["a", "b", "c"], "positives": ["c"], "k": 2, "rating": 2.0}
        answers = {
            Task.rank: Answer("", ("a", "b"), True),
            Task.rate: RatingAnswer(("x",) * 3, 3, True),
        }
        for term, _ in built + rating:
            # GRPO workers receive the terms pickled; the copy must score like the original
            answer = answers[term.task]
            assert pickle.loads(pickle.dumps(term))(answer, example) == term(answer, example)

    def test_rating_terms_belong_in_rating_weights(self) -> None:
        with pytest.raises(ValueError, match="unknown rank term 'rating_format'"):
            Policy(weights={"rating_format": 1})
        with pytest.raises(ValueError, match="unknown rate term 'format'"):
            Policy(rating_weights={"format": 1})

    def test_terms_read_the_same_facts_as_the_gateway(self) -> None:
        every = Policy(weights=dict.fromkeys(RANK_TERMS, 1.0), constraints={"max_per_category": 1})
        terms = {term.name: term for term, _ in build_terms(every, self.CATALOG, {})}
        example = {"candidates": ["a", "b", "c"], "k": 2}
        answer = Answer("", ("a", "b"), True)
        assert terms["promotion"](answer, example) == 0.5  # a is promoted
        assert terms["availability"](answer, example) == 0.5  # b is not available
        assert terms["category_cap"](answer, example) == 0.5  # a and b are both A
        assert terms["freshness"](answer, example) == 0.5  # c has no time: a 0, b 1

    def test_zero_weights_build_nothing(self) -> None:
        rules = Policy(weights={"format": 1, "accuracy": 0})
        assert [term.name for term, _ in build_terms(rules, {}, {})] == ["format"]
