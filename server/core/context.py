"""Context layout for chunk retrieval: where neighbours go relative to the prompt and the output.

Used by the server's generation loop and by `retroserve eval`, so evaluation scores exactly the
contexts the server builds (`next_context` is the one function both call). Three layouts:
- `prepend` (In-Context RALM; the default): [neighbours][prompt][generated]. Every new set of
  neighbours changes the prefix, so the whole context is prefilled again.
- `suffix`: [prompt][generated][neighbours][the last SUFFIX_REPEAT_TOKENS tokens again].
  Everything before the neighbours is the text itself, which only grows from span to span, so
  vLLM's prefix cache keeps it, and a new retrieval computes only the neighbours, the repeated tail
  and the text's last partial KV block. With SmolLM2-135M it costs quality (the text is cut in two
  by the neighbours; README, Measured), so it is not the default.
- `after_prompt`: [prompt][neighbours][generated]. Only the prompt stays a cached prefix, and the
  generated text no longer follows its own beginning (quality suffers).
Within the neighbour block the best neighbour comes last, nearest the text it conditions.

Across spans, `next_context` keeps the previous context (and the engine's cached KV of it) when a
retrieval returns the same chunks in any order: the next span then continues the previous engine
prompt plus its output, which is what one uninterrupted engine request would have computed. With a
rank margin m > 0 it also keeps them while each is still among the new k + m nearest (a RaLMSpec-
like trade: fewer re-layouts for neighbours that are slightly worse than the freshest ones).

The layout names and the defaults (CONTEXT_LAYOUTS, DEFAULT_LAYOUT, DEFAULT_KEEP_RANK_MARGIN) are
settings, so they live in server/config.py, which every part reads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.config import CONTEXT_LAYOUTS, DEFAULT_LAYOUT

SUFFIX_REPEAT_TOKENS = 32
"""Suffix layout: how many of the latest text tokens follow the neighbour block again (the
default query length: the text the neighbours were retrieved for)."""
SEPARATOR_TEXT = "\n\n"
"""What follows each neighbour in the neighbour block."""


@functools.lru_cache(maxsize=8)
def separator_ids(tokenizer) -> tuple[int, ...]:
    """SEPARATOR_TEXT's token ids under `tokenizer` (no special tokens): the `separator` the
    generation loop and the evaluator pass to build_context, tokenized once per tokenizer."""
    return tuple(tokenizer(SEPARATOR_TEXT, add_special_tokens=False)["input_ids"])


class NeighbourTokens(Protocol):
    chunk_id: int
    chunk_tokens: Sequence[int]
    continuation_tokens: Sequence[int]


@dataclass
class BuiltContext:
    token_ids: list[int]
    neighbour_tokens: int
    """Tokens of the neighbour block (0 without retrieval)."""
    dropped_text_tokens: int
    """Oldest prompt/output tokens left out to fit the context window."""
    neighbour_ids: tuple[int, ...] = ()
    """Chunk ids of the neighbours in the block, in block order."""
    continued: bool = False
    """True when this is the previous span's context plus its output (same neighbours)."""


def neighbour_block(neighbours: Sequence[NeighbourTokens], separator: Sequence[int],
                    neighbour_tokens: int = 0) -> list[int]:
    """[chunk, continuation] of each neighbour, worst first, each followed by the separator.
    `neighbour_tokens` N keeps part of each, so a new neighbour set costs fewer prompt tokens:
    N > 0 its last N tokens (64: the continuation alone), N < 0 its first -N (-64: the matched
    chunk alone), 0 all of it."""
    block: list[int] = []
    for neighbour in reversed(list(neighbours)):
        tokens = list(neighbour.chunk_tokens) + list(neighbour.continuation_tokens)
        if neighbour_tokens > 0:
            tokens = tokens[-neighbour_tokens:]
        elif neighbour_tokens < 0:
            tokens = tokens[:-neighbour_tokens]
        block.extend(tokens)
        block.extend(separator)
    return block


