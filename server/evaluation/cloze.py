"""`retroserve eval cloze`: does retrieval help the model *generate* the name a document uses next?

Bits per byte is not what a user sees, and kNN-LM's perplexity gains are known not to carry over to
open-ended generation (Wang et al. 2023, "kNN-LM does not improve open-ended text generation"), so
this scores generation. Items come from held-out reStructuredText: each is the text before an API
name, function, constant or option written as inline markup (:func:`os.getcwd`, ``O_RDONLY``,
:option:`-m`) that has not occurred in that text, and the name itself. The model continues the text
greedily through a running server, exactly as a client's request would be served, once per
retrieval mode; an item counts when the name appears in the first `words` words of the output.

Intervals resample documents (an item's neighbours in one document are not independent), paired
across modes: every mode answers the same items.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import grpc
from tqdm import tqdm

from server.config import CHUNK_MODES
from retriever.format import source_key

INLINE_NAME = re.compile(r"(?::[a-z]+(?::[a-z]+)?:`(?P<role>[^`]+)`|``(?P<literal>[^`]+)``)")
"""A role's target (:func:`x`, :c:func:`x`) or an inline literal (``x``) in reStructuredText."""
API_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|--?[A-Za-z][A-Za-z0-9_-]*")
"""What counts as a name: a dotted identifier or a command-line option."""
UNAVAILABLE_RETRIES = 3
"""A greedy request is repeated when the server answers UNAVAILABLE (a connection closed at its
max age or while draining): one long run must not lose every answer to it."""
MIN_NAME_CHARS = 4
"""Shorter names (``x``, ``-m``, ``len``) are too easy to produce by chance or too generic."""


@dataclass(frozen=True)
class ClozeItem:
    source: str
    offset: int
    """Character offset of the markup that names `answer` in the source document."""
    prompt: str
    answer: str


def _name(target: str) -> str | None:
    """The API name a role or literal names, or None (titles, expressions, short names)."""
    name = target.strip().lstrip("~!")
    name = name[:-2] if name.endswith("()") else name
    if len(name) < MIN_NAME_CHARS or not API_NAME.fullmatch(name):
        return None
    return name


def names_in(text: str, name: str) -> bool:
    """Whether `text` names `name` as a whole name (os.path names neither os.path.join nor pos.path)."""
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.\w)", text) is not None


