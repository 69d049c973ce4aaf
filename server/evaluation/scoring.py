"""Bits per byte of held-out documents, with and without retrieval, scored by the serving engine.

Every document is scored in order, the way generation sees it. In chunk mode the document is cut
into spans of `stride` tokens; span j is scored after the neighbours retrieved for the `query_tokens`
tokens before it, laid out by server/core/context.py's `next_context` exactly as the generation loop
lays out a re-prompt (a span whose neighbours are the previous span's continues its context), and
the engine's prompt log-probs give the span's NLL. The first span has nothing to
retrieve with and is scored from the document start alone (In-Context RALM does the same).

Bits per byte = total NLL (nats) / ln 2 / UTF-8 bytes of the scored text: tokenizer-free, so models
with different tokenizers compare on the same text. Documents are cut to `max_doc_chars`
characters before tokenizing for the same reason. Each document starts after a document-start
token (the model's BOS, or SmolLM2's <|endoftext|>), so every one of its tokens is scored.

Beside the total, a prose-only figure scores the tokens that start on prose lines (not reST markup:
directives and comments, field and option lines, section adornments, "Source code" lines, blank
lines), and `token_logprobs` lets the CLI count the tokens a setting made less likely.

Leakage guard: neighbours whose source is the scored document's source are dropped (searching
k + `exclusion_margin` so k remain), and `overlap` measures near-verbatim overlap between held-out
text and the datastore (share of held-out token 13-grams that occur in datastore chunks).
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from artefacts.tokenizer import document_start_ids
from retriever.format import source_key
from retriever.sparse import AUTO_SPARSE
from server.core import context
from server.config import CHUNK_MODES, DEFAULT_KEEP_RANK_MARGIN, DEFAULT_LAYOUT, DEFAULT_NEIGHBOUR_TOKENS, KNN_MODES
from server.core.engine import Engine, SegmentSampling
from server.knn.settings import DEFAULT_KNN_K, DEFAULT_KNN_LAMBDA, DEFAULT_KNN_TEMPERATURE, KnnRequestSettings

LN2 = math.log(2.0)
MARKUP_LINE = re.compile(r"""\s*($|\.\.(\s|$)|:[^:`\s][^:`]*:(\s|$)|([=\-~^"'`#*+<>:._])\4{2,}\s*$|\*\*Source code:\*\*)""")
"""A reStructuredText line that is markup, not prose: blank, a directive or comment (`.. `), a field
or directive option (`:name: value`; a role such as :func:`x` starts prose), a section adornment,
or a "**Source code:**" line."""
OVERLAP_NGRAM = 13
"""Token n-gram length of the overlap measure (the contamination n-gram of GPT-3's analysis)."""



@dataclass(frozen=True)
class EvalDocument:
    source: str
    """Identity used by the leakage guard: datastore neighbours with this source are excluded."""
    text: str
    offset: int = 0
    """Where `text` starts in the source (characters): windows of one file share its source."""


def document_windows(text: str, count: int, chars: int) -> list[tuple[int, str]]:
    """Up to `count` windows of `chars` characters spread evenly from the start to the end of
    `text`, as (offset, window). Each starts at a line start and none overlaps the one before, so
    a long document is sampled whole instead of by its opening only."""
    if count <= 1 or len(text) <= chars:
        return [(0, text[:chars])]
    count = min(count, len(text) // chars)
    windows, previous_end = [], 0
    for i in range(count):
        target = max(previous_end, (len(text) - chars) * i // max(1, count - 1))
        start = target if target == 0 or text[target - 1] == "\n" else text.find("\n", target) + 1
        if (start == 0 and target > 0) or start >= len(text):  # no line starts after target
            break
        windows.append((start, text[start: start + chars]))
        previous_end = start + chars
    return windows or [(0, text[:chars])]


@dataclass(frozen=True)
class EvalSettings:
    mode: str = "chunk"
    """"none" (model alone), "chunk", "token" (kNN-LM: the engine mixes in its token datastore
    at every scored position; the document is scored in one request, as in mode none) or "hybrid"
    (chunk mode's spans and contexts, each scored with the kNN mixture)."""
    neighbours: int = 2
    stride: int = 16
    query_tokens: int = 32
    retriever: str = AUTO_SPARSE
    """How chunks are ranked (retriever.sparse.METHODS): dense, bm25 or fusion; default: what the
    server's "auto" serves from a datastore with a BM25 index."""
    layout: str = DEFAULT_LAYOUT
    keep_same_neighbours: bool = True
    """Continue the previous span's context when its neighbours come back (the server's default)."""
    neighbour_tokens: int = DEFAULT_NEIGHBOUR_TOKENS
    """Tokens of each neighbour in the context (0: all; RetrievalDefaults.neighbour_tokens)."""
    keep_rank_margin: int = DEFAULT_KEEP_RANK_MARGIN
    """... or while they are among the new k + this many nearest (RetrievalDefaults.keep_rank_margin)."""
    suffix_repeat_tokens: int = context.SUFFIX_REPEAT_TOKENS
    """Suffix layout: latest tokens repeated after the neighbours."""
    knn_lambda: float = DEFAULT_KNN_LAMBDA
    knn_k: int = DEFAULT_KNN_K
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE
    knn_skip_above_prob: float = 1.0
    """Token mode: adaptive retrieval threshold (1: always search)."""
    knn_pointer_min: int = 0
    """Token mode: pointer following minimum (0: off)."""

    def knn(self) -> KnnRequestSettings | None:
        if self.mode not in KNN_MODES:
            return None
        return KnnRequestSettings.from_knn_fields(self)

    def label(self) -> str:
        if self.mode == "none":
            return "model alone"
        speed = (f" skip>{self.knn_skip_above_prob:g}" if self.knn_skip_above_prob < 1 else "") + (
            f" pointers>={self.knn_pointer_min}" if self.knn_pointer_min else "")
        knn = f"token λ={self.knn_lambda:g} k={self.knn_k} T={self.knn_temperature:g}{speed}"
        if self.mode == "token":
            return knn
        layout = "" if self.layout == DEFAULT_LAYOUT else f" {self.layout}"
        keep = (" relaid" if not self.keep_same_neighbours
                else f" keep+{self.keep_rank_margin}" if self.keep_rank_margin != DEFAULT_KEEP_RANK_MARGIN
                else "")
        if self.layout == "suffix" and self.suffix_repeat_tokens != context.SUFFIX_REPEAT_TOKENS:
            keep += f" repeat={self.suffix_repeat_tokens}"
        retriever = "" if self.retriever == "dense" else f" {self.retriever}"  # results before BM25 were dense
        if self.neighbour_tokens:
            retriever += (f" last{self.neighbour_tokens}" if self.neighbour_tokens > 0
                          else f" first{-self.neighbour_tokens}")
        chunk = f"chunk k={self.neighbours} stride={self.stride} query={self.query_tokens}{retriever}{layout}{keep}"
        return chunk if self.mode == "chunk" else f"hybrid: {chunk} + {knn}"


@dataclass
class DocumentScore:
    source: str
    bytes: int
    tokens: int
    nll_nats: float
    retrievals: int = 0
    excluded_neighbours: int = 0
    offset: int = 0
    """Character offset of the scored window in its source (EvalDocument.offset)."""
    prose_bytes: int = 0
    """UTF-8 bytes of the window's prose lines (see MARKUP_LINE)."""
    prose_nll_nats: float = 0.0
    """NLL of the tokens that start on prose lines."""
    token_logprobs: list[float] = field(default_factory=list, repr=False)
    """Log-prob of every scored token, in order (kept out of results JSON: too large to commit)."""
    prose_tokens: list[bool] = field(default_factory=list, repr=False)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / LN2 / self.bytes

    def to_dict(self) -> dict:
        """Its fields (all scalars) but the per-token lists, and bits per byte."""
        row = {name: value for name, value in vars(self).items() if name not in ("token_logprobs", "prose_tokens")}
        return row | {"bits_per_byte": self.bits_per_byte}


def prose_layout(text: str, token_starts: Sequence[int]) -> tuple[list[bool], int]:
    """(whether each token starts on a prose line, UTF-8 bytes of the prose lines). A newline
    belongs to the line it ends."""
    line_starts, prose, prose_bytes, position = [], [], 0, 0
    for line in text.splitlines(keepends=True):
        line_starts.append(position)
        is_prose = MARKUP_LINE.match(line.rstrip("\n")) is None
        prose.append(is_prose)
        prose_bytes += len(line.encode("utf-8")) if is_prose else 0
        position += len(line)
    if not line_starts:
        return [False] * len(token_starts), 0
    return [prose[bisect.bisect_right(line_starts, start) - 1] for start in token_starts], prose_bytes


@dataclass
class EvalResult:
    settings: EvalSettings
    documents: list[DocumentScore]
    retrieval_seconds: float = 0.0
    scoring_seconds: float = 0.0
    engine_prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    """Prompt tokens a server would compute for these contexts: vLLM skips its prefix cache for
    requests that ask for prompt log-probs, so this counts what the cache would have served from
    the previous span's request (whole KV blocks of the shared prefix), as in generation."""
    continued_spans: int = 0
    """Spans whose neighbours were the previous span's, so they continued its context."""

    @property
    def bits_per_byte(self) -> float:
        """Byte-weighted over all documents (total bits / total bytes)."""
        return sum(d.nll_nats for d in self.documents) / LN2 / sum(d.bytes for d in self.documents)

    def to_dict(self) -> dict:
        return {
            "settings": asdict(self.settings),
            "label": self.settings.label(),
            "bits_per_byte": self.bits_per_byte,
            "documents": len(self.documents),
            "bytes": sum(d.bytes for d in self.documents),
            "tokens": sum(d.tokens for d in self.documents),
            "retrievals": sum(d.retrievals for d in self.documents),
            "excluded_neighbours": sum(d.excluded_neighbours for d in self.documents),
            "retrieval_seconds": self.retrieval_seconds,
            "scoring_seconds": self.scoring_seconds,
            "engine_prompt_tokens": self.engine_prompt_tokens,
            "computed_prompt_tokens": self.computed_prompt_tokens,
            "continued_spans": self.continued_spans,
            "prose_bits_per_byte": (sum(d.prose_nll_nats for d in self.documents) / LN2
                                    / max(1, sum(d.prose_bytes for d in self.documents))),
            "prose_bytes": sum(d.prose_bytes for d in self.documents),
            "per_document": [d.to_dict() for d in self.documents],
        }


@dataclass
class _Span:
    document: int
    start: int
    end: int
    neighbours: list = field(default_factory=list)
    candidates: list = field(default_factory=list)
    """The k + keep_rank_margin nearest (neighbours are the first k)."""


RetrieveFn = Callable[[list[str], int, str], list[list]]
"""(query texts, k, retriever method) -> neighbours per query (retriever.datastore.Neighbour-like,
with .source); Datastore.search_texts is one."""


class Evaluator:
    """Scores documents with one engine; `retrieve` searches the datastore (None: mode none only)."""

    def __init__(self, engine: Engine, retrieve: RetrieveFn | None = None, max_doc_chars: int = 4096,
                 concurrency: int = 16, exclusion_margin: int = 8, progress: bool = True):
        self.engine = engine
        self.progress = progress
        """Show a tqdm bar of scored tokens (stderr)."""
        self.retrieve = retrieve
        self.max_doc_chars = max_doc_chars
        self.concurrency = concurrency
        self.exclusion_margin = exclusion_margin
        tokenizer = engine.tokenizer
        self.start_ids = document_start_ids(tokenizer)
        self.separator_ids = context.separator_ids(tokenizer)
        self.last_plan: list[_Span] = []
        """Spans of the last `evaluate` with the neighbours each was scored with (inspection)."""

    def tokenize(self, document: EvalDocument) -> tuple[str, list[int], list[int]]:
        """(scored text, its token ids, each token's start character)."""
        text = document.text[: self.max_doc_chars]
        encoded = self.engine.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return text, encoded["input_ids"], [start for start, _ in encoded["offset_mapping"]]

    async def _prompt_logprobs(self, prompt_ids: list[int], scored: int, request_id: str,
                               knn: KnnRequestSettings | None = None) -> list[float]:
        """Log-probs of the last `scored` prompt tokens (the kNN mixture, if any, only where they
        are predicted: from the row before the first of them)."""
        if knn is not None:
            knn = dataclasses.replace(knn, mix_from_position=len(prompt_ids) - scored - 1)
        sampling = SegmentSampling(max_tokens=1, prompt_logprobs=True, knn=knn)
        values = None
        async for delta in self.engine.generate_segment(prompt_ids, sampling, request_id):
            if delta.prompt_logprobs is not None:
                values = delta.prompt_logprobs
        if values is None:
            raise RuntimeError("the engine returned no prompt log-probs")
        tail = values[len(prompt_ids) - scored:]
        if any(v is None for v in tail):
            raise RuntimeError("a scored position has no log-prob")
        return [float(v) for v in tail]

    def _plan(self, tokens: list[list[int]], settings: EvalSettings) -> list[_Span]:
        spans = []
        for index, ids in enumerate(tokens):
            if settings.mode not in CHUNK_MODES or not ids:
                spans.append(_Span(index, 0, len(ids)))
                continue
            for start in range(0, len(ids), settings.stride):
                spans.append(_Span(index, start, min(start + settings.stride, len(ids))))
        return spans

    def _attach_neighbours(self, spans: list[_Span], tokens, documents, settings, scores) -> None:
        """One batched search for every span that has a preceding query (all documents at once)."""
        queried = [s for s in spans if s.start > 0 and settings.mode in CHUNK_MODES]
        if not queried:
            return
        if self.retrieve is None:
            raise ValueError("chunk mode needs a datastore to retrieve from")
        decode = self.engine.tokenizer.decode
        queries = [decode(tokens[s.document][max(0, s.start - settings.query_tokens): s.start],
                          skip_special_tokens=True) for s in queried]
        fetched = context.candidate_count(settings.neighbours, settings.keep_same_neighbours,
                                          settings.keep_rank_margin)
        results = self.retrieve(queries, fetched + self.exclusion_margin, settings.retriever)
        for span, found in zip(queried, results):
            source = source_key(documents[span.document].source)
            kept = [n for n in found if source_key(n.source) != source]
            scores[span.document].excluded_neighbours += len(found) - len(kept)
            scores[span.document].retrievals += 1
            span.neighbours = kept[: settings.neighbours]
            span.candidates = kept[:fetched]

    async def evaluate(self, documents: Sequence[EvalDocument], settings: EvalSettings) -> EvalResult:
        texts, tokens, starts = zip(*(self.tokenize(d) for d in documents)) if documents else ((), (), ())
        scores = []
        for document, text, ids, token_starts in zip(documents, texts, tokens, starts):
            prose, prose_bytes = prose_layout(text, token_starts)
            scores.append(DocumentScore(document.source, len(text.encode("utf-8")), len(ids), 0.0,
                                        offset=document.offset, prose_bytes=prose_bytes,
                                        token_logprobs=[0.0] * len(ids), prose_tokens=prose))
        spans = self._plan(list(tokens), settings)
        self.last_plan = spans
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._attach_neighbours, spans, tokens, documents, settings, scores)
        retrieval_seconds = time.perf_counter() - started

        contexts = self._contexts(spans, tokens, settings)
        prompts = [c.token_ids + tokens[s.document][s.start: s.end] for s, c in zip(spans, contexts)]
        limit = asyncio.Semaphore(self.concurrency)
        progress = tqdm(total=sum(s.end - s.start for s in spans), unit="tok", desc=settings.label(),
                        mininterval=10, disable=not self.progress)

        async def score(number: int, span: _Span, prompt: list[int]) -> None:
            async with limit:
                logprobs = await self._prompt_logprobs(prompt, span.end - span.start, f"eval-{id(self)}-{number}",
                                                       settings.knn())
            document = scores[span.document]
            document.token_logprobs[span.start: span.end] = logprobs
            document.nll_nats -= sum(logprobs)
            document.prose_nll_nats -= sum(lp for lp, prose in zip(logprobs, document.prose_tokens[span.start:])
                                           if prose)
            progress.update(span.end - span.start)

        started = time.perf_counter()
        with progress:
            await asyncio.gather(*(score(n, s, p) for n, (s, p) in enumerate(zip(spans, prompts))
                                   if s.end > s.start))
        return EvalResult(settings, scores, retrieval_seconds, time.perf_counter() - started,
                          sum(len(p) for p in prompts), self._computed_tokens(spans, prompts),
                          sum(c.continued for c in contexts))

    def _computed_tokens(self, spans: list[_Span], prompts: list[list[int]]) -> int:
        """Prompt tokens left after the whole KV blocks each prompt shares with the previous span's
        prompt of its document (what the server's prefix cache serves in generation)."""
        block = self.engine.config.block_size
        computed = 0
        for index, (span, prompt) in enumerate(zip(spans, prompts)):
            shared = 0
            if index and spans[index - 1].document == span.document:
                previous = prompts[index - 1]
                limit = min(len(previous), len(prompt) - 1)  # vLLM recomputes at least the last token
                while shared < limit and previous[shared] == prompt[shared]:
                    shared += 1
            computed += len(prompt) - shared // block * block
        return computed

    def _contexts(self, spans: list[_Span], tokens, settings: EvalSettings) -> list[context.BuiltContext]:
        """Each span's context, built in document order with the generation loop's `next_context`:
        the document so far is the prompt, as if a client had sent it and asked for the next
        `stride` tokens, and a span whose neighbours are its predecessor's continues that context."""
        contexts: list[context.BuiltContext] = []
        previous: _Span | None = None
        for span in spans:
            ids = tokens[span.document]
            same_document = previous is not None and previous.document == span.document
            contexts.append(context.next_context(
                contexts[-1] if same_document else None,
                ids[previous.start: previous.end] if same_document else [],
                ids[: span.start], [], span.neighbours, self.separator_ids,
                self.engine.max_model_len - (span.end - span.start) - 1, layout=settings.layout,
                prefix_ids=self.start_ids, keep_same_neighbours=settings.keep_same_neighbours,
                candidates=span.candidates, repeat_tokens=settings.suffix_repeat_tokens,
                neighbour_tokens=settings.neighbour_tokens,
            ))
            if contexts[-1].continued and settings.keep_rank_margin:
                span.neighbours = previous.neighbours  # the ones its context holds
            previous = span
        return contexts


def share_of_tokens_worse(base: EvalResult, other: EvalResult) -> float:
    """Fraction of scored tokens whose log-prob is lower under `other` than under `base` (the same
    documents and tokenizer)."""
    pairs = [(b, o) for db, do in zip(base.documents, other.documents)
             for b, o in zip(db.token_logprobs, do.token_logprobs, strict=True)]
    return sum(o < b for b, o in pairs) / max(1, len(pairs))


def paired_bootstrap(base: Sequence[dict], other: Sequence[dict], samples: int = 10_000,
                     seed: int = 0, nll: str = "nll_nats", size: str = "bytes") -> dict:
    """Relative change of byte-weighted bits per byte from `base` to `other` (per-document score
    dicts of the same documents, in the same order: EvalResult.to_dict()["per_document"]) with a
    95% percentile interval from resampling source documents with replacement (the unit that
    varies: windows of one source are summed first, since they are not independent). `nll` and
    `size` name the fields scored (prose_nll_nats / prose_bytes: the prose-only figure)."""
    import numpy as np

    if [(d["source"], d.get("offset", 0)) for d in base] != [(d["source"], d.get("offset", 0)) for d in other]:
        raise ValueError("paired_bootstrap needs the same documents in the same order")
    sources = {source: number for number, source in enumerate(dict.fromkeys(d["source"] for d in base))}
    group = np.array([sources[d["source"]] for d in base], dtype=np.int64)

    def per_source(key: str, rows: Sequence[dict]):
        return np.bincount(group, weights=[d[key] for d in rows], minlength=len(sources)).astype(np.float64)

    size, nll_base, nll_other = per_source(size, base), per_source(nll, base), per_source(nll, other)
    draws = np.random.default_rng(seed).integers(0, len(sources), size=(samples, len(sources)))
    changes = nll_other[draws].sum(axis=1) / nll_base[draws].sum(axis=1) - 1.0
    low, high = np.percentile(changes, [2.5, 97.5])
    worse = int(np.sum(nll_other / size > nll_base / size))
    return {"change": float(nll_other.sum() / nll_base.sum() - 1.0), "low": float(low), "high": float(high),
            "documents": len(sources), "documents_worse": worse}


def ngram_overlap(heldout_tokens: Sequence[Sequence[int]], datastore_tokens: Sequence[Sequence[int]],
                  n: int = OVERLAP_NGRAM) -> dict:
    """Share of held-out token n-grams found verbatim in the datastore, overall and worst document."""
    seen = set()
    for ids in datastore_tokens:
        for i in range(len(ids) - n + 1):
            seen.add(hash(tuple(ids[i: i + n])))
    per_document = []
    total = hits = 0
    for ids in heldout_tokens:
        grams = [hash(tuple(ids[i: i + n])) for i in range(len(ids) - n + 1)]
        found = sum(1 for g in grams if g in seen)
        per_document.append(found / len(grams) if grams else 0.0)
        total += len(grams)
        hits += found
    return {
        "ngram": n,
        "overlap": hits / total if total else 0.0,
        "max_document_overlap": max(per_document, default=0.0),
        "per_document": per_document,
    }
