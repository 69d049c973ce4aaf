"""Choose, validate, train and fill the FAISS index of a datastore.

Chunk datastores use the inner-product metric on L2-normalised embeddings (cosine); token datastores
use squared L2 between hidden states (`metric="l2"`). PCA, when asked for,
becomes the first element of the chain (`IndexPreTransform(PCAMatrix, index)`), so the server always
queries with raw 384-d embeddings. The PCAMatrix is trained as usual (centred covariance) but its
bias (the `-A @ mean` offset) is then zeroed: with the offset, inner products after the transform
would carry a per-entry term `-<mean, y>` that changes the ranking, while a pure projection keeps
`<Ax, Ay>` close to `<x, y>` along the kept directions.
"""

from __future__ import annotations

import logging
import math
import time

import faiss
import numpy as np

from datastore_tools.errors import DatastoreToolError

log = logging.getLogger(__name__)

FLAT_BELOW = 20_000
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per IVF centroid
FACTORY_EXAMPLES = "Flat, HNSW32,Flat, IVF256,Flat, IVF512,PQ96, OPQ96,IVF512,PQ96, IVF256,SQ8"
DEFAULT_EF_SEARCH = 64
DEFAULT_REFINE_K_FACTOR = 4
"""A refined index (`...,RFlat`: compressed codes, then exact distances from stored vectors)
re-ranks k x this many candidates (bench/bench_token_search.py measured the choice)."""


def choose_factory(n: int, dim: int) -> str:
    """The index used when `--index` is not given, by number of vectors `n` and dimension `dim`.

    - below 20k vectors: `Flat`. Exact search over 20k x 384 floats takes ~1 ms per query on a
      modest CPU, so compression buys nothing and exactness is free.
    - otherwise: `IVF{nlist},PQ{dim}x4fs`: one 4-bit code per dimension, scanned with FAISS's
      SIMD fast-scan; nlist the power of two nearest sqrt(n), reduced until every centroid gets
      >= 39 training vectors; searched with nprobe = nlist/8 (default_search_params). Measured on
      the Python docs' embeddings extended to 100k (bench/bench_index_choices.py, idle Zen 4):
      IVF256,PQ384x4fs recall@10 0.903, batch-32 p50 3.7 ms, 212 B/entry (7.2x fewer than Flat);
      8-bit IVF1024,PQ192 needs 12 ms for the same recall, and IVF1024,PQ96 (124 B) reaches 0.82.
      Odd dimensions (fast-scan packs codes in pairs) get `IVF{nlist},SQ8`.
    """
    if n < FLAT_BELOW:
        return "Flat"
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    while nlist > 1 and n < MIN_POINTS_PER_CENTROID * nlist:
        nlist //= 2
    return f"IVF{nlist},PQ{dim}x4fs" if dim % 2 == 0 else f"IVF{nlist},SQ8"


