"""Build, open, search, verify, resume, prune and reduce real (small) datastores; bad input messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from datastore_tools import cli
from datastore_tools.build import BuildConfig, build_datastore
from datastore_tools.publish import work_dir_for
from datastore_tools.embedding import SimulatedInterruption
from datastore_tools.errors import DatastoreToolError
from datastore_tools.prune import prune_datastore
from datastore_tools.reduce import reduce_datastore
from datastore_tools.verify import verify_datastore
from retriever import fingerprints
from retriever.datastore import Datastore, DatastoreError, FingerprintMismatch


def config(output, tokenizer_dir, inputs, **overrides) -> BuildConfig:
    values = dict(output=output, model_dir=tokenizer_dir, inputs=list(inputs), index="Flat",
                  shard_size=8, batch_size=8, progress=False)
    values.update(overrides)
    return BuildConfig(**values)


def read_all(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- the published datastore ---------------------------------------------------------------

def test_build_publishes_complete_datastore(small_datastore, tokenizer_dir):
    manifest = json.loads((small_datastore / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["mode"] == "chunk"
    assert manifest["tokenizer"]["fingerprint"] == fingerprints.tokenizer_fingerprint(tokenizer_dir)
    assert {name.split("/")[0] for name in manifest["files"]} == {"index.faiss", "payloads.lmdb", "embeddings.npy",
                                                                 "bm25"}
    assert manifest["sparse"]["bm25"]["chunks"] == manifest["counts"]["chunks"]
    assert manifest["counts"]["documents"] == 9  # 6 files + 3 JSONL lines (the tiny one included)
    assert set(manifest["build"]["seconds"]) >= {"ingest", "tokenize", "embed", "train", "add", "payloads"}
    assert not work_dir_for(small_datastore).exists()
    assert not list(small_datastore.parent.glob("small.partial-*"))
    assert verify_datastore(small_datastore) == []


def test_chunks_link_to_continuations_and_short_doc_is_one_chunk(small_datastore):
    with Datastore.open(small_datastore) as datastore:
        records = dict(datastore.payloads.iter_chunks())
        docs = dict(datastore.payloads.iter_docs())
    for chunk_id, record in records.items():
        first, count = docs[record["doc"]]["chunks"]
        assert len(record["tokens"]) <= 64
        if record["next"] == -1:
            assert chunk_id == first + count - 1
        else:
            assert record["next"] == chunk_id + 1 and len(record["tokens"]) == 64
    tiny = [d for d in docs.values() if d["source"].endswith("tiny.txt")][0]
    assert tiny["chunks"][1] == 1
    assert records[tiny["chunks"][0]]["text"] == "A document shorter than one chunk."
    html = [d for d in docs.values() if d["source"].endswith("nonlocal.html")][0]
    assert html["title"] == "nonlocal statement"
    html_text = "".join(records[i]["text"] for i in range(html["chunks"][0], sum(html["chunks"])))
    assert "SCRIPT-TEXT" not in html_text and "color:red" not in html_text and "nonlocal" in html_text


def test_search_returns_relevant_neighbours_with_continuations(small_datastore, encoder):
    with Datastore.open(small_datastore, encoder=encoder) as datastore:
        assert datastore.memory_mapped
        results = datastore.search_texts(["the assert statement raises AssertionError", "del deletes names"], 3)
        assert len(results) == 2 and all(len(row) == 3 for row in results)
        top = results[0][0]
        assert "assert" in top.source and top.score > 0.4
        assert top.score >= results[0][1].score >= results[0][2].score
        assert top.continuation_tokens and top.continuation_text
        assert "del" in results[1][0].source
        assert results.timing.search > 0 and results.timing.embed > 0
        same = datastore.search_embeddings(encoder.encode(["del deletes names"]), 3)
        assert [n.chunk_id for n in same[0]] == [n.chunk_id for n in results[1]]
        assert len(datastore.search_texts(["x"], 10_000)[0]) == datastore.ntotal  # k clamps to ntotal


def test_fingerprint_mismatch_is_refused(small_datastore, other_tokenizer_dir, tokenizer_dir):
    other = fingerprints.tokenizer_fingerprint(other_tokenizer_dir)
    with pytest.raises(FingerprintMismatch) as caught:
        Datastore.open(small_datastore, expected_tokenizer_fingerprint=other)
    message = str(caught.value)
    assert other in message and "retroserve datastore build" in message and "--model DIR" in message
    Datastore.open(small_datastore, expected_tokenizer_fingerprint=fingerprints.tokenizer_fingerprint(tokenizer_dir)).close()


def test_verify_and_open_catch_tampered_and_missing_files(small_datastore, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(small_datastore, copy)
    data = copy / "payloads.lmdb" / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    problems = verify_datastore(copy)
    assert any("payloads.lmdb/data.mdb" in p and "sha256" in p for p in problems)
    assert cli.main(["verify", str(copy)]) == 1
    assert "payloads.lmdb/data.mdb" in capsys.readouterr().err
    (copy / "index.faiss").unlink()
    assert any(p == "index.faiss: missing" for p in verify_datastore(copy))
    with pytest.raises(DatastoreError, match="index.faiss: missing"):
        Datastore.open(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(DatastoreError, match="manifest.json is missing"):
        Datastore.open(copy)
    manifest = json.loads((small_datastore / "manifest.json").read_text())
    shutil.copytree(small_datastore, tmp_path / "v2")
    (tmp_path / "v2" / "manifest.json").write_text(json.dumps(dict(manifest, schema_version=2)))
    with pytest.raises(DatastoreError, match="schema version 2"):
        Datastore.open(tmp_path / "v2")


# ---- resume ----------------------------------------------------------------------------------

def test_resume_after_interruption_is_identical(small_datastore, corpus_dir, tokenizer_dir, encoder, tmp_path):
    output = tmp_path / "resumed"
    with pytest.raises(SimulatedInterruption):
        build_datastore(config(output, tokenizer_dir, [corpus_dir], stop_after_shards=2), encoder=encoder)
    assert not output.exists()
    shards = sorted((work_dir_for(output) / "shards").glob("shard-*.npy"))
    assert len(shards) == 2
    result = build_datastore(config(output, tokenizer_dir, [corpus_dir]), encoder=encoder)
    assert result.manifest["build"]["resumed_chunks"] == 16
    assert not work_dir_for(output).exists()
    resumed, reference = read_all(output), read_all(small_datastore)
    for name in ("index.faiss", "payloads.lmdb/data.mdb", "embeddings.npy"):
        assert resumed[name] == reference[name], name
    assert result.manifest["files"] == json.loads((small_datastore / "manifest.json").read_text())["files"]


def test_changed_arguments_discard_old_shards(corpus_dir, tokenizer_dir, encoder, tmp_path):
    output = tmp_path / "changed"
    with pytest.raises(SimulatedInterruption):
        build_datastore(config(output, tokenizer_dir, [corpus_dir], stop_after_shards=1), encoder=encoder)
    with pytest.raises(SimulatedInterruption):
        build_datastore(config(output, tokenizer_dir, [corpus_dir], chunk_tokens=32, stop_after_shards=0),
                        encoder=encoder)
    assert not list((work_dir_for(output) / "shards").glob("shard-*.npy"))


# ---- prune and reduce ------------------------------------------------------------------------

def test_prune_removes_only_chunks_with_duplicates(small_datastore, tmp_path):
    output = tmp_path / "pruned"
    report = prune_datastore(small_datastore, output, exact=True, near_dup=0.95)
    assert report.exact_duplicates == 5  # the copied document
    assert report.after == report.before - report.exact_duplicates - report.near_duplicates
    vectors = np.load(small_datastore / "embeddings.npy").astype(np.float32)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1)
    for removed, kept in report.representative.items():
        assert removed > kept and similarity[removed, kept] >= 0.95 - 1e-3
    for chunk_id in range(report.before):
        if similarity[chunk_id].max() < 0.95 - 1e-3:
            assert chunk_id not in report.representative  # no duplicate: never removed
    assert verify_datastore(output) == []
    with Datastore.open(output) as pruned:
        records = dict(pruned.payloads.iter_chunks())
        assert len(records) == report.after
        tokens = [tuple(r["tokens"]) for r in records.values()]
        assert len(set(tokens)) == len(tokens)


def test_prune_by_retrieval_log_keeps_retrieved_and_their_continuations(small_datastore, tmp_path):
    log = tmp_path / "retrievals.jsonl"
    log.write_text(json.dumps({"chunk_ids": [0, 2]}) + "\n" + json.dumps({"chunk_ids": [2]}) + "\n")
    report = prune_datastore(small_datastore, tmp_path / "used", exact=False, retrieval_log=log)
    assert report.after == 4  # 0, 1 (continuation of 0), 2, 3 (continuation of 2)
    with Datastore.open(tmp_path / "used") as used:
        nexts = [r["next"] for _, r in used.payloads.iter_chunks()]
    assert nexts[0] == 1 and nexts[2] == 3 and nexts[3] in (-1,)
    log.write_text("{\"ids\": [1]}\n")
    with pytest.raises(DatastoreToolError, match=r"retrievals.jsonl:1: expected a JSON object with \"chunk_ids\""):
        prune_datastore(small_datastore, tmp_path / "bad", retrieval_log=log)
    assert not (tmp_path / "bad").exists()


def test_reduce_re_encodes_with_pca(small_datastore, tmp_path, encoder):
    manifest = reduce_datastore(small_datastore, tmp_path / "reduced", 16)
    assert manifest["dims"] == {"embedding": 384, "index": 16}
    assert 0 < manifest["pca"]["variance_kept"] < 1
    assert verify_datastore(tmp_path / "reduced") == []
    with Datastore.open(tmp_path / "reduced", encoder=encoder) as reduced:
        top = reduced.search_texts(["the assert statement raises AssertionError"], 1)[0][0]
        assert "assert" in top.source
    with pytest.raises(DatastoreToolError, match="--pca 384 must be between 1 and 383"):
        reduce_datastore(small_datastore, tmp_path / "too-big", 384)
    assert not (tmp_path / "too-big").exists()


# ---- bad input through the CLI -----------------------------------------------------------------

def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def bad_inputs(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "empty.md").write_text("   \n")
    return root


def test_empty_and_binary_corpus_fails_naming_files(bad_inputs, tokenizer_dir, tmp_path, capsys):
    output = tmp_path / "out"
    code, _, err = run_cli(["build", str(bad_inputs), "-o", str(output), "--model", str(tokenizer_dir),
                            "--index", "Flat", "--no-progress"], capsys)
    assert code == 2
    assert "error: empty corpus" in err and "--default-corpus" in err
    assert "image.txt: binary file" in err and "latin1.txt: invalid UTF-8 at byte 3" in err
    assert not output.exists() and not work_dir_for(output).exists()


def test_undecodable_fail_policy(bad_inputs, tokenizer_dir, tmp_path, capsys):
    code, _, err = run_cli(["build", str(bad_inputs / "latin1.txt"), "-o", str(tmp_path / "o"), "--model",
                            str(tokenizer_dir), "--on-undecodable", "fail"], capsys)
    assert code == 2 and "invalid UTF-8 at byte 3; convert it to UTF-8" in err


@pytest.mark.parametrize("extra,needle", [
    (["--index", "IVF9x,Flat"], "unknown or invalid FAISS index factory 'IVF9x,Flat'"),
    (["--pca", "400"], "--pca 400 must be between 1 and 383"),
    (["--index", "IVF4096,Flat"], "IVF4096 needs at least 4096"),
])
def test_bad_build_arguments(extra, needle, corpus_dir, tokenizer_dir, tmp_path, capsys):
    output = tmp_path / "out"
    code, _, err = run_cli(["build", str(corpus_dir), "-o", str(output), "--model", str(tokenizer_dir),
                            "--no-progress", *extra], capsys)
    assert code == 2 and err.startswith("error: ") and needle in err, err
    assert not output.exists()


def test_missing_input_and_model(tmp_path, tokenizer_dir, capsys):
    code, _, err = run_cli(["build", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--model",
                            str(tokenizer_dir)], capsys)
    assert code == 2 and "does not exist; check the path" in err
    code, _, err = run_cli(["build", "--default-corpus", "-o", str(tmp_path / "o"), "--model",
                            str(tmp_path / "no-model")], capsys)
    assert code == 2 and "run `retroserve model prepare` or pass --model DIR" in err


def test_existing_output_needs_force(small_datastore, corpus_dir, tokenizer_dir, capsys):
    code, _, err = run_cli(["build", str(corpus_dir), "-o", str(small_datastore), "--model", str(tokenizer_dir)],
                           capsys)
    assert code == 2 and "already exists" in err and "--force" in err


def test_info_search_cli(small_datastore, capsys):
    code, out, _ = run_cli(["info", str(small_datastore)], capsys)
    assert code == 0 and "B/entry" in out and "index: Flat" in out
    code, out, _ = run_cli(["search", str(small_datastore), "assert statement", "-k", "2", "--json"], capsys)
    assert code == 0
    neighbours = json.loads(out)["results"][0]["neighbours"]
    assert len(neighbours) == 2 and "assert" in neighbours[0]["source"]
    code, _, err = run_cli(["info", str(small_datastore.parent / "absent")], capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.slow
def test_default_corpus_build_through_cli(tokenizer_dir, tmp_path, capsys):
    output = tmp_path / "pydoc"
    code, out, err = run_cli(["build", "--default-corpus", "-o", str(output), "--model", str(tokenizer_dir),
                              "--no-progress"], capsys)
    assert code == 0, err
    assert verify_datastore(output) == []
    code, out, _ = run_cli(["search", str(output), "how does the with statement work", "-k", "3"], capsys)
    assert "pydoc_data.topics:" in out


def test_tokenizer_fingerprint_ignores_how_the_tokenizer_was_loaded(tokenizer_dir, tmp_path):
    """transformers writes local_files_only (from HF_HUB_OFFLINE) into tokenizer_config.json;
    the same tokenizer saved online and offline must keep one fingerprint, another must not."""
    import shutil

    copy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["local_files_only"] = not config.get("local_files_only", False)
    config_path.write_text(json.dumps(config, indent=4))
    assert fingerprints.tokenizer_fingerprint(copy) == fingerprints.tokenizer_fingerprint(tokenizer_dir)
    config["eos_token"] = "<|endoftext|>" if config.get("eos_token") != "<|endoftext|>" else "<|im_end|>"
    config_path.write_text(json.dumps(config))
    assert fingerprints.tokenizer_fingerprint(copy) != fingerprints.tokenizer_fingerprint(tokenizer_dir)


def test_one_datastore_opened_twice_in_one_process(small_datastore):
    """LMDB allows one environment per file and process; two Datastores on one path share it and
    the first close leaves the second readable."""
    first = Datastore.open(small_datastore)
    second = Datastore.open(small_datastore)
    expected = [n.chunk_id for n in first.search_texts(["assert statement"], 3)[0]]
    first.close()
    assert [n.chunk_id for n in second.search_texts(["assert statement"], 3)[0]] == expected
    second.close()
    third = Datastore.open(small_datastore)  # reopening after the last close works
    assert third.ntotal == second.ntotal
    third.close()


def test_subset_by_sources_equals_building_from_those_files(small_datastore, corpus_dir, tokenizer_dir, encoder,
                                                            tmp_path):
    """The size sweep cuts smaller datastores from the largest: same chunks, same vectors (to float16
    storage rounding), same continuation links as building from the file subset directly."""
    from datastore_tools.derive import subset_by_sources

    files = [corpus_dir / "assert.txt", corpus_dir / "global.rst", corpus_dir / "flow.jsonl"]
    subset_by_sources(small_datastore, tmp_path / "cut", {str(f) for f in files}, index="Flat")
    build_datastore(BuildConfig(output=tmp_path / "built", model_dir=tokenizer_dir, inputs=files, index="Flat",
                                progress=False), encoder=encoder)

    def contents(path):
        with Datastore.open(path) as datastore:
            records = [r for _, r in datastore.payloads.iter_chunks()]
            # Ids depend on document order; compare each chunk with the text it continues into.
            chunks = [(r["text"], records[r["next"]]["text"] if r["next"] >= 0 else None) for r in records]
            sources = sorted(doc["source"] for _, doc in datastore.payloads.iter_docs())
            vectors = datastore.index.reconstruct_n(0, datastore.ntotal)
        return chunks, sources, vectors

    cut, built = contents(tmp_path / "cut"), contents(tmp_path / "built")
    assert sorted(cut[0]) == sorted(built[0]) and cut[1] == built[1]
    order = {text: i for i, (text, _) in enumerate(built[0])}
    aligned = built[2][[order[text] for text, _ in cut[0]]]
    np.testing.assert_allclose(cut[2], aligned, atol=2e-3)
    with pytest.raises(DatastoreToolError, match="none of the"):
        subset_by_sources(small_datastore, tmp_path / "none", {"/no/such/file.txt"})
    assert not (tmp_path / "none").exists()
