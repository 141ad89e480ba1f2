"""`sftflow api RUN_DIR|CONFIG [key=value ...] [--model M] [--adapter A] [--host H] [--port P]`."""

from __future__ import annotations

import logging
import os

from sftflow.cli import setup_logging
from sftflow.cli.infer_args import infer_parser, load_infer_args, parse_infer
from sftflow.errors import SftflowError

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


def main(argv: list[str]) -> int:
    parser = infer_parser(
        "api",
        "Serve a tuned model over an OpenAI-compatible API (/health, /v1/models, /v1/chat/completions, "
        "/v1/completions), concurrent requests batched together. "
        "Set API_KEY to require `Authorization: Bearer <API_KEY>`.",
        "a run's output_dir (e.g. saves/smollm2-135m-instruct/lora/demo) or a config file",
    )
    parser.add_argument("--host", help=f"address to bind (env API_HOST; default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, help=f"port (env API_PORT; default {DEFAULT_PORT})")
    ns = parse_infer(parser, argv)
    host, port = host_and_port(ns.host, ns.port)
    api_key = os.environ.get("API_KEY") or None
    args = load_infer_args(ns)
    setup_logging()
    import uvicorn

    from sftflow.infer.api import create_app
    from sftflow.infer.engine import load_engine

    engine = load_engine(args, batched=True)
    if host not in LOOPBACK and api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach it can use it.", host)
    print(
        f"sftflow api: serving {engine.model_name} at http://{host}:{port}/v1 "
        f"({'API key required' if api_key else 'no API key'})",
        flush=True,
    )
    try:
        uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level="info")
    finally:
        engine.close()
    return 0
