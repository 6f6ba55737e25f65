"""The gate against the retrieval order: bootstrap does not activate, and refresh does not
publish, a model that ranks worse than the list it reranks, unless forced."""

from typing import ClassVar

import pytest

from contract.prompt import Rendering
from contract.ranking import Blend
from contract.tasks import Task
from server.config import Settings
from trainer.feedback_log import LoggedExample
from trainer.gate import (
    BLENDS,
    NOVELTY_FLOOR,
    Served,
    activation,
    beats_retrieval,
    choose_blend,
    refresh_gate,
)
from trainer.rating import RatingExample, RatingExamples
from trainer.refresh import gated_users, split_logged


def scores(ours: float, retrieval: float, invalid: float = 0.0) -> dict[str, float]:
    return {
        "ndcg@10": ours,
        "retrieval_ndcg@10": retrieval,
        "invalid_rate": invalid,
        "validation_users": 100.0,
    }


@pytest.mark.parametrize(
    ("ours", "retrieval", "beats"),
    [
        (0.13, 0.10, True),
        (0.10, 0.10, True),  # a tie is not worse
        (0.07, 0.10, False),
    ],
)
def test_beats_retrieval(ours: float, retrieval: float, beats: bool) -> None:
    assert beats_retrieval(scores(ours, retrieval)) is beats


def blend(prior: float = 0.0, penalty: float = 0.0) -> Blend:
    return Blend(retrieval_prior=prior, popularity_penalty=penalty)


class TestChooseBlend:
    """Validation picks the blend the gateway serves with: the most accurate one whose lists stay
    within NOVELTY_FLOOR of the retrieval order's novelty."""

    retrieval = Served(ndcg=0.10, novelty=10.0)

    def test_the_most_accurate_blend_when_all_are_novel_enough(self) -> None:
        scored = {
            blend(0.0): Served(ndcg=0.12, novelty=9.8),
            blend(0.5): Served(ndcg=0.13, novelty=9.7),
        }
        assert choose_blend(scored, self.retrieval) == blend(0.5)

    def test_accuracy_gives_way_to_novelty_below_the_floor(self) -> None:
        floor = NOVELTY_FLOOR * self.retrieval.novelty
        scored = {
            blend(0.0): Served(ndcg=0.14, novelty=floor - 0.5),
            blend(0.0, 2.0): Served(ndcg=0.12, novelty=floor + 0.1),
            blend(4.0): Served(ndcg=0.11, novelty=floor + 0.4),
        }
        assert choose_blend(scored, self.retrieval) == blend(0.0, 2.0)

    def test_the_most_novel_blend_when_none_is_novel_enough(self) -> None:
        scored = {
            blend(0.0): Served(ndcg=0.14, novelty=7.0),
            blend(16.0): Served(ndcg=0.11, novelty=9.0),
        }
        assert choose_blend(scored, self.retrieval) == blend(16.0)

    def test_a_floor_of_zero_takes_the_most_accurate_blend(self) -> None:
        scored = {
            blend(0.0): Served(ndcg=0.14, novelty=7.0),
            blend(16.0): Served(ndcg=0.11, novelty=9.9),
        }
        assert choose_blend(scored, self.retrieval, novelty_floor=0.0) == blend(0.0)
        assert choose_blend(scored, self.retrieval, novelty_floor=0.9) == blend(16.0)

    def test_a_tie_goes_to_the_smaller_weights(self) -> None:
        same = Served(ndcg=0.12, novelty=9.9)
        scored = {blend(2.0): same, blend(0.25): same, blend(0.25, 1.0): same}
        assert choose_blend(scored, self.retrieval) == blend(0.25)

    def test_the_grid_holds_the_model_alone(self) -> None:
        assert Blend() in BLENDS and len(set(BLENDS)) == len(BLENDS)