METRICS = {"inner_product": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
"""Chunk datastores search cosines (inner product of normalised embeddings); token datastores
search squared L2 distances between hidden states, as kNN-LM does."""


def _parse(factory: str, dim: int, metric: str = "inner_product") -> faiss.Index:
    if metric not in METRICS:
        raise DatastoreToolError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    try:
        return faiss.index_factory(dim, factory, METRICS[metric])
    except RuntimeError as error:
        reason = str(error).strip().rsplit(": ", 1)[-1] if str(error).strip() else "unparsable"
        raise DatastoreToolError(
            f"unknown or invalid FAISS index factory {factory!r} for {dim}-d vectors ({reason}); "
            f"examples: {FACTORY_EXAMPLES}"
        ) from error


def _quantizers(index: faiss.Index) -> list:
    """Product quantizers inside `index` (IVF-PQ or plain PQ) for training-size checks and seeding."""
    found = []
    for candidate in (index, faiss.try_extract_index_ivf(index)):
        if candidate is None:
            continue
        candidate = faiss.downcast_index(candidate)
        if hasattr(candidate, "pq"):
            found.append(candidate.pq)
    return found


def default_search_params(index: faiss.Index) -> dict:
    """Search-time knobs stored in the manifest: nprobe for IVF, efSearch for HNSW, k_factor_rf
    for a refined index (FAISS ParameterSpace names), none otherwise."""
    params = {}
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexRefine):
        params["k_factor_rf"] = DEFAULT_REFINE_K_FACTOR
        outer = faiss.downcast_index(outer.base_index)
    ivf = faiss.try_extract_index_ivf(outer)
    if ivf is not None:
        params["nprobe"] = int(min(ivf.nlist, max(8, ivf.nlist // 8)))
    elif "HNSW" in type(outer).__name__:
        params["efSearch"] = DEFAULT_EF_SEARCH
    return params


def validate(factory: str, dim: int, n: int, pca_dim: int | None, metric: str = "inner_product") -> None:
    """Fail before any slow work on a factory, PCA size or training-set size that cannot work."""
    if pca_dim is not None:
        if not 1 <= pca_dim < dim:
            raise DatastoreToolError(
                f"--pca {pca_dim} must be between 1 and {dim - 1}: PCA only reduces the {dim}-d "
                f"embeddings (e.g. --pca 128), or leave --pca out"
            )
        if n <= pca_dim:
            raise DatastoreToolError(
                f"--pca {pca_dim} needs more than {pca_dim} vectors to train, the corpus has {n} "
                f"chunks; use a smaller --pca or none"
            )
    index_dim = pca_dim or dim
    index = _parse(factory, index_dim, metric)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and n < ivf.nlist:
        fit = 2 ** max(0, int(math.log2(max(1, n // MIN_POINTS_PER_CENTROID))))
        raise DatastoreToolError(
            f"too few vectors to train {factory!r}: IVF{ivf.nlist} needs at least {ivf.nlist} "
            f"({MIN_POINTS_PER_CENTROID * ivf.nlist} recommended) but the corpus has {n} chunks; "
            f"use a smaller nlist (e.g. IVF{fit},...) or --index Flat"
        )
    for pq in _quantizers(index):
        need = 1 << pq.nbits
        if n < need:
            raise DatastoreToolError(
                f"too few vectors to train {factory!r}: its {pq.nbits}-bit product quantizer needs "
                f"at least {need} training vectors but the corpus has {n} chunks; use fewer bits "
                f"(e.g. PQ{pq.M}x4), a scalar quantizer (SQ8) or --index Flat"
            )
    if ivf is not None and n < MIN_POINTS_PER_CENTROID * ivf.nlist:
        log.warning(
            "%s: %d vectors for %d centroids (< %d per centroid); clusters will be poor",
            factory, n, ivf.nlist, MIN_POINTS_PER_CENTROID,
        )


def _seed(index: faiss.Index, seed: int) -> None:
    """Seed k-means and PQ training; switch off polysemous training (an annealing of code order
    that only polysemous Hamming filtering uses, which we do not, and that takes minutes)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    for pq in _quantizers(index):
        pq.cp.seed = seed + 1
    for candidate in (index, ivf):
        if candidate is not None:
            candidate = faiss.downcast_index(candidate)
            if hasattr(candidate, "do_polysemous_training"):
                candidate.do_polysemous_training = False


def build_index(
    vectors: np.ndarray,
    factory: str,
    pca_dim: int | None = None,
    seed: int = 1234,
    search_params: dict | None = None,
    metric: str = "inner_product",
) -> tuple[faiss.Index, dict]:
    """Train and fill an index over `vectors` (float32 [n, d]); ids are row numbers.

    Returns the index and a manifest fragment: {"index": ..., "pca": ..., "dims": ..., "seconds": ...}.
    Training is seeded and HNSW insertion runs single-threaded, so equal inputs give equal bytes.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    validate(factory, dim, n, pca_dim, metric)
    index_dim = pca_dim or dim
    inner = _parse(factory, index_dim, metric)
    _seed(inner, seed)
    pca_info = None
    started = time.perf_counter()
    if pca_dim is not None:
        pca = faiss.PCAMatrix(dim, pca_dim)
        pca.train(vectors)
        eigenvalues = faiss.vector_to_array(pca.eigenvalues)
        variance_kept = float(eigenvalues[:pca_dim].sum() / eigenvalues.sum())
        faiss.copy_array_to_vector(np.zeros(pca_dim, dtype=np.float32), pca.b)
        pca_info = {"dim": pca_dim, "variance_kept": round(variance_kept, 6)}
        train_input = pca.apply(vectors)
    else:
        train_input = vectors
    try:
        if not inner.is_trained:
            inner.train(train_input)
    except RuntimeError as error:
        raise DatastoreToolError(f"training {factory!r} on {n} vectors failed: {error}; try --index Flat") from error
    # The python wrapper keeps `pca` and `inner` alive as long as the chain (referenced_objects).
    index = faiss.IndexPreTransform(pca, inner) if pca_dim is not None else inner
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    hnsw = "HNSW" in factory.upper()
    threads = faiss.omp_get_max_threads()
    if hnsw:
        faiss.omp_set_num_threads(1)  # parallel HNSW insertion is order-dependent, hence not reproducible
    try:
        index.add(vectors)
    finally:
        if hnsw:
            faiss.omp_set_num_threads(threads)
    add_seconds = time.perf_counter() - started
    params = dict(default_search_params(inner))
    # Only knobs this index has: a source's k_factor_rf or nprobe must not reach an index without them.
    params.update({key: value for key, value in (search_params or {}).items() if value is not None and key in params})
    info = {
        "index": {"factory": factory, "metric": metric, "search_params": params},
        "pca": pca_info,
        "dims": {"embedding": dim, "index": index_dim},
        "seconds": {"train": train_seconds, "add": add_seconds},
    }
    return index, info
