"""The search contract (Rec-R1): prompt renderings, the answer grammar and its parser."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contract.prompt import ItemView, Rendering
from contract.search import (
    MAX_REFERENCES,
    QUERY_CHARS,
    REFERENCE_CHARS,
    THINK_CHARS,
    build_search_prompt,
    compose_query,
    expand_references,
    parse_search,
    render_search_answer,
    retriever_query,
    search_input,
    search_pattern,
)

TOY = ItemView(item_id="1", title="Toy Story (1995)", categories=["Animation", "Comedy"])
HEAT = ItemView(item_id="6", title="Heat (1995)", categories=["Action"])


def test_compact_prompt_names_items_and_what_was_typed() -> None:
    data = search_input({"age": 24}, [TOY, HEAT], "comedy <b>", shown=5)
    assert build_search_prompt(data, Rendering.compact) == "age=24\n#1, #6\nsearch comedy b\n"
    nothing = search_input({}, [TOY, HEAT], "", shown=1)
    assert build_search_prompt(nothing, Rendering.compact) == "\n#6\nsearch\n"


@pytest.mark.parametrize("rendering", list(Rendering))
def test_invisible_characters_typed_never_reach_the_prompt(rendering: Rendering) -> None:
    typed = "comedy\u202e\u200b\x07\x00 films\u2066"
    prompt = build_search_prompt(search_input({}, [], typed, shown=5), rendering)
    assert "comedy films" in prompt
    assert not any(char in prompt for char in "\u202e\u200b\x07\x00\u2066")


def test_rich_prompt_shows_titles_and_says_when_nothing_was_typed() -> None:
    prompt = build_search_prompt(search_input({}, [TOY], "", shown=5), Rendering.rich)
    assert "- #1 | Toy Story (1995) | Animation, Comedy" in prompt
    assert "They typed nothing: what next?" in prompt
    typed = build_search_prompt(search_input({}, [], "a heist", shown=5), Rendering.rich)
    assert "History: none." in typed and "They typed: a heist" in typed


@pytest.mark.parametrize(
    ("text", "reasoning", "query", "well_formed"),
    [
        ("<think>#1 fun</think><answer>Toy Story</answer>", "#1 fun", "Toy Story", True),
        (" <think> a </think> <answer> b c </answer> ", "a", "b c", True),
        ("<think></think><answer>Heat</answer>", "", "Heat", True),
        ("<think>a</think><answer>  </answer>", "", "", False),
        ("<think>a</think><answer>!!</answer>", "a", "!!", False),  # no word to search for
        ("<answer>Heat</answer>", "", "", False),
        ("<think>a</think><answer>Heat</answer><answer>x</answer>", "", "", False),
        ("<think>a<b</think><answer>Heat</answer>", "", "", False),
        ("<think>a</think><answer>Heat", "", "", False),
        ("", "", "", False),
    ],
)
def test_parse_search(text: str, reasoning: str, query: str, well_formed: bool) -> None:
    answer = parse_search(text)
    assert answer.well_formed is well_formed
    if well_formed:
        assert (answer.reasoning, answer.query) == (reasoning, query)


@given(
    reasoning=st.text(max_size=400),
    query=st.from_regex(r"[A-Za-z0-9][ -~]{0,300}", fullmatch=True),
    rendering=st.sampled_from(list(Rendering)),
)
def test_every_rendered_answer_parses_and_fits_the_grammar(
    reasoning: str, query: str, rendering: Rendering
) -> None:
    text = render_search_answer(reasoning, query, rendering)
    answer = parse_search(text)
    assert answer.well_formed, text
    assert len(answer.reasoning) <= THINK_CHARS[rendering]
    assert len(answer.query) <= QUERY_CHARS[rendering]
    assert "<" not in answer.query + answer.reasoning
    assert re.fullmatch(search_pattern(rendering), text), text


@pytest.mark.parametrize(
    "text",
    [
        "<think> a</think><answer>Heat</answer>",  # a part starts with a visible character
        "<think>a</think><answer></answer>",
        "<think>a</think><answer>" + "x" * (QUERY_CHARS[Rendering.compact] + 1) + "</answer>",
        "<think>a</think>",
    ],
)
def test_the_grammar_refuses_what_it_must(text: str) -> None:
    assert not re.fullmatch(search_pattern(Rendering.compact), text)


def test_the_retriever_gets_the_typed_words_then_the_models() -> None:
    assert retriever_query(" comedy ", "Toy Story") == "comedy Toy Story"
    assert retriever_query("", "Toy Story") == "Toy Story"
    # compact: the items' references, which the retriever reads as their text
    assert compose_query([TOY], Rendering.compact) == "#1"
    assert compose_query([TOY, HEAT], Rendering.compact) == "#1 #6"
    many = [ItemView(item_id=f"{n:09d}", title="t") for n in range(20)]  # 10 characters each
    assert compose_query(many, Rendering.compact) == " ".join(f"#{n:09d}" for n in range(11))
    # a reference that cannot fit would be cut into another id: the title and categories instead
    huge = ItemView(item_id="9" * 200, title="Huge (2001)", categories=["Drama"])
    both = "Huge (2001), Toy Story (1995) Drama Animation Comedy"
    assert compose_query([huge, TOY], Rendering.compact) == both
    # rich: titles, then categories, whole items only, as many as fit
    assert compose_query([TOY], Rendering.rich) == "Toy Story (1995) Animation Comedy"
    both = "Toy Story (1995), Heat (1995) Animation Comedy Action"
    assert compose_query([TOY, HEAT], Rendering.rich) == both
    long = ItemView(item_id="9", title="x" * 180, categories=["Drama"])
    assert compose_query([TOY, long, HEAT], Rendering.rich) == "Toy Story (1995) Animation Comedy"
    fits = ItemView(item_id="9", title="x" * 100, categories=["Drama"])
    assert compose_query([TOY, fits], Rendering.rich) == (
        f"Toy Story (1995), {'x' * 100} Animation Comedy Drama"
    )


@pytest.mark.parametrize(
    ("query", "expanded"),
    [
        ("#1", "Toy Story"),
        ("comedy #1 #6", "comedy Toy Story Heat"),
        ("#1,#6", "Toy Story,#6"),  # ids hold no ',': the first reference runs to it
        ("#7 #1", "#7 Toy Story"),  # no item 7: the reference stays as written
        ("a#1 #", "a#1 #"),  # a reference starts a word and names something
        ("#1#6", "#1#6"),  # the id '1#6' is unknown
        ("#1: #6/x", "Toy Story: Heat/x"),  # ids hold no ':' or '/'
    ],
)
def test_references_are_read_as_the_items_text(query: str, expanded: str) -> None:
    texts = {"1": "Toy Story", "6": "Heat", "1#": "never"}
    assert expand_references(query, texts.get) == expanded


def test_a_query_reads_a_bounded_amount_of_item_text() -> None:
    texts = {"1": "x" * (REFERENCE_CHARS * 5), "6": "Heat"}
    query = " ".join(["#6", "#unknown"] + ["#1"] * MAX_REFERENCES)
    words = expand_references(query, texts.get).split()
    assert words[:2] == ["Heat", "#unknown"]  # an unknown reference is not counted
    assert words[2:-1] == ["x" * REFERENCE_CHARS] * (MAX_REFERENCES - 1)
    assert words[-1] == "#1"  # past the limit: as written
