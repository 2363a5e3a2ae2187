"""actsteer serve, tried again as a new user would (issue 26): every error in OpenAI's shape
(an unknown route too), Retry-After when the server is full, a chat role the API does not know
refused, and a busy port named before anything is loaded."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.test_serve import post, serving, tiny_model

pytest.importorskip("fastapi")
from actsteer.serving.app import Server  # noqa: E402


@pytest.fixture(scope="module")
def base(tokenizer):
    with serving(Server(tiny_model(len(tokenizer)), tokenizer, {}, "tiny", max_batch=1,
                        max_queue=0)) as url:  # fmt: skip
        yield url


def test_an_unknown_route_answers_in_openai_shape(base):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + "/v1/nothing-here", timeout=30)
    body = json.loads(err.value.read())
    assert err.value.code == 404
    assert "no route GET /v1/nothing-here" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


def test_an_unknown_chat_role_is_refused(base):
    status, body = post(
        base, "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2},
    )  # fmt: skip
    assert status == 400 and "role" in body["error"]["message"]
    assert "'system', 'developer', 'user', 'assistant' or 'tool'" in body["error"]["message"]


def test_a_full_server_says_when_to_retry(base, tokenizer):
    """max_batch 1, max_queue 0: a second request while one runs is a 503 with Retry-After.
    The running one is a stream whose first event has arrived (so it holds the slot)."""
    long = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 200, "stream": True}
    request = urllib.request.Request(
        base + "/v1/completions", json.dumps(long).encode(),
        {"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as stream:
        assert stream.readline().startswith(b"data: ")  # generating now
        second = urllib.request.Request(
            base + "/v1/completions",
            json.dumps({**long, "stream": False, "max_tokens": 1}).encode(),
            {"Content-Type": "application/json"}, method="POST",
        )  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(second, timeout=30)
        assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
        assert "busy" in json.loads(refused.value.read())["error"]["message"]
        assert stream.read().rstrip().endswith(b"data: [DONE]")  # the running one is unharmed


def test_a_busy_port_is_named_before_anything_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-c", "from actsteer.cli import app; app()", "serve", "--port",
             str(port), "--model", "no-such-model-is-loaded"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert run.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr and "--port" in run.stderr
    assert "Serving on" not in run.stderr + run.stdout and "Loading model" not in run.stderr


def test_a_request_still_running_at_shutdown_ends_in_openai_shape(tmp_path, tokenizer):
    """SIGINT with a long stream in flight and --shutdown-timeout 0.5: the stream's last event
    is an OpenAI-shaped error (the client raises it) followed by [DONE], the log has no
    traceback and the server exits with 0."""
    import signal
    import time

    from tests.test_serve import client, serve_command

    folder = tmp_path / "tiny"
    tiny_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with serve_command(folder, "--shutdown-timeout", "0.5") as (process, base):
        openai = pytest.importorskip("openai")
        stream = client(base).completions.create(
            model=str(folder), prompt="Hi", max_tokens=240, temperature=0, stream=True
        )
        chunks = iter(stream)
        next(chunks)
        process.send_signal(signal.SIGINT)
        with pytest.raises(openai.APIError, match="shutting down.*--shutdown-timeout 0.5"):
            for _ in chunks:
                time.sleep(0.01)  # a slow reader: the request is still running at the cut
        assert process.wait(timeout=30) == 0
        log = process.stderr.read() if process.stderr else ""
        assert "Traceback" not in log, log


def test_metrics_and_an_access_log_line_per_request(tokenizer, neutral, football, caplog):
    import logging

    import actsteer
    from tests.test_serve import client

    model = tiny_model(len(tokenizer))
    football_steering = actsteer.fit(model, tokenizer, neutral[:16], football[:16])
    server = Server(model, tokenizer, {"football": football_steering}, "tiny")
    caplog.set_level(logging.INFO, logger="actsteer.serve")
    with serving(server) as url:
        api = client(url)
        api.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0,
                               extra_body={"steering": {"football": 1.0}})  # fmt: skip
        list(api.completions.create(model="tiny", prompt="Hi", max_tokens=2, stream=True))
        post(url, "/v1/completions", {"model": "nope", "prompt": "Hi"})
        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
            text = response.read().decode()
            kind = response.headers["Content-Type"]
    assert kind.startswith("text/plain")
    assert 'actsteer_requests_total{endpoint="/v1/completions",status="200"} 2' in text
    assert 'actsteer_requests_total{endpoint="/v1/completions",status="404"} 1' in text
    assert 'actsteer_tokens_total{kind="completion"} 5' in text
    assert 'actsteer_steering_requests_total{steering="football"} 1' in text
    assert "actsteer_request_seconds_count 3" in text and "actsteer_requests_running 0" in text
    lines = [r.getMessage() for r in caplog.records if r.name == "actsteer.serve"]
    assert sum('"POST /v1/completions" 200' in line for line in lines) == 2
    assert any('"POST /v1/completions" 404' in line for line in lines)


def test_strength_errors_speak_http_and_calibrated_strengths_are_served(
    tokenizer, neutral, football
):
    """A λ out of range says the range this server steers with, not a Python call an HTTP
    client cannot make; a steering calibrated past 1 on purpose is served up to its calibrated
    λ; ActAdd at a λ that would collapse the output is a 400, and the server keeps serving."""
    from dataclasses import replace

    import actsteer

    model = tiny_model(len(tokenizer))
    fit = lambda method: actsteer.fit(model, tokenizer, neutral[:16], football[:16], method=method)  # noqa: E731
    linear = fit("linear-act")
    calibrated = replace(linear, info=replace(linear.info, default_strength=3.0))
    steerings = {"linear": linear, "calibrated": calibrated, "actadd": fit("actadd")}
    with serving(Server(model, tokenizer, steerings, "tiny")) as url:

        def ask(name, lam):
            body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "steering": {name: lam}}
            return post(url, "/v1/completions", body)

        status, body = ask("linear", 2.0)
        message = body["error"]["message"]
        assert status == 400 and "outside [0, 1], the range this server steers with" in message
        assert "extrapolated(" not in message
        assert ask("calibrated", 3.0)[0] == 200 and ask("calibrated", None)[0] == 200
        status, body = ask("calibrated", 3.5)
        assert status == 400 and "[0, 3]" in body["error"]["message"]
        assert "calibrated strength" in body["error"]["message"]
        status, body = ask("actadd", 1e38)
        assert status == 400 and "the output collapses" in body["error"]["message"]
        assert ask("actadd", 1.0)[0] == 200