def build_context(
    prompt_ids: Sequence[int],
    generated_ids: Sequence[int],
    neighbours: Sequence[NeighbourTokens],
    separator: Sequence[int],
    max_context_tokens: int,
    layout: str = DEFAULT_LAYOUT,
    prefix_ids: Sequence[int] = (),
    repeat_tokens: int = SUFFIX_REPEAT_TOKENS,
    neighbour_tokens: int = 0,
) -> BuiltContext:
    """Token ids for the engine, at most `max_context_tokens` long.

    `prefix_ids` (e.g. a BOS token some models need) always comes first. When everything does not
    fit, the oldest prompt/output tokens are dropped first, then neighbours from the worst.
    """
    if layout not in CONTEXT_LAYOUTS:
        raise ValueError(f"{layout=} must be one of {CONTEXT_LAYOUTS}")
    neighbours = list(neighbours)
    text = list(prompt_ids) + list(generated_ids)
    budget = max_context_tokens - len(prefix_ids)
    block = neighbour_block(neighbours, separator, neighbour_tokens)
    # Keep at least half the window for the text itself; drop worst neighbours beyond that.
    while neighbours and len(block) > budget // 2:
        neighbours = neighbours[:-1]
        block = neighbour_block(neighbours, separator, neighbour_tokens)
    repeat = min(repeat_tokens, len(text), max(0, budget - len(block))) if layout == "suffix" and block else 0
    keep = max(0, budget - len(block) - repeat)
    dropped = max(0, len(text) - keep)
    if layout == "suffix":
        ids = list(prefix_ids) + text[dropped:] + block + (text[len(text) - repeat:] if repeat else [])
    elif layout == "prepend" or dropped:
        # Once the prompt no longer fits whole it cannot be a stable prefix anyway.
        ids = list(prefix_ids) + block + text[dropped:]
    else:
        prompt_len = len(prompt_ids)
        ids = list(prefix_ids) + text[:prompt_len] + block + text[prompt_len:]
    return BuiltContext(ids, len(block), dropped, tuple(n.chunk_id for n in reversed(neighbours)))


def candidate_count(neighbours: int, keep_same_neighbours: bool, keep_rank_margin: int) -> int:
    """How many nearest chunks a retrieval fetches: the k it lays out, plus the rank margin within
    which `next_context` keeps the chunks already in the context."""
    return neighbours + (keep_rank_margin if keep_same_neighbours else 0)


def next_context(
    previous: BuiltContext | None,
    previous_output: Sequence[int],
    *context_args,
    keep_same_neighbours: bool = True,
    candidates: Sequence[NeighbourTokens] | None = None,
    **layout_options,
) -> BuiltContext:
    """The context of the next span: `previous` (the last span's context) followed by
    `previous_output` (what was generated after it) when the chunks already in it are as many as
    the new neighbours and all among `candidates` (the new k + margin nearest; default: the new
    neighbours themselves, i.e. the same chunks in any order), and that still fits; otherwise
    `build_context(*context_args, **layout_options)` with the new neighbours (`context_args`:
    prompt_ids, generated_ids, neighbours, separator, max_context_tokens, as build_context takes them)."""
    neighbours, max_context_tokens = context_args[2], context_args[4]
    if keep_same_neighbours and previous is not None:
        candidate_ids = {n.chunk_id for n in (neighbours if candidates is None else candidates)}
        same = len(previous.neighbour_ids) == len(neighbours) and set(previous.neighbour_ids) <= candidate_ids
        length = len(previous.token_ids) + len(previous_output)
        if same and length <= max_context_tokens:
            return BuiltContext(list(previous.token_ids) + list(previous_output), previous.neighbour_tokens,
                                previous.dropped_text_tokens, previous.neighbour_ids, continued=True)
    return build_context(*context_args, **layout_options)
