"""`sftflow api RUN_DIR|CONFIG [RUN_DIR ...] [key=value ...] [--run [NAME=]RUN_DIR ...] [--model M]
[--adapter A] [--host H] [--port P]`."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

from sftflow.cli import parse, setup_logging
from sftflow.cli.infer_args import infer_parser
from sftflow.config.run_dir import infer_args
from sftflow.errors import SftflowError
from sftflow.infer.engine import load_engine

if TYPE_CHECKING:
    from sftflow.config.parser import RunArgs

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# the Host headers a loopback-bound server answers (others get 400: a DNS-rebinding page cannot reach it)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# on SIGTERM / Ctrl-C, running requests get this long to finish before they are cancelled
SHUTDOWN_GRACE_S = 5


def trusted_hosts(host: str) -> tuple[str, ...] | None:
    """The Host headers a server bound to `host` accepts: the loopback names when bound to loopback,
    else any (None).

    >>> trusted_hosts("127.0.0.1"), trusted_hosts("0.0.0.0")
    (('127.0.0.1', 'localhost', '[::1]'), None)
    """
    return LOOPBACK_HOSTS if host in LOOPBACK else None


def host_and_port(host: str | None, port: int | None) -> tuple[str, int]:
    """--host/--port, else API_HOST/API_PORT, else 127.0.0.1:8000.

    Raises:
        SftflowError: API_PORT is not a port number.
    """
    host = host or os.environ.get("API_HOST") or DEFAULT_HOST
    if port is None:
        raw = os.environ.get("API_PORT")
        try:
            port = int(raw) if raw else DEFAULT_PORT
        except ValueError:
            raise SftflowError(f"API_PORT must be a port number, got {raw!r}.") from None
    if not 0 < port < 65536:
        raise SftflowError(f"the port must be in 1..65535, got {port}.")
    return host, port


def named_run(value: str) -> tuple[str | None, str]:
    """`--run [NAME=]RUN_DIR|CONFIG` as (name or None, target); a target that exists is taken whole.

    Raises:
        SftflowError: NAME or the target is empty.
    """
    if os.path.exists(value) or "=" not in value:
        return None, value
    name, _, target = value.partition("=")
    if not name.strip() or not target.strip():
        raise SftflowError(f"--run {value!r}: write --run NAME=RUN_DIR (or --run RUN_DIR).")
    return name.strip(), target.strip()


def served_runs(ns: argparse.Namespace) -> list[tuple[str, RunArgs]]:
    """Each run to serve with its model name: the first TARGET (with --model/--adapter), further
    TARGETs, then every --run. key=value overrides apply to every run. Without a NAME, a run is named
    by its adapter (or model) path, as with one run.

    Raises:
        SftflowError: two runs with one name, --adapter without a run or model to go with, or a run
            dir/config that cannot be read.
    """

    targets = [t for t in ns.overrides if "=" not in t]  # `sftflow api RUN_A RUN_B`
    overrides = [o for o in ns.overrides if "=" in o]
    first = ns.target
    if first is None and targets and ns.model is None:  # `sftflow api key=value RUN_A`
        first = targets.pop(0)
    if ns.adapter and first is None and ns.model is None:
        raise SftflowError("--adapter needs a RUN_DIR or --model to go with; --run takes a run dir.")
    runs: list[tuple[str | None, RunArgs]] = []
    if first is not None or ns.model is not None:
        runs.append((None, infer_args(first, overrides, ns.model, ns.adapter)))
    runs += [(None, infer_args(t, overrides)) for t in targets]
    for value in ns.run or []:
        name, target = named_run(value)
        runs.append((name, infer_args(target, overrides)))
    out: list[tuple[str, RunArgs]] = []
    for name, args in runs:
        name = name or str(args.model.adapter_name_or_path or args.model.model_name_or_path)
        if any(name == taken for taken, _ in out):
            raise SftflowError(
                f"two runs would both be served as model {name!r}; give each its own name with "
                "--run NAME=RUN_DIR (e.g. --run fast=saves/a --run slow=saves/b)."
            )
        out.append((name, args))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = infer_parser(
        "api",
        "Serve tuned models over an OpenAI-compatible API (/health, /v1/models, /v1/chat/completions, "
        "/v1/completions), concurrent requests batched together. Several runs can be served at once "
        "(`sftflow api RUN_A RUN_B`, or `--run NAME=RUN_DIR` to give one a short name): a request's "
        "`model` picks the run, /v1/models lists them. Each run loads its own copy of its model, so "
        "two LoRA runs of one base hold that base twice in memory. "
        "Set API_KEY to require `Authorization: Bearer <API_KEY>`.",
        "a run's output_dir (e.g. saves/smollm2-135m-instruct/lora/demo) or a config file; further "
        "run dirs may follow",
    )
    parser.add_argument(
        "--run",
        action="append",
        metavar="[NAME=]RUN_DIR|CONFIG",
        help="serve another run, as model NAME (default: its adapter or model path); repeatable",
    )
    parser.add_argument("--host", help=f"address to bind (env API_HOST; default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, help=f"port (env API_PORT; default {DEFAULT_PORT})")
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    ns = parse(parser, argv)
    more = any("=" not in o for o in ns.overrides)  # further run dirs
    if ns.target is None and ns.model is None and not ns.run and not more:
        parser.error("give a run dir, a config file, --model or --run")
    host, port = host_and_port(ns.host, ns.port)
    api_key = os.environ.get("API_KEY") or None
    runs = served_runs(ns)
    setup_logging()
    import uvicorn

    from sftflow.infer.api import create_app

    engines = {}
    try:
        for name, args in runs:
            if len(runs) > 1:
                logger.info("loading %s (%s)", name, args.model.model_name_or_path)
            engines[name] = load_engine(args, batched=True)
        if host not in LOOPBACK and api_key is None:
            logger.warning("serving on %s without an API key: anyone who can reach it can use it.", host)
        names = ", ".join(engines)
        print(
            f"sftflow api: serving {names} at http://{host}:{port}/v1 "
            f"({'API key required' if api_key else 'no API key'})",
            flush=True,
        )
        app = create_app(engines, api_key, allowed_hosts=trusted_hosts(host))
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    finally:
        for engine in engines.values():
            engine.close(cancel=True)  # what is still queued or running is not waited for
    return 0