class TestActivation:
    def test_a_model_that_beats_retrieval_is_activated(self) -> None:
        activated, why = activation(
            scores(0.13, 0.10), {Task.rank}, other_active=False, force=False
        )

        assert activated
        assert "0.1300 vs 0.1000" in why and why.endswith("activated")

    def test_a_worse_model_is_not_activated_and_the_operator_is_told(self) -> None:
        activated, why = activation(
            scores(0.07, 0.10), {Task.rank}, other_active=False, force=False
        )

        assert not activated
        assert "WORSE" in why and "--force" in why

    def test_force_activates_a_worse_model_and_says_so(self) -> None:
        activated, why = activation(scores(0.07, 0.10), {Task.rank}, other_active=False, force=True)

        assert activated and "forced" in why

    def test_another_active_version_is_never_replaced(self) -> None:
        activated, why = activation(scores(0.2, 0.1), {Task.rank}, other_active=True, force=True)

        assert not activated and "another version is active" in why

    def test_a_model_for_both_tasks_must_pass_both_gates(self) -> None:
        rated = {"rate_rmse": 1.1, "rate_baseline_rmse": 1.0, "rate_validation_ratings": 50}
        both = {Task.rank, Task.rate}
        activated, why = activation(scores(0.13, 0.1) | rated, both, False, False)
        assert not activated
        assert "rates WORSE than the lean baseline on 50" in why and "1.1000 vs 1.0000" in why
        better = rated | {"rate_rmse": 0.9}
        assert activation(scores(0.13, 0.1) | better, both, False, False)[0]
        assert activation(better, {Task.rate}, False, False)[0]  # no ranking metrics needed


class TestRefreshGate:
    def test_worse_than_retrieval_fails_even_when_better_than_the_active_version(
        self, settings: Settings
    ) -> None:
        gate = refresh_gate(scores(0.05, 0.10), scores(0.08, 0.10), settings)

        assert not gate.beats_retrieval and not gate.passed

    def test_forced_passes_and_records_it(self, settings: Settings) -> None:
        gate = refresh_gate(scores(0.05, 0.10), scores(0.08, 0.10), settings, force=True)

        assert gate.passed and gate.forced

    def test_better_than_both_passes_unforced(self, settings: Settings) -> None:
        gate = refresh_gate(scores(0.11, 0.10), scores(0.12, 0.10), settings)

        assert gate.passed and gate.beats_retrieval and not gate.forced

    def test_forcing_past_retrieval_does_not_force_past_the_active_version(
        self, settings: Settings
    ) -> None:
        gate = refresh_gate(scores(0.12, 0.10), scores(0.05, 0.10), settings, force=True)

        assert not gate.passed and not gate.forced  # force let nothing pass
        assert gate.failures == [
            "ranks worse than the active version (NDCG@10 0.0500 against 0.1200, tolerance 0.01)"
        ]

    def test_the_failures_say_what_failed(self, settings: Settings) -> None:
        worse_than_active = refresh_gate(scores(0.14, 0.10), scores(0.12, 0.10, 0.2), settings)
        assert worse_than_active.beats_retrieval and not worse_than_active.passed
        assert worse_than_active.failures == [
            "ranks worse than the active version (NDCG@10 0.1200 against 0.1400, tolerance 0.01)",
            "writes more invalid answers than the active version (0.2000 against 0.0000, "
            "tolerance 0)",
        ]
        worse_than_retrieval = refresh_gate(scores(0.05, 0.10), scores(0.08, 0.10), settings)
        assert worse_than_retrieval.failures == [
            "ranks worse than the retrieval order (NDCG@10 0.0800 against 0.1000)"
        ]
        assert refresh_gate(scores(0.11, 0.10), scores(0.12, 0.10), settings).failures == []

    def test_a_version_that_searches_is_gated_on_its_queries(self, settings: Settings) -> None:
        """A refresh trains ranking, whose GRPO changes the weights that write queries too."""

        def searched(ndcg: float) -> dict[str, float]:
            return scores(0.12, 0.10) | {"search_ndcg@10": ndcg, "search_raw_ndcg@10": 0.02}

        assert refresh_gate(searched(0.05), searched(0.05), settings).passed
        worse = refresh_gate(searched(0.05), searched(0.01), settings, force=True)
        assert not worse.passed
        assert worse.failures == [
            "searches worse than the active version (NDCG@10 0.0100 against 0.0500, tolerance 0.01)"
        ]
        # Below the raw query, as the active version is: a refresh does not train search.
        assert refresh_gate(searched(0.015), searched(0.015), settings).passed


