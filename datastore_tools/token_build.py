"""`datastore build --mode token`: documents -> hidden states of the served model -> kNN-LM datastore.

Keys are the final hidden states (after the last RMSNorm: the vectors the logits are computed
from) of the *served* weights at every corpus position; the value of position t is token t+1.
They are computed with HF transformers on the exact weights vLLM serves: for a GPTQ checkpoint the
dense copy of artefacts/checkpoint.py (dequantized 4-bit codes, which fp32 holds exactly, so the same
function as the 4-bit model), in the activation dtype the server uses on this machine (bf16 on
AVX-512 CPUs and GPUs, fp32 where the server serves the dense copy). tests/test_knn_serving.py
checks that build-time keys and serving-time queries agree (cosine >= 0.99). HF rather than the engine itself because only the hidden states are needed: no
vocabulary projection and no log-softmax per position, which is what makes engine prompt scoring
slow on this CPU.

Each document is tokenized exactly as `retroserve eval` scores it: the document-start token first
(artefacts/tokenizer.py `document_start_ids`), then the text without special tokens, so a key at
position t has seen the same context the server sees when it scores that position. Documents
longer than `window` tokens are run in windows that advance by `stride`; a window after the first
keeps only its last `stride` positions, so every key has at least `window - stride` tokens of
context.

Resumability: keys are checkpointed per document in `<output>.building/shards/doc-NNNNNN.npy`,
keyed by everything that determines them (model fingerprint, token ids, window, stride); re-running
the same command reuses finished documents. Publishing is atomic (datastore_tools/publish.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from datastore_tools import chunking, index_factory, ingest, publish
from datastore_tools.errors import DatastoreToolError
from datastore_tools.manifest import write_manifest
from retriever import fingerprints
from retriever import format as fmt
from retriever import token_datastore as tds

log = logging.getLogger(__name__)

KEY_DTYPES = ("float32", "bfloat16", "float16")
"""Activation dtypes a token build can compute keys in (`--key-dtype`)."""

FLAT_BELOW = 20_000
"""Flat (exact) search below this many entries. Above it a Flat scan is what a kNN-LM step waits on:
FAISS scans every key once per query for batches under 20 queries (no BLAS), 511 ms for 16 queries
over 158,841 keys on one core (bench/bench_token_search.py), so the default is choose_factory's
fast scan with exact re-ranking. (On a GPU, `--index Flat` is searched by the torch kernel.)"""


@dataclass
class TokenBuildConfig:
    output: Path
    """Directory the token datastore is published to."""
    model_dir: Path
    """The served model directory (prepared checkpoint); keys are its hidden states."""
    inputs: list[Path] = field(default_factory=list)
    default_corpus: bool = False
    """Also ingest `pydoc_data.topics` (the Python language reference)."""
    index: str | None = None
    """FAISS factory string (L2 metric); None: Flat below FLAT_BELOW entries, else IVF with 4-bit
    fast-scan codes re-ranked with the exact keys (choose_factory)."""
    pca: int | None = None
    """Reduce keys to this many dims with PCA inside the index chain (queries stay full size)."""
    nprobe: int | None = None
    seed: int = 1234
    window: int = 1024
    """Most tokens the model sees at once when computing keys."""
    key_dtype: str = "auto"
    """Activation dtype of the key computation: "auto" the one the server serves in on this machine
    (keys then carry the queries' rounding), or one of KEY_DTYPES. float32 on a CPU that serves bf16
    without native bf16 instructions (no avx512_bf16, no AMX) computes keys 2.7x faster there."""
    stride: int = 512
    """How far a window advances in a long document (new keys per window)."""
    jsonl_field: str = "text"
    on_undecodable: str = "skip"
    force: bool = False
    name: str | None = None
    progress: bool = True
    stop_after_documents: int | None = None
    """Test hook: raise after computing this many documents' keys, imitating a killed build."""

    def __post_init__(self) -> None:
        if self.key_dtype != "auto" and self.key_dtype not in KEY_DTYPES:
            raise DatastoreToolError(f"key_dtype={self.key_dtype!r} must be 'auto' or one of {KEY_DTYPES}")
        if not 1 <= self.stride <= self.window:
            raise DatastoreToolError(f"stride={self.stride} must be in [1, window={self.window}]")


@dataclass
class TokenBuildResult:
    path: Path
    manifest: dict


class SimulatedInterruption(RuntimeError):
    """Raised by the test hook `stop_after_documents`."""


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, keep_from) per forward pass over `length` tokens: positions [keep_from, end)
    of the pass [start, end) become keys. Covers every position exactly once."""
    if length <= window:
        return [(0, length, 0)]
    spans = [(0, window, 0)]
    covered = window
    while covered < length:
        end = min(length, covered + stride)
        start = max(0, end - window)
        spans.append((start, end, covered))
        covered = end
    return spans


def key_dtype(model_dir: Path, requested: str = "auto") -> str:
    """`requested`, or for "auto" the activation dtype the server runs this model with on this machine
    (artefacts/checkpoint.py): keys computed in it carry the same rounding as serving-time queries."""
    if requested != "auto":
        return requested
    from artefacts import checkpoint
    from artefacts.checkpoint import detect_device

    served_dir, _ = checkpoint.served_checkpoint(Path(model_dir), detect_device())
    return checkpoint.serving_dtype("auto", served_dir, Path(model_dir))


def load_key_model(model_dir: Path, dtype: str):
    """HF model computing the served function (the dense copy of a GPTQ checkpoint: same weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from artefacts import checkpoint

    model_dir = Path(model_dir)
    source = checkpoint.ensure_dense_copy(model_dir) if checkpoint.gptq_config(model_dir) else model_dir
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model.to(getattr(torch, dtype))
    model.eval()
    return model


def document_keys(model, ids: list[int], window: int, stride: int) -> np.ndarray:
    """Final hidden states [len(ids) - 1, hidden] fp32: row t is the state after token t."""
    import torch

    keys = []
    with torch.inference_mode():
        for start, end, keep_from in windows(len(ids), window, stride):
            inputs = torch.tensor([ids[start:end]], dtype=torch.long)
            hidden = model.model(input_ids=inputs).last_hidden_state[0]  # after the final norm
            keys.append(hidden[keep_from - start:].float().numpy())
    states = np.concatenate(keys, axis=0)
    return np.ascontiguousarray(states[: len(ids) - 1])


def _build_key(config: TokenBuildConfig, model_fp: str, token_lists: list[list[int]]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"model": model_fp, "window": config.window, "stride": config.stride,
                              "dtype": key_dtype(config.model_dir, config.key_dtype)}, sort_keys=True).encode())
    for ids in token_lists:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"\0")
    return digest.hexdigest()


