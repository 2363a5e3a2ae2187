"""The serve command: an OpenAI-compatible HTTP server where each request picks its steerings."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from actsteer.cli.core import LM_PANEL, app, load_lm, selected, status
from actsteer.cli.options import DeviceOption, DtypeOption, ModelOption, SelectOption
from actsteer.errors import ActSteerError


def check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on, saying so (uvicorn would only fail later)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ActSteerError(
                f"cannot listen on {host}:{port} ({err.strerror}): another process uses it, or "
                "the address is not this machine's; choose another with --port or --host"
            ) from None


def parse_named(specs: list[str]) -> dict[str, Path]:
    """`NAME=FILE` values (a bare FILE is named by its stem), each name once."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        if not name or not path:
            raise ActSteerError(f"--steering {spec!r}: write NAME=FILE")
        if name in named:
            raise ActSteerError(f"--steering name {name!r} is given twice; name each one once")
        named[name] = Path(path)
    return named


@app.command(rich_help_panel=LM_PANEL)
def serve(
    steering_specs: Annotated[
        list[str] | None,
        typer.Option(
            "--steering",
            help="A steering file a request may use, under NAME (default: the file's stem). "
            "Repeat for several. Requests choose them with the body field steering: {NAME: λ}.",
            metavar="NAME=FILE",
        ),
    ] = None,
    model: ModelOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
    modules: SelectOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer KEY' on /v1 (401 without).",
            envvar="ACTSTEER_API_KEY",
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together.", min=1)] = 16,
    max_queue: Annotated[
        int, typer.Option(help="Requests waiting beyond those; more get 503.", min=0)
    ] = 64,
    max_tokens: Annotated[
        int, typer.Option(help="The most tokens one request may ask for.", min=1)
    ] = 1024,
    model_name: Annotated[
        str | None, typer.Option(help="The model id clients send (default: --model).")
    ] = None,
    shutdown_timeout: Annotated[
        float, typer.Option(help="Seconds in-flight requests get to finish on Ctrl-C/SIGTERM.")
    ] = 10.0,
) -> None:
    """Serve the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models, /v1/steerings)
    with per-request steering; needs the serve extra (`pip install ".\\[serve]"` in the
    source tree).

    Example: actsteer serve --model smollm2-135m --steering detox=detox.safetensors
    """
    from actsteer.extras import require
    from actsteer.models import model_for
    from actsteer.steering import Steering

    uvicorn = require("uvicorn", "serve", "actsteer serve")
    from actsteer.serving.app import Server

    check_port(host, port)  # before loading anything: a busy port is the first thing to know
    access = logging.StreamHandler()
    access.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("actsteer.serve").addHandler(access)
    logging.getLogger("actsteer.serve").setLevel(logging.INFO)
    steerings = {
        name: selected(Steering.load(path), modules)
        for name, path in parse_named(steering_specs or []).items()
    }
    name = model_for(next(iter(steerings.values()), None), model)
    lm, tokenizer = load_lm(name, device, dtype)
    server = Server(
        lm, tokenizer, steerings, model_name or name, api_key, max_batch, max_queue, max_tokens
    )
    status(f"Serving {model_name or name} with steerings {', '.join(steerings) or 'none'} on "
           f"http://{host}:{port}/v1")  # fmt: skip
    # uvicorn stops gracefully on SIGINT/SIGTERM and then raises the signal again for the handler
    # it found: a quiet one, so a stopped server exits with status 0
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, lambda *_: None)
    config = uvicorn.Config(
        server.app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout,
        log_level="warning",
    )  # fmt: skip
    graceful(uvicorn.Server, server.engine, shutdown_timeout)(config).run()


def graceful(base: type, engine: Any, timeout: float) -> type:
    """uvicorn's Server that, once asked to stop, lets in-flight requests run for `timeout`
    seconds and then ends those still running with an error in OpenAI's shape (streams get
    it as their last event, then [DONE]) — before uvicorn would cut their connections."""

    class Graceful(base):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                reason = (
                    f"the server is shutting down: the request did not finish within "
                    f"--shutdown-timeout {timeout:g} s"
                )
                timer = threading.Timer(max(0.0, 0.8 * timeout), engine.stop, (reason,))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    return Graceful
