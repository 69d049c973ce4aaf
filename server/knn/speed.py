"""kNN-LM speed techniques as small functions of numpy/FAISS arrays (torch only for adaptive retrieval).

server/knn/model.py calls these inside vLLM's engine process; tests/test_knn_speed.py checks them
on small seeded data without vLLM.

- Adaptive retrieval (`confident_rows`): a row whose LM max next-token probability exceeds its
  threshold keeps the plain LM distribution and is not searched.
- Pointer following (RetoMaton, Alon et al. 2022; `follow_pointers`, `find_neighbours`): the
  neighbours of the previous position whose value (next token) equals the token actually observed
  are advanced along `next.npy` (the entry that follows them in the corpus); when at least
  `pointer_min` remain they are this position's neighbours, with distances recomputed exactly
  against the current query from the stored keys (`KeyDistances`), and no search runs. A search
  seeds the pointer set with its `pointer_pool` nearest entries (>= k; only the k nearest enter
  the distribution), and every followed entry stays in the set, not only the k nearest, so the
  set thins out by mismatches alone; RetoMaton seeds from its search's k = 1024 the same way.
- Greedy-merge counts (Efficient kNN-LM, He et al. 2021; `log_counts`): a merged entry stands for
  `count` original entries; its kNN score gains log(count), i.e. weight ∝ count·exp(-d/T).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

PAD_DISTANCE = np.float32(np.finfo(np.float32).max)
"""Distance of padding neighbours (id -1), as FAISS pads a search with fewer than k results."""


# -- adaptive retrieval ---------------------------------------------------------------------------


def max_probability(logits):
    """max_v softmax(logits)[v] per row, fp32, computed as exp(max - logsumexp) (no [B, V] softmax)."""
    import torch

    x = logits.float()
    return torch.exp(x.amax(dim=-1) - torch.logsumexp(x, dim=-1))


def confident_rows(logits, thresholds):
    """Bool [B]: rows whose max probability is strictly above their threshold (skip their search).
    A threshold >= 1 never skips (a probability is at most 1)."""
    import torch

    thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=logits.device)
    return max_probability(logits) > thresholds


# -- count weighting ------------------------------------------------------------------------------


def log_counts(counts: np.ndarray | None, ids: np.ndarray) -> np.ndarray | None:
    """log(count) of each neighbour (0 for padding ids < 0); None when the datastore has no counts
    (every entry counts once, and the mixture stays exactly the unweighted one)."""
    if counts is None:
        return None
    ids = np.asarray(ids, dtype=np.int64)
    found = np.where(ids >= 0, counts[np.clip(ids, 0, None)], 1)
    return np.log(found.astype(np.float64)).astype(np.float32)


# -- pointers -------------------------------------------------------------------------------------


@dataclass
class PointerState:
    """The neighbours one sequence used at one position: what the next position follows."""

    position: int
    """Sequence position of the row these neighbours were found for."""
    ids: np.ndarray
    """int64 entry ids (no padding)."""
    step: int
    """Engine step (forward call) that recorded them."""
    radius: float = np.inf
    """Squared distance of the k-th neighbour of the sequence's last search (the pointer gate)."""


def follow_pointers(previous_ids: np.ndarray, values: np.ndarray, next_ids: np.ndarray, token: int) -> np.ndarray:
    """Entries that follow the previous neighbours whose next token is `token` (the token observed
    after them), without duplicates (after a greedy merge several entries may point to one);
    document ends (-1) are dropped."""
    previous = np.asarray(previous_ids, dtype=np.int64)
    previous = previous[previous >= 0]
    matching = previous[values[previous] == token]
    following = np.asarray(next_ids[matching], dtype=np.int64)
    return np.unique(following[following >= 0])