def logged(n: int, rendering: Rendering) -> LoggedExample:
    return LoggedExample(
        request_id=f"r{n}",
        user_id="u",
        model_version="v",
        ts=float(n),
        prompt="p",
        rendering=rendering,
        candidates=["a", "b"],
        shown=["a"],
        k=1,
        positives=["a"],
    )


def test_refresh_trains_only_on_lists_prompted_the_way_the_model_reads() -> None:
    lists = [logged(n, Rendering.compact if n % 2 else Rendering.rich) for n in range(8)]

    train, holdout = split_logged(lists, 0.25, Rendering.compact, newest=100)

    assert len(train) + len(holdout) == 4
    assert {e.prompt for e in train + holdout} == {"p"}
    assert len(holdout) == 1


def test_a_refresh_reads_only_the_newest_logged_lists() -> None:
    lists = [
        logged(n, Rendering.compact).model_copy(update={"prompt": f"p{n}"}) for n in range(100)
    ]

    train, holdout = split_logged(lists, 0.25, Rendering.compact, newest=20)

    assert [e.prompt for e in train + holdout] == [f"p{n}" for n in range(80, 100)]
    assert len(train) == 15 and len(holdout) == 5


def test_the_gate_scores_its_held_out_lists_and_ratings_users() -> None:
    """Their latest interaction is often what the gate holds out: a fresh example of theirs
    would teach the candidate what it is then scored on."""
    lists = [logged(n, Rendering.compact).model_copy(update={"user_id": f"u{n}"}) for n in range(4)]
    _, holdout = split_logged(lists, 0.5, Rendering.compact, newest=100)
    rated = RatingExample(user_id="u5", prompt="p", rating=2, baseline=3.5, target="t")
    rating = RatingExamples(rendering="compact", train=[], validation=[rated])

    assert gated_users(holdout, None) == {"u2", "u3"}
    assert gated_users(holdout, rating) == {"u2", "u3", "u5"}


class TestRatingGate:
    RATED: ClassVar[dict[str, float]] = {"rate_rmse": 0.95, "rate_baseline_rmse": 1.0}

    def test_a_rating_model_must_beat_the_baseline(self, settings: Settings) -> None:
        worse = {"rate_rmse": 1.05, "rate_baseline_rmse": 1.0}
        gate = refresh_gate(
            self.RATED, worse, settings.model_copy(update={"gate_rmse_tolerance": 1})
        )
        assert not gate.beats_baseline and not gate.passed
        assert gate.beats_retrieval  # not trained to rank: nothing to say
        assert refresh_gate(self.RATED, worse, settings, force=True).passed is False  # tolerance

    def test_and_stay_within_the_tolerance_of_the_active_version(self, settings: Settings) -> None:
        drifted = {"rate_rmse": 0.97, "rate_baseline_rmse": 1.0}
        assert refresh_gate(self.RATED, drifted, settings).passed is False  # 0.02 > 0.01
        loose = settings.model_copy(update={"gate_rmse_tolerance": 0.05})
        assert refresh_gate(self.RATED, drifted, loose).passed

    def test_both_tasks_gate_together(self, settings: Settings) -> None:
        both = scores(0.12, 0.10) | self.RATED
        assert refresh_gate(both, both, settings).passed
        worse_ranking = scores(0.05, 0.10) | self.RATED
        assert not refresh_gate(both, worse_ranking, settings).passed