def compute_all_keys(config: TokenBuildConfig, token_lists: list[list[int]], shards: Path,
                     model_dir: Path) -> tuple[list[np.ndarray], dict]:
    """Keys per document, reusing finished shards; returns (keys per document, stats)."""
    from tqdm.auto import tqdm

    model = None
    stats_dtype = key_dtype(model_dir, config.key_dtype)
    started = time.perf_counter()
    computed = resumed = 0
    out = []
    bar = tqdm(total=sum(len(ids) - 1 for ids in token_lists), unit="tok", disable=not config.progress,
               desc="hidden states")
    for number, ids in enumerate(token_lists):
        shard = shards / f"doc-{number:06d}.npy"
        if shard.is_file():
            keys = np.load(shard)
            resumed += len(keys)
        else:
            if config.stop_after_documents is not None and number >= config.stop_after_documents:
                raise SimulatedInterruption(f"stopped after {number} documents (test hook)")
            if model is None:
                model = load_key_model(model_dir, stats_dtype)
            keys = document_keys(model, ids, config.window, config.stride)
            tmp = shard.with_suffix(".tmp.npy")
            np.save(tmp, keys)
            os.replace(tmp, shard)
            computed += len(keys)
        out.append(keys)
        bar.update(len(keys))
    bar.close()
    seconds = time.perf_counter() - started
    return out, {"key_seconds": seconds, "computed_positions": computed, "resumed_positions": resumed,
                 "key_dtype": stats_dtype}


def choose_factory(n: int, dim: int) -> str:
    """Flat below FLAT_BELOW entries; else `IVF{nlist},PQ{dim/2}x4fs,RFlat`: the SIMD fast scan of 4-bit
    codes (two dimensions per code) finds k x k_factor_rf candidates and the stored keys re-rank them,
    so kNN-LM mixes exact distances. Measured on 158,841 real keys (bench/bench_token_search.py, one
    thread, 16 queries, k 64): 4.95 ms against 40.8 ms for IVF-Flat at the same nlist and nprobe,
    recall@64 0.981 against 0.990; it stores the keys (as Flat does) plus dim/4 bytes of codes."""
    if n < FLAT_BELOW:
        return "Flat"
    nlist = 2 ** round(np.log2(4 * np.sqrt(n)))
    return f"IVF{nlist},PQ{dim // 2}x4fs,RFlat" if dim % 4 == 0 else f"IVF{nlist},Flat"


