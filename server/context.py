"""Context layout for chunk retrieval: where neighbours go relative to the prompt and the output.

Used by the server's generation loop and by `retroserve eval`, so evaluation scores exactly the
contexts the server builds. Two layouts:
- `prepend` (In-Context RALM): [neighbours][prompt][generated]. Neighbours sit right before the text
  they condition; every new retrieval changes the prefix, so the prompt is re-prefilled.
- `after_prompt`: [prompt][neighbours][generated]. The prompt stays a stable prefix that vLLM's
  prefix cache keeps across retrievals (only whole KV blocks of an identical prefix are reused).
Within the neighbour block the best neighbour comes last, nearest the text it conditions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

LAYOUTS = ("prepend", "after_prompt")
SEPARATOR_TEXT = "\n\n"
"""What follows each neighbour in the neighbour block."""


@functools.lru_cache(maxsize=8)
def separator_ids(tokenizer) -> tuple[int, ...]:
    """SEPARATOR_TEXT's token ids under `tokenizer` (no special tokens): the `separator` the
    generation loop and the evaluator pass to build_context, tokenized once per tokenizer."""
    return tuple(tokenizer(SEPARATOR_TEXT, add_special_tokens=False)["input_ids"])


class NeighbourTokens(Protocol):
    chunk_tokens: Sequence[int]
    continuation_tokens: Sequence[int]


@dataclass
class BuiltContext:
    token_ids: list[int]
    neighbour_tokens: int
    """Tokens of the neighbour block (0 without retrieval)."""
    dropped_text_tokens: int
    """Oldest prompt/output tokens left out to fit the context window."""


def neighbour_block(neighbours: Sequence[NeighbourTokens], separator: Sequence[int]) -> list[int]:
    """[chunk, continuation] of each neighbour, worst first, each followed by the separator."""
    block: list[int] = []
    for neighbour in reversed(list(neighbours)):
        block.extend(neighbour.chunk_tokens)
        block.extend(neighbour.continuation_tokens)
        block.extend(separator)
    return block


def build_context(
    prompt_ids: Sequence[int],
    generated_ids: Sequence[int],
    neighbours: Sequence[NeighbourTokens],
    separator: Sequence[int],
    max_context_tokens: int,
    layout: str = "prepend",
    prefix_ids: Sequence[int] = (),
) -> BuiltContext:
    """Token ids for the engine, at most `max_context_tokens` long.

    `prefix_ids` (e.g. a BOS token some models need) always comes first. When everything does not
    fit, the oldest prompt/output tokens are dropped first, then neighbours from the worst.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"{layout=} must be one of {LAYOUTS}")
    neighbours = list(neighbours)
    text = list(prompt_ids) + list(generated_ids)
    budget = max_context_tokens - len(prefix_ids)
    block = neighbour_block(neighbours, separator)
    # Keep at least half the window for the text itself; drop worst neighbours beyond that.
    while neighbours and len(block) > budget // 2:
        neighbours = neighbours[:-1]
        block = neighbour_block(neighbours, separator)
    keep = max(0, budget - len(block))
    dropped = max(0, len(text) - keep)
    if layout == "prepend" or dropped:
        # Once the prompt no longer fits whole it cannot be a stable prefix anyway.
        ids = list(prefix_ids) + block + text[dropped:]
    else:
        prompt_len = len(prompt_ids)
        ids = list(prefix_ids) + text[:prompt_len] + block + text[prompt_len:]
    return BuiltContext(ids, len(block), dropped)