def document_items(source: str, text: str, per_document: int, context_chars: int,
                   min_context_chars: int) -> list[ClozeItem]:
    """Up to `per_document` items spread evenly over the document's candidates."""
    candidates = []
    for match in INLINE_NAME.finditer(text):
        name = _name(match.group("role") or match.group("literal"))
        if name is None or match.start() < min_context_chars:
            continue
        start = max(0, match.start() - context_chars)
        if start > 0:  # begin at a line start inside the window when there is one, else a word start
            line = text.find("\n", start, match.start())
            start = line + 1 if line >= 0 else text.find(" ", start, match.start()) + 1
        prompt = text[start:match.start()].rstrip()
        if prompt and not names_in(prompt, name):
            candidates.append(ClozeItem(source, match.start(), prompt, name))
    if len(candidates) <= per_document:
        return candidates
    return [candidates[i * len(candidates) // per_document] for i in range(per_document)]


def cloze_items(documents, per_document: int = 20, context_chars: int = 1000,
                min_context_chars: int = 200) -> list[ClozeItem]:
    """Items of every document (objects with `source` and `text`), in document order."""
    return [item for document in documents
            for item in document_items(document.source, document.text, per_document, context_chars,
                                       min_context_chars)]


def is_hit(answer: str, generated: str, words: int) -> bool:
    """The answer is named within the first `words` whitespace-separated words of the output."""
    return names_in(" ".join(generated.split()[:words]), answer)


class LeakedNeighbour(Exception):
    """A neighbour came from the document an item was cut from."""


def answer_items(client, items: Sequence[ClozeItem], mode: str, max_new_tokens: int, concurrency: int,
                 timeout_s: float) -> list[str]:
    """Each item's greedy continuation in `mode`, `concurrency` requests in flight. In chunk modes a
    neighbour from the item's own document raises LeakedNeighbour."""
    chunk_mode = mode in CHUNK_MODES

    def answer(item: ClozeItem) -> str:
        for attempt in range(UNAVAILABLE_RETRIES + 1):
            try:
                response = client.generate(item.prompt, mode=mode, temperature=0.0, max_new_tokens=max_new_tokens,
                                           return_provenance=chunk_mode, timeout=timeout_s)
                break
            except grpc.RpcError as error:  # e.g. the server's max connection age closed the channel
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == UNAVAILABLE_RETRIES:
                    raise
        for retrieval in response.retrievals:
            for neighbour in retrieval.neighbours:
                if source_key(neighbour.source) == source_key(item.source):
                    raise LeakedNeighbour(f"chunk {neighbour.chunk_id} of {neighbour.source} was retrieved for "
                                          "an item cut from that document")
        return response.text

    with ThreadPoolExecutor(concurrency) as pool:
        return list(tqdm(pool.map(answer, items), total=len(items), desc=f"cloze {mode}", unit="item"))


def accuracy_intervals(items: Sequence[ClozeItem], hits: dict[str, Sequence[bool]], base: str = "none",
                       samples: int = 10_000, seed: int = 0) -> dict[str, dict]:
    """Per mode: exact-match accuracy with a 95% percentile interval, and its difference in
    percentage points from `base` (paired: the same resampled documents), from resampling source
    documents with replacement; items won and lost against `base`."""
    import numpy as np

    sources = {source: number for number, source in enumerate(dict.fromkeys(item.source for item in items))}
    group = np.array([sources[item.source] for item in items], dtype=np.int64)
    count = np.bincount(group, minlength=len(sources)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(sources), size=(samples, len(sources)))
    per_source = {mode: np.bincount(group, weights=np.asarray(h, dtype=np.float64), minlength=len(sources))
                  for mode, h in hits.items()}
    drawn_items = count[draws].sum(axis=1)

    def interval(values) -> tuple[float, float]:
        low, high = np.percentile(values, [2.5, 97.5])
        return float(low), float(high)

    report = {}
    for mode, mode_hits in per_source.items():
        row = {"items": len(items), "hits": int(mode_hits.sum()), "accuracy": float(mode_hits.sum() / count.sum())}
        row["low"], row["high"] = interval(mode_hits[draws].sum(axis=1) / drawn_items)
        if mode != base and base in per_source:
            difference = (mode_hits - per_source[base])
            row["vs_base"] = {"base": base, "points": float(100 * difference.sum() / count.sum()),
                              "won": int(sum(h and not b for h, b in zip(hits[mode], hits[base]))),
                              "lost": int(sum(b and not h for h, b in zip(hits[mode], hits[base]))),
                              "documents": len(sources)}
            low, high = interval(100 * difference[draws].sum(axis=1) / drawn_items)
            row["vs_base"].update(low=low, high=high)
        report[mode] = row
    return report


def results_payload(items: Sequence[ClozeItem], outputs: dict[str, list[str]], words: int) -> dict:
    """Rows per mode with intervals, and every item with each mode's output (its first `words`
    words) and whether it hit."""
    hits = {mode: [is_hit(item.answer, text, words) for item, text in zip(items, texts)]
            for mode, texts in outputs.items()}
    rows = accuracy_intervals(items, hits, base="none" if "none" in outputs else next(iter(outputs)))
    records = [{**{k: v for k, v in asdict(item).items() if k != "prompt"}, "prompt_chars": len(item.prompt),
                "outputs": {mode: " ".join(outputs[mode][i].split()[:words]) for mode in outputs},
                "hits": {mode: hits[mode][i] for mode in outputs}}
               for i, item in enumerate(items)]
    return {"rows": [{"mode": mode, **row} for mode, row in rows.items()], "items": records}


def cloze_table(rows: Sequence[dict]) -> list[str]:
    """The Markdown table of `eval cloze` rows (printed by the command; bench/results_tables.py)."""
    lines = ["| mode | items | exact match [95%] | vs alone, points [95%] | won / lost |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        versus = row.get("vs_base")
        change = f"{versus['points']:+.1f} [{versus['low']:+.1f}, {versus['high']:+.1f}]" if versus else ""
        won_lost = f"{versus['won']} / {versus['lost']}" if versus else ""
        lines.append(f"| {row['mode']} | {row['items']} | {100 * row['accuracy']:.1f}% "
                     f"[{100 * row['low']:.1f}, {100 * row['high']:.1f}] | {change} | {won_lost} |")
    return lines