def _entries(token_lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per corpus position: its value (the next token), its document, and the position after it
    in the same document (-1 at a document's end), which pointer following walks."""
    values = np.concatenate([np.asarray(ids[1:], dtype=np.int32) for ids in token_lists])
    doc_ids = np.concatenate([np.full(len(ids) - 1, number, dtype=np.int32) for number, ids in enumerate(token_lists)])
    next_ids = np.arange(1, len(values) + 1, dtype=np.int64)
    next_ids[np.cumsum([len(ids) - 1 for ids in token_lists]) - 1] = -1
    return values, doc_ids, next_ids


def _manifest(config: TokenBuildConfig, output: Path, documents, skipped, entries: int, hidden: int, start_ids,
              index_info: dict, seconds: dict, key_stats: dict, model_fp: str, tokenizer_fp: str) -> dict:
    build_args = {key: (str(value) if isinstance(value, Path) else value)
                  for key, value in dataclasses.asdict(config).items()
                  if key not in ("progress", "stop_after_documents", "force", "output")}
    build_args["inputs"] = [str(path) for path in config.inputs]
    return {
        "schema_version": fmt.SCHEMA_VERSION,
        "mode": tds.MODE,
        "name": config.name or output.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        "tokenizer": {"fingerprint": tokenizer_fp, "model_dir": str(Path(config.model_dir))},
        "model": {"fingerprint": model_fp, "name": Path(config.model_dir).name},
        "keys": {"what": "final hidden state (after the last norm) at each position; value = next token",
                 "computed_with": f"transformers {key_stats['key_dtype']} on the served weights", "dim": hidden,
                 "window": config.window, "stride": config.stride, "document_start_ids": start_ids},
        "dims": index_info["dims"],
        "pca": index_info["pca"],
        "index": index_info["index"],
        "counts": {"documents": len(documents), "entries": entries},
        "build": {"arguments": build_args, "seconds": seconds, **key_stats,
                  "skipped_inputs": skipped},
    }


def build_token_datastore(config: TokenBuildConfig) -> TokenBuildResult:
    """Build and publish a token datastore; raises DatastoreToolError on bad input."""
    output = Path(config.output)
    publish.check_output(output, config.force)
    model_dir = Path(config.model_dir)
    try:
        model_fp = fingerprints.model_fingerprint(model_dir)
        tokenizer_fp = fingerprints.tokenizer_fingerprint(model_dir)
    except FileNotFoundError as error:
        raise DatastoreToolError(
            f"a token datastore needs the served model's weights: {error}; pass --model DIR of a prepared model"
        ) from error
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    documents, report = ingest.read_documents(
        config.inputs, use_default_corpus=config.default_corpus, jsonl_field=config.jsonl_field,
        on_undecodable=config.on_undecodable,
    )
    seconds["ingest"] = time.perf_counter() - started

    from artefacts.tokenizer import document_start_ids

    started = time.perf_counter()
    tokenizer = chunking.load_tokenizer(model_dir)
    start_ids = document_start_ids(tokenizer)
    token_lists = [start_ids + tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in documents]
    seconds["tokenize"] = time.perf_counter() - started
    n = sum(len(ids) - 1 for ids in token_lists)
    hidden = int(json.loads((model_dir / "config.json").read_text())["hidden_size"])
    factory = config.index or choose_factory(n, config.pca or hidden)
    if config.pca is not None:
        index_factory.validate("Flat", hidden, config.pca + 1, config.pca, metric="l2")
    index_factory.validate(factory, hidden, n, config.pca, metric="l2")

    work = publish.work_dir_for(output)
    shards = publish.prepare_work_dir(work, _build_key(config, model_fp, token_lists))
    keys_per_doc, key_stats = compute_all_keys(config, token_lists, shards, model_dir)
    seconds["keys"] = key_stats.pop("key_seconds")

    keys = np.concatenate(keys_per_doc, axis=0) if keys_per_doc else np.zeros((0, hidden), np.float32)
    del keys_per_doc  # the per-document arrays would otherwise stay alive beside `keys` and the index
    values, doc_ids, next_ids = _entries(token_lists)

    index, index_info = index_factory.build_index(
        keys, factory, config.pca, seed=config.seed, search_params={"nprobe": config.nprobe}, metric="l2",
    )
    seconds["train"] = index_info["seconds"]["train"]
    seconds["add"] = index_info["seconds"]["add"]

    stage = work / "datastore"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        started = time.perf_counter()
        faiss.write_index(index, str(stage / fmt.INDEX_FILE))
        np.save(stage / tds.VALUES_FILE, values)
        np.save(stage / tds.NEXT_FILE, next_ids)
        np.save(stage / tds.DOC_IDS_FILE, doc_ids)
        (stage / tds.DOCS_FILE).write_text(json.dumps(
            [{"source": d.source, "title": d.title} for d in documents], ensure_ascii=False))
        seconds["write"] = time.perf_counter() - started
        manifest = _manifest(config, output, documents, report.skipped, n, hidden, start_ids, index_info, seconds,
                             key_stats, model_fp, tokenizer_fp)
        manifest = write_manifest(stage, manifest)
        publish.publish(stage, output, config.force)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    log.info("published token datastore %s: %d documents, %d entries, index %s", output, len(documents), n, factory)
    return TokenBuildResult(output, manifest)
