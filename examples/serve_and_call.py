"""Serve the OpenAI API with per-request steering and call it with the official `openai`
client: the same prompt plain and steered, in one server (needs `pip install ".[serve]"`
and `pip install openai`).

    python examples/serve_and_call.py                    # fits football.safetensors, serves, calls
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai

import actsteer
from actsteer.texts import package_texts


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_up(client: openai.OpenAI, server: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with code {server.returncode}")
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            time.sleep(0.5)
    sys.exit(f"the server did not answer within {seconds:g} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="alias, folder or hub id")
    parser.add_argument("--texts", type=int, default=256, help="texts of each set to fit on")
    parser.add_argument("--max-tokens", type=int, default=30)
    args = parser.parse_args()

    model, tok = actsteer.load_model(args.model)
    steering = actsteer.fit(
        model, tok, package_texts("neutral")[: args.texts], package_texts("football")[: args.texts],
        support="all",
    )  # fmt: skip
    folder = Path(tempfile.mkdtemp())
    steering.save(folder / "football.safetensors")
    port = free_port()
    command = [
        sys.executable, "-m", "actsteer", "serve", "--model", args.model, "--port", str(port),
        "--steering", f"football={folder / 'football.safetensors'}",
    ]  # fmt: skip
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    try:
        wait_until_up(client, server, seconds=120)
        for name, extra in (("plain", {}), ("football λ 1", {"steering": {"football": 1.0}})):
            reply = client.completions.create(
                model=args.model, prompt="Yesterday I went to the", max_tokens=args.max_tokens,
                temperature=0, extra_body=extra,
            )  # fmt: skip
            print(f"{name:>14}: {reply.choices[0].text.strip()}")
    finally:
        server.send_signal(signal.SIGINT)  # a clean shutdown: in-flight requests finish
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
