"""Damaged datastores: refused when a server starts and when one is offered for a hot swap.

Damage is done to copies of the session's server datastore the ways a disk, a copy or an operator
does it: a byte flipped in place (same size: only checksums notice), a file cut short, a manifest
cut short, a file removed. A server must refuse each with a message naming the file, at start
before the engine loads (so through the real `serve` CLI here, in seconds), and on a swap while
the previous datastore keeps serving.
"""

from __future__ import annotations

import shutil
import time

import grpc
import pytest

from loopback import second_server, server_config
from server.client import RetroserveClient

PROMPT = "The assert statement in Python"


def flip_byte(path, offset_fraction: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    # name: (file, how, words the refusal must contain)
    "index-byte-flipped": ("index.faiss", flip_byte, "index.faiss: sha256 differs"),
    "payloads-byte-flipped": ("payloads.lmdb/data.mdb", flip_byte, "payloads.lmdb/data.mdb: sha256 differs"),
    "index-truncated": ("index.faiss", truncate, "index.faiss:"),
    "payloads-truncated": ("payloads.lmdb/data.mdb", truncate, "payloads.lmdb/data.mdb:"),
    "manifest-truncated": ("manifest.json", truncate, "manifest.json is unreadable"),
    "index-missing": ("index.faiss", lambda path: path.unlink(), "index.faiss: missing"),
    "bm25-byte-flipped": ("bm25/data.csc.index.npy", flip_byte, "bm25/data.csc.index.npy: sha256 differs"),
}


def damaged_copy(source, directory, name: str):
    copy = directory / f"damaged-{name}"
    shutil.copytree(source, copy)
    relative, how, _ = DAMAGE[name]
    how(copy / relative)
    return copy


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_serve_refuses_a_damaged_datastore_before_loading_the_engine(name, prepared_model_dir, server_datastore,
                                                                     tmp_path, capsys):
    from server.cli import main as cli

    damaged = damaged_copy(server_datastore, tmp_path, name)
    started = time.monotonic()
    code = cli.main(["serve", "--model-dir", str(prepared_model_dir), "--datastore-dir", str(damaged),
                     "--address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0"])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert DAMAGE[name][2] in err and str(damaged) in err
    assert seconds < 30, f"refused only after {seconds:.0f} s: the engine was loaded first"


@pytest.fixture(scope="module")
def swap_target(server, prepared_model_dir, server_datastore, tmp_path_factory):
    serving = tmp_path_factory.mktemp("fault-swap") / "serving"
    shutil.copytree(server_datastore, serving)
    running = second_server(server, server_config(prepared_model_dir, serving))
    yield running
    running.stop(1)


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_swap_to_a_damaged_datastore_is_refused_and_the_old_keeps_serving(name, swap_target, server_datastore,
                                                                           tmp_path):
    damaged = damaged_copy(server_datastore, tmp_path, name)
    with RetroserveClient(swap_target.address, timeout=120) as client:
        before = client.info().datastore.manifest_digest
        with pytest.raises(grpc.RpcError) as caught:
            client.reload_datastore(str(damaged))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert DAMAGE[name][2] in caught.value.details() and "still serving" in caught.value.details()
        assert client.info().datastore.manifest_digest == before
        reply = client.generate(PROMPT, mode="chunk", stride=4, max_new_tokens=4, return_provenance=True)
        assert reply.generated_token_count == 4 and reply.retrievals[0].neighbours
    assert not swap_target.running.datastores.retired_open


def test_a_build_killed_while_writing_its_key_resumes(corpus_dir, tokenizer_dir, encoder, tmp_path):
    """A kill between truncating and writing `<output>.building/key.json` left it empty, and every
    later run of the same build failed on it (JSONDecodeError) instead of starting over."""
    from datastore_tools.build import BuildConfig, build_datastore
    from datastore_tools.publish import work_dir_for
    from datastore_tools.verify import verify_datastore

    output = tmp_path / "store"
    work = work_dir_for(output)
    (work / "shards").mkdir(parents=True)
    (work / "key.json").write_text("")
    build_datastore(BuildConfig(output=output, model_dir=tokenizer_dir, inputs=[corpus_dir], index="Flat",
                                shard_size=8, batch_size=8, progress=False), encoder=encoder)
    assert verify_datastore(output) == [] and not work.exists()


def test_a_token_build_with_a_cut_short_key_starts_over_instead_of_reusing_its_shards(corpus_dir,
                                                                                  prepared_model_dir, tmp_path):
    """The token build shares the chunk build's work directory (publish.prepare_work_dir): an empty
    key.json means unknown inputs, so a shard left beside it (here one of the wrong width, which
    would break the index if reused) is discarded and the build completes."""
    import numpy as np

    from datastore_tools.publish import work_dir_for
    from datastore_tools.token_build import TokenBuildConfig, build_token_datastore

    output = tmp_path / "tokens"
    work = work_dir_for(output)
    (work / "shards").mkdir(parents=True)
    (work / "key.json").write_text("")
    np.save(work / "shards" / "doc-000000.npy", np.zeros((3, 7), dtype=np.float32))
    result = build_token_datastore(TokenBuildConfig(output=output, model_dir=prepared_model_dir, inputs=[corpus_dir],
                                                    window=256, stride=128, progress=False))
    assert result.manifest["build"]["resumed_positions"] == 0
    assert (output / "manifest.json").is_file() and not work.exists()


def test_serve_with_a_bm25_retriever_refuses_a_datastore_without_its_index_before_loading_the_engine(
        prepared_model_dir, server_datastore, tmp_path, capsys):
    from datastore_copies import copy_without_bm25
    from server.cli import main as cli

    copy = copy_without_bm25(server_datastore, tmp_path / "dense-only")
    started = time.monotonic()
    code = cli.main(["serve", "--model-dir", str(prepared_model_dir), "--datastore-dir", str(copy),
                     "--retriever", "bm25", "--address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0"])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"retroserve datastore bm25 {copy}" in err
    assert seconds < 30, f"refused only after {seconds:.0f} s: the engine was loaded first"
