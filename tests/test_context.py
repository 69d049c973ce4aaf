"""Context layouts and the same-neighbours continuation (server/core/context.py), on token ids alone."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from server.config import CONTEXT_LAYOUTS
from server.core import context

SEP = (9, 9)


@dataclass(frozen=True)
class FakeNeighbour:
    """What build_context reads of a retriever.datastore.Neighbour."""

    chunk_id: int
    chunk_tokens: tuple[int, ...]
    continuation_tokens: tuple[int, ...]


def neighbour(chunk_id: int, size: int = 6) -> FakeNeighbour:
    base = 1000 * chunk_id
    return FakeNeighbour(chunk_id, tuple(range(base, base + size)), tuple(range(base + 500, base + 500 + size)))


PROMPT = list(range(1, 41))
A, B, C = neighbour(1), neighbour(2), neighbour(3)


def block(*neighbours) -> list[int]:
    return context.neighbour_block(list(neighbours), SEP)


def test_suffix_layout_is_text_then_neighbours_then_the_latest_tokens_again():
    generated = [500, 501, 502]
    built = context.build_context(PROMPT, generated, [A, B], SEP, 2048, layout="suffix", prefix_ids=[7])
    text = PROMPT + generated
    assert built.token_ids == [7] + text + block(A, B) + text[-context.SUFFIX_REPEAT_TOKENS:]
    # Best neighbour last, nearest the text it conditions; ids in block order.
    assert block(A, B)[: len(B.chunk_tokens)] == list(B.chunk_tokens)
    assert built.neighbour_ids == (2, 1) and not built.continued


def test_suffix_layout_keeps_the_text_a_prefix_that_only_grows():
    first = context.build_context(PROMPT, [500] * 16, [A, B], SEP, 2048, layout="suffix")
    second = context.build_context(PROMPT, [500] * 32, [C, A], SEP, 2048, layout="suffix")
    shared = len(PROMPT) + 16
    assert first.token_ids[:shared] == second.token_ids[:shared] == PROMPT + [500] * 16


def test_suffix_without_neighbours_is_the_text_alone():
    built = context.build_context(PROMPT, [5], [], SEP, 2048, layout="suffix", prefix_ids=[7])
    assert built.token_ids == [7] + PROMPT + [5]


def test_the_other_layouts_are_unchanged():
    generated = [500, 501]
    prepend = context.build_context(PROMPT, generated, [A, B], SEP, 2048, layout="prepend")
    after = context.build_context(PROMPT, generated, [A, B], SEP, 2048, layout="after_prompt")
    assert prepend.token_ids == block(A, B) + PROMPT + generated
    assert after.token_ids == PROMPT + block(A, B) + generated


@pytest.mark.parametrize("layout", CONTEXT_LAYOUTS)
def test_a_context_never_exceeds_the_window_and_drops_the_oldest_text(layout):
    limit = 60
    built = context.build_context(PROMPT, list(range(100, 140)), [A, B], SEP, limit, layout=layout, prefix_ids=[7])
    assert len(built.token_ids) <= limit
    assert built.token_ids[0] == 7 and built.dropped_text_tokens > 0
    assert built.token_ids[-1] == 139  # the newest token always stays last


def test_the_same_chunks_in_any_order_continue_the_previous_context():
    first = context.next_context(None, [], PROMPT, [], [A, B], SEP, 2048)
    output = [500, 501, 502, 503]
    second = context.next_context(first, output, PROMPT, output, [B, A], SEP, 2048)
    assert second.continued and second.token_ids == first.token_ids + output
    assert second.neighbour_ids == first.neighbour_ids  # the block keeps its order


def test_new_chunks_lay_the_context_out_again():
    first = context.next_context(None, [], PROMPT, [], [A, B], SEP, 2048)
    output = [500, 501]
    for neighbours in ([A, C], [A], [A, B, C]):
        again = context.next_context(first, output, PROMPT, output, neighbours, SEP, 2048)
        assert not again.continued
        assert again.token_ids == context.build_context(PROMPT, output, neighbours, SEP, 2048).token_ids


def test_continuation_stops_where_the_window_ends_and_can_be_turned_off():
    first = context.next_context(None, [], PROMPT, [], [A, B], SEP, 2048)
    output = [500] * 8
    too_long = context.next_context(first, output, PROMPT, output, [A, B], SEP, len(first.token_ids) + 7)
    assert not too_long.continued and len(too_long.token_ids) <= len(first.token_ids) + 7
    off = context.next_context(first, output, PROMPT, output, [A, B], SEP, 2048, keep_same_neighbours=False)
    assert not off.continued and off.token_ids == context.build_context(PROMPT, output, [A, B], SEP, 2048).token_ids


def test_prepend_continuation_in_the_same_order_equals_laying_out_again():
    """Where the two contexts are equal, continuing is exactly the re-laid-out path."""
    first = context.next_context(None, [], PROMPT, [], [A, B], SEP, 2048, layout="prepend")
    output = [500, 501, 502]
    continued = context.next_context(first, output, PROMPT, output, [A, B], SEP, 2048, layout="prepend")
    relaid = context.build_context(PROMPT, output, [A, B], SEP, 2048, layout="prepend")
    assert continued.continued and continued.token_ids == relaid.token_ids


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        context.build_context(PROMPT, [], [A], SEP, 2048, layout="sideways")


def test_a_rank_margin_keeps_neighbours_that_are_still_among_the_new_candidates():
    first = context.next_context(None, [], PROMPT, [], [A, B], SEP, 2048)
    output = [500, 501]
    D = neighbour(4)
    kept = context.next_context(first, output, PROMPT, output, [C, A], SEP, 2048, candidates=[C, A, B])
    assert kept.continued and kept.neighbour_ids == first.neighbour_ids
    dropped = context.next_context(first, output, PROMPT, output, [C, A], SEP, 2048, candidates=[C, A, D])
    assert not dropped.continued and set(dropped.neighbour_ids) == {3, 1}


@pytest.mark.parametrize("tokens", [4, 6, 9])
def test_shorter_neighbours_keep_the_last_tokens_of_each_chunk_and_continuation(tokens):
    """neighbour_tokens N: each neighbour contributes the last N of [chunk, continuation] (N = the
    continuation's length: the continuation alone), worst first, each followed by the separator."""
    built = context.build_context(PROMPT, [500], [A, B], SEP, 2048, layout="prepend", neighbour_tokens=tokens)
    whole = {n.chunk_id: list(n.chunk_tokens) + list(n.continuation_tokens) for n in (A, B)}
    expected = whole[2][-tokens:] + list(SEP) + whole[1][-tokens:] + list(SEP)
    assert built.token_ids == expected + PROMPT + [500]
    assert built.neighbour_tokens == 2 * (tokens + len(SEP)) and built.neighbour_ids == (2, 1)
    if tokens == len(A.continuation_tokens):
        assert expected[:tokens] == list(B.continuation_tokens)
    # 0 (the default) places them whole; a neighbour shorter than N is placed whole
    assert context.neighbour_block([A], SEP, 0) == block(A) == context.neighbour_block([A], SEP, 1000)


@pytest.mark.parametrize("tokens", [4, 6, 9])
def test_negative_neighbour_tokens_keep_the_first_tokens_the_matched_chunk(tokens):
    whole = list(A.chunk_tokens) + list(A.continuation_tokens)
    assert context.neighbour_block([A], SEP, -tokens) == whole[:tokens] + list(SEP)
    if tokens == len(A.chunk_tokens):
        assert context.neighbour_block([A], SEP, -tokens)[:tokens] == list(A.chunk_tokens)


def test_continuing_a_context_keeps_its_shorter_neighbours():
    first = context.next_context(None, [], PROMPT, [], [A, B], SEP, 2048, neighbour_tokens=4)
    again = context.next_context(first, [500, 501], PROMPT, [500, 501], [B, A], SEP, 2048, neighbour_tokens=4)
    assert again.continued and again.token_ids == first.token_ids + [500, 501]
    assert again.token_ids == context.build_context(PROMPT, [500, 501], [A, B], SEP, 2048,
                                                    neighbour_tokens=4).token_ids