class KeyDistances:
    """Exact squared L2 distances between full-size queries and stored keys, in the index's space.

    An `IndexPreTransform` (PCA at build) is unwrapped: queries go through its transforms and keys
    are reconstructed from the inner index, so distances equal those a search reports. IVF indexes
    get a direct map (8 bytes per entry, built here) so ids can be reconstructed; compressed codes
    (PQ, SQ) reconstruct to their decoded vectors, which is also what their search measures
    against. Index types that cannot reconstruct are refused with a ValueError naming them.
    """

    def __init__(self, index):
        self.transforms = []
        inner = faiss.downcast_index(index)
        if isinstance(inner, faiss.IndexPreTransform):
            self.transforms = [faiss.downcast_VectorTransform(inner.chain.at(i)) for i in range(inner.chain.size())]
            inner = faiss.downcast_index(inner.index)
        ivf = faiss.try_extract_index_ivf(inner)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()
        self.inner = inner
        if inner.ntotal:
            try:
                inner.reconstruct_batch(np.zeros(1, dtype=np.int64))
            except RuntimeError as error:
                raise ValueError(
                    f"pointer following needs keys it can reconstruct, but the token datastore's index "
                    f"{type(inner).__name__} cannot ({error}); rebuild with --index Flat (or IVF/PQ), or "
                    "serve with pointer_min 0"
                ) from error

    def to_index_space(self, queries: np.ndarray) -> np.ndarray:
        """Queries [n, dim] float32 through the index's transforms (PCA), [n, index dim]."""
        out = np.ascontiguousarray(queries, dtype=np.float32)
        for transform in self.transforms:
            out = transform.apply(out)
        return out

    def distances(self, query: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Squared L2 float32 [len(ids)] between one query already in index space and keys `ids`."""
        if len(ids) == 0:
            return np.zeros(0, dtype=np.float32)
        keys = self.inner.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        diff = keys.astype(np.float64) - np.asarray(query, dtype=np.float64)[None, :]
        return np.einsum("ij,ij->i", diff, diff).astype(np.float32)


def nearest_of(keys: KeyDistances, query: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances [k], ids [k]) of the k candidates closest to `query` (index space), sorted as a
    search sorts them (ascending distance, then id); padded with (PAD_DISTANCE, -1)."""
    distances = keys.distances(query, candidates)
    order = np.lexsort((candidates, distances))[:k]
    out_d = np.full(k, PAD_DISTANCE, dtype=np.float32)
    out_i = np.full(k, -1, dtype=np.int64)
    out_d[: len(order)] = distances[order]
    out_i[: len(order)] = candidates[order]
    return out_d, out_i


@dataclass
class Neighbours:
    """Neighbours per row of one engine step and how each row got them."""

    distances: np.ndarray
    """float32 [n, k_max] squared L2 (PAD_DISTANCE for padding)."""
    ids: np.ndarray
    """int64 [n, k_max] entry ids, -1 padding (rows asking fewer than k_max neighbours are padded)."""
    searched: np.ndarray
    """bool [n]: the row needed a search (False: its neighbours came from pointers)."""
    pointer_sets: dict[int, np.ndarray]
    """row -> the entry ids the row's next position follows (pointer rows only): a searched row's
    `pointer_pool` nearest, a followed row's whole candidate set, nearest first."""
    radii: dict[int, float]
    """row -> squared distance of the k-th neighbour of the chain's last search (pointer rows)."""
    searches: int = 0
    """FAISS search calls made (each over a batch of rows)."""


def find_neighbours(store, queries: np.ndarray, k: np.ndarray, pointer_min: np.ndarray, chain: np.ndarray,
                    tokens: np.ndarray, start_ids: dict, keys: KeyDistances | None = None,
                    prefetch: int = 64, pointer_pool: int = 0, pointer_radius: float = 0.0,
                    start_radius: dict | None = None) -> Neighbours:
    """Neighbours of every row, following pointers where a row's `pointer_min` > 0 allows it.

    store: a TokenDatastore (search, values, next_ids). queries: float32 [n, dim] full size.
    k, pointer_min: int [n] per row. pointer_pool: how many of a search's nearest seed a row's
    pointer set (at least the row's k; 0: k). chain: int [n]: rows with equal chain are consecutive
    positions of one sequence, in increasing order (a request's prompt-log-prob rows, or its one
    decode row). tokens: int [n], the token observed at each row's position (its input token), the
    one the previous position's neighbours must have predicted. start_ids: chain -> the neighbour
    ids of the position just before the chain's first row (absent or None: unknown, search).

    Rows without pointers (pointer_min 0) are searched in one batch. Pointer rows are visited in
    waves (the i-th row of every chain), since each row follows the previous row's neighbours; a
    row that must search fetches up to `prefetch` of its chain's next rows in the same FAISS call,
    used only if those rows then need a search too (a speed-up for long prompts: `searched` counts
    the rows that needed one, not the rows fetched).

    pointer_radius > 0 gates pointers by distance: a row follows only when at least `pointer_min`
    candidates lie within pointer_radius x the squared distance of the k-th neighbour of its chain's
    last search (`start_radius`: chain -> that distance from an earlier step), i.e. where the
    followed entries would have been among a search's neighbours; pointers that have drifted to
    text unlike the query's search instead of standing in for a search with worse neighbours.
    """
    n = len(queries)
    k = np.asarray(k, dtype=np.int64)
    pointer_min = np.asarray(pointer_min, dtype=np.int64)
    k_max = int(k.max()) if n else 1
    rows = _Rows(store, queries, k, Neighbours(np.full((n, k_max), PAD_DISTANCE, dtype=np.float32),
                                               np.full((n, k_max), -1, dtype=np.int64), np.zeros(n, dtype=bool),
                                               {}, {}))
    plain = np.nonzero(pointer_min <= 0)[0]
    if len(plain):
        distances, ids = rows.search(plain, k_max)
        for j, row in enumerate(plain):
            rows.keep(row, distances[j], ids[j])
        rows.result.searched[plain] = True
    pointer_rows = np.nonzero(pointer_min > 0)[0]
    if len(pointer_rows):
        if keys is None:
            raise ValueError("pointer following needs KeyDistances over the datastore's index")
        _walk_chains(rows, pointer_rows, keys, pointer_min, np.maximum(k, pointer_pool), chain, tokens, start_ids,
                     prefetch, pointer_radius, start_radius or {})
    return rows.result


@dataclass
class _Rows:
    """The rows of one find_neighbours call and what it has found for them so far."""

    store: object
    queries: np.ndarray
    k: np.ndarray
    result: Neighbours

    def search(self, rows, width: int) -> tuple[np.ndarray, np.ndarray]:
        found = self.store.search(self.queries[rows], width)
        self.result.searches += 1
        return found.distances, found.ids

    def keep(self, row, distances, ids) -> None:
        self.result.distances[row, : self.k[row]] = distances[: self.k[row]]
        self.result.ids[row, : self.k[row]] = ids[: self.k[row]]


def _walk_chains(rows: _Rows, pointer_rows: np.ndarray, keys: KeyDistances, pointer_min: np.ndarray,
                 pool: np.ndarray, chain: np.ndarray, tokens: np.ndarray, start_ids: dict, prefetch: int,
                 pointer_radius: float, start_radius: dict) -> None:
    """The pointer rows of find_neighbours, in waves: the i-th row of every chain follows the
    neighbours of the (i-1)-th, or searches (with up to `prefetch` of its chain's next rows)."""
    result, k, searched = rows.result, rows.k, rows.result.searched
    chains: dict[int, list[int]] = {}
    for row in pointer_rows:
        chains.setdefault(int(chain[row]), []).append(int(row))
    in_space = keys.to_index_space(rows.queries[pointer_rows])
    space_row = {int(row): j for j, row in enumerate(pointer_rows)}
    previous = {c: (None if start_ids.get(c) is None else np.asarray(start_ids[c], dtype=np.int64)) for c in chains}
    radius = {c: start_radius.get(c, np.inf) for c in chains}
    fetched: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    wave = 0
    while heads := [(c, chain_rows[wave]) for c, chain_rows in chains.items() if wave < len(chain_rows)]:
        must_search = []
        for c, row in heads:
            if previous[c] is not None:
                candidates = follow_pointers(previous[c], rows.store.values, rows.store.next_ids, int(tokens[row]))
                if len(candidates) >= pointer_min[row]:
                    distances, ids = nearest_of(keys, in_space[space_row[row]], candidates,
                                                max(int(k[row]), len(candidates)))
                    near = ((distances[ids >= 0] <= pointer_radius * radius[c]).sum() if pointer_radius > 0
                            else len(candidates))
                    if near >= pointer_min[row]:
                        rows.keep(row, distances, ids)
                        previous[c] = result.pointer_sets[row] = ids[ids >= 0]
                        result.radii[row] = radius[c]
                        continue
            searched[row] = True
            if row not in fetched:
                must_search.append((c, row))
        if must_search:
            batch = []
            for c, row in must_search:
                batch += [r for r in chains[c][wave: wave + max(1, prefetch)] if r not in fetched]
            distances, ids = rows.search(np.asarray(batch), int(pool[batch].max()))
            for j, row in enumerate(batch):
                fetched[row] = (distances[j], ids[j])
        for c, row in heads:
            if searched[row]:
                distances, ids = fetched.pop(row)
                rows.keep(row, distances, ids)
                seeds = ids[: pool[row]]
                previous[c] = result.pointer_sets[row] = seeds[seeds >= 0]
                used = distances[: k[row]][ids[: k[row]] >= 0]
                radius[c] = result.radii[row] = float(used.max()) if len(used) else np.inf
        wave += 1
