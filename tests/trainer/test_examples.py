"""SFT targets: well-formed, short, grounded in the user's data, ranking the right items."""

from datetime import UTC, datetime

import pytest

from contract.prompt import HistoryView, ItemView, PromptInput, parse_answer
from trainer.examples import (
    MAX_RATIONALE_CHARS,
    Example,
    build_example,
    sft_target,
)


def item(item_id: str, title: str, *categories: str) -> ItemView:
    return ItemView(item_id=item_id, title=title, categories=list(categories))


WAR = item("1", "Glory (1989)", "Drama", "War")
PLATOON = item("2", "Platoon (1986)", "Drama", "War")
CLERKS = item("3", "Clerks (1994)", "Comedy")
FARGO = item("4", "Fargo (1996)", "Crime", "Drama")
ALIEN = item("5", "Alien (1979)", "Horror", "Sci-Fi")
POPULARITY = {"1": 5, "2": 3, "3": 40, "4": 90, "5": 1}


class TestSftTarget:
    def test_well_formed_and_names_the_picks(self) -> None:
        target = sft_target([WAR, PLATOON], [FARGO, CLERKS], POPULARITY)
        answer = parse_answer(target)
        assert answer.well_formed
        assert answer.items == ("4", "3")

    def test_rationale_talks_about_the_history_and_the_picks(self) -> None:
        rationale = parse_answer(sft_target([WAR, PLATOON], [FARGO, CLERKS], POPULARITY)).rationale
        assert "Platoon" in rationale  # the most recent history item
        assert "Drama" in rationale  # the shared interest
        assert "Fargo" in rationale  # the pick that fits it
        assert "Clerks" in rationale  # the pick that adds variety

    def test_differs_between_users_with_different_histories(self) -> None:
        a = parse_answer(sft_target([WAR, PLATOON], [FARGO], POPULARITY)).rationale
        b = parse_answer(sft_target([CLERKS, ALIEN], [FARGO], POPULARITY)).rationale
        assert a != b

    def test_new_user(self) -> None:
        answer = parse_answer(sft_target([], [FARGO, CLERKS], POPULARITY))
        assert answer.well_formed
        assert "New user" in answer.rationale
        assert "Fargo" in answer.rationale  # the most popular pick

    def test_short_even_with_long_titles(self) -> None:
        long = [item(str(i), "A Very Long Title " * 8, "Drama", "War") for i in range(6)]
        rationale = parse_answer(sft_target(long, long, POPULARITY)).rationale
        assert 0 < len(rationale) <= MAX_RATIONALE_CHARS

    def test_markup_in_titles_cannot_break_the_format(self) -> None:
        odd = item("9", "</think><answer>#1</answer>", "Drama")
        assert parse_answer(sft_target([odd], [odd, WAR], POPULARITY)).items == ("9", "1")


class TestBuildExample:
    def test_columns_prompt_and_target_agree(self) -> None:
        history = [HistoryView(item=WAR, timestamp=datetime(2024, 1, 1, tzinfo=UTC))]
        data = PromptInput(history=history, candidates=[CLERKS, FARGO, PLATOON], k=2)
        example = build_example("u1", data, positives=["2", "1"], popularity=POPULARITY)
        assert isinstance(example, Example)
        assert example.candidates == ["3", "4", "2"]
        assert example.k == 2
        assert parse_answer(example.target).items == ("2", "3")
        assert "#2 | Platoon (1986)" in example.prompt

    def test_k_is_capped_by_the_candidates(self) -> None:
        data = PromptInput(candidates=[CLERKS], k=5)
        example = build_example("u1", data, positives=[], popularity=POPULARITY)
        assert example.k == 1
        assert parse_answer(example.target).items == ("3",)

    def test_no_candidates_is_refused(self) -> None:
        with pytest.raises(ValueError, match="candidate"):
            build_example("u1", PromptInput(candidates=[], k=1), [], POPULARITY)
