"""A refresh of a chat model trains on its prompts as the gateway sends them: inside its chat
template (the impression log keeps them without)."""

from contract.prompt import Rendering
from tests.trainer.gguf_files import tiny_tokenizer
from trainer.examples import Example
from trainer.gate import Popularity
from trainer.rating import RatingExample, RatingExamples
from trainer.refresh import Lessons


def test_every_prompt_of_every_task_goes_inside_the_template() -> None:
    ranking = Example(
        user_id="u", prompt="rank me", candidates=["1"], positives=["1"], k=1, target="t"
    )
    rated = RatingExample(user_id="u", prompt="rate me", rating=4, baseline=3.5, target="t")
    lessons = Lessons(
        ranking=[ranking],
        holdout=[ranking.model_copy(update={"prompt": "held out"})],
        popularity=Popularity(counts={}, relative={}),
        terms=[],
        rating=RatingExamples(rendering=Rendering.rich, train=[rated], validation=[rated]),
        rating_terms=[],
    )

    chat = lessons.in_chat(tiny_tokenizer())

    def turn(text: str) -> str:
        return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"

    assert [e.prompt for e in chat.ranking] == [turn("rank me")]
    assert [e.prompt for e in chat.holdout] == [turn("held out")]
    assert [e.prompt for e in chat.rating.train + chat.rating.validation] == [turn("rate me")] * 2
    assert chat.ranking[0].target == "t" and chat.rating.train[0].rating == 4
    assert lessons.ranking[0].prompt == "rank me"  # the lessons given are left as they were
