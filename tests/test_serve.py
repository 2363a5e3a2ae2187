"""actsteer serve: a real uvicorn server on 127.0.0.1 and a free port, driven by the real
`openai` client; a tiny config-built Llama with steerings fitted here, and SmolLM2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import actsteer
from actsteer import ActSteerError
from actsteer.budgets import strength_for_budget

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from actsteer.serving.app import Server  # noqa: E402

CALM = [f"a calm sentence about the garden, number {i}" for i in range(8)]
ANGRY = [f"an angry sentence about the traffic jam, number {i}" for i in range(8)]
PROMPTS = ["You are such a", "The weather today is", "Hi", "Once upon a time in a land far away"]


def tiny_model(vocab: int, hidden: int = 32) -> LlamaForCausalLM:
    """A model of its own: the server switches its attention implementation while it runs."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(server: Server):
    """Run the server's app on uvicorn in a thread; yields its base URL."""
    config = uvicorn.Config(server.app, host="127.0.0.1", port=free_port(), log_level="warning")
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        runner.should_exit = True
        thread.join(timeout=30)


@contextmanager
def serve_command(folder: Path, *options: str):
    """`actsteer serve --model FOLDER --port P OPTIONS` as a subprocess (no kernel build there),
    yielded as (process, base URL) once it answers /health; killed on the way out if it still
    runs."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "actsteer"), "serve", "--model", str(folder),
               "--port", str(port), *options]  # fmt: skip
    env = {**os.environ, "ACTSTEER_FUSED_KERNEL": "0"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                get(base, "/health")
                break
            except OSError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                time.sleep(0.2)
        yield process, base
    finally:
        if process.poll() is None:
            process.kill()


def client(base: str, key: str = "-") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def post(base: str, path: str, body: bytes | dict) -> tuple[int, dict]:
    """A raw POST (for bodies the openai client would not send): (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data, {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(base: str, path: str) -> dict:
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def steerings(tiny, tokenizer, football, neutral):
    fit = dict(modules="layernorms", progress=False)
    return {
        "football": actsteer.fit(tiny, tokenizer, neutral[:16], football[:16], **fit),
        "calm": actsteer.fit(tiny, tokenizer, ANGRY, CALM, **fit),
    }


@pytest.fixture(scope="module")
def server(tiny, tokenizer, steerings):
    server = Server(tiny, tokenizer, steerings, "tiny", max_tokens=200)
    with serving(server) as base:
        yield server, base


def complete(api: openai.OpenAI, prompt: str, steering=None, **kwargs) -> str:
    kwargs = {"max_tokens": 12, "temperature": 0, **kwargs}
    extra = {} if steering is None else {"steering": steering}
    response = api.completions.create(model="tiny", prompt=prompt, extra_body=extra, **kwargs)
    return response.choices[0].text


def test_completions_and_chat_streamed_and_not(server, tokenizer):
    _, base = server
    api = client(base)
    response = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and response.object == "text_completion"
    assert response.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[0]))
    assert response.usage.completion_tokens == 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + 8
    stream = api.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == choice.text

    messages = [{"role": "user", "content": "Hi"}]
    chat = api.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    template = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(tokenizer.encode(template, add_special_tokens=False))
    assert chat.choices[0].message.role == "assistant"
    chunks = list(
        api.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    assert [m.id for m in api.models.list().data] == ["tiny"]
    listed = {s["name"]: s for s in get(base, "/v1/steerings")["data"]}
    assert set(listed) == {"football", "calm"}
    assert listed["calm"]["method"] == "linear-act" and listed["calm"]["strength_range"] == [0, 1]
    assert "all" in listed["calm"]["supports"]


def test_a_stop_string_ends_the_text_before_it(server):
    _, base = server
    api = client(base)
    full = complete(api, PROMPTS[1], max_tokens=12)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    response = api.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop]
    )
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].text == full[: full.index(stop)]
    stream = api.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == full[: full.index(stop)]


def test_per_request_strength_changes_the_output_and_zero_is_unsteered(server):
    _, base = server
    api = client(base)
    for prompt in PROMPTS[:2]:
        plain = complete(api, prompt)
        assert complete(api, prompt, {"football": 0.0}) == plain
        assert complete(api, prompt, {"football": 0, "calm": 0}) == plain
        assert complete(api, prompt, {"football": 1.0}) != plain
        assert complete(api, prompt, {"football": None}) == complete(api, prompt, {"football": 1})
        assert complete(api, prompt, {"calm": 1, "football": 1}) != complete(
            api, prompt, {"calm": 1}
        )


def test_twelve_concurrent_greedy_requests_each_equal_the_request_alone(server):
    srv, base = server
    api = client(base)
    choices = [None, {"football": 0.0}, {"football": 0.5}, {"football": 1.0}, {"calm": 0.5},
               {"calm": 1.0, "football": 0.5}, {"football": 1.0, "calm": 0.5}]  # fmt: skip
    requests = [(PROMPTS[i % 4], choices[i % len(choices)]) for i in range(12)]
    requests[5] = (PROMPTS[1], {"football": 1.0})  # with support "all" below
    supports = [{"support": "all"} if i == 5 else {} for i in range(12)]

    def one(i: int) -> str:
        prompt, steering = requests[i]
        body = {**({} if steering is None else {"steering": steering}), **supports[i]}
        return (
            api.completions.create(
                model="tiny", prompt=prompt, max_tokens=16, temperature=0, extra_body=body
            )
            .choices[0]
            .text
        )

    alone = [one(i) for i in range(12)]
    srv.engine.peak = 0
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(one, range(12)))
    assert together == alone
    assert srv.engine.peak > 1  # they really ran batched
    assert alone[5] != alone[3]  # support "all" is another steering than the default support


def test_sampling_with_a_seed_is_reproducible_in_any_batch(server):
    _, base = server
    api = client(base)

    def sampled(seed: int, prompt: str = PROMPTS[0]) -> str:
        return complete(api, prompt, {"calm": 0.5}, temperature=1.0, top_p=0.9, seed=seed)

    first = sampled(7)
    assert sampled(7) == first and sampled(8) != first
    with ThreadPoolExecutor(6) as pool:
        batch = list(pool.map(lambda i: sampled(7 + i % 2, PROMPTS[i % 3]), range(6)))
    assert batch[0] == first and batch[1] == sampled(8, PROMPTS[1])


BAD = [  # (body changes, words the message must contain)
    ({"steering": {"detox": 1.0}}, "unknown steering 'detox'; loaded steerings: football, calm"),
    ({"steering": {"football": 1.5}}, "outside [0, 1]"),
    ({"steering": {"football": "strong"}}, "steering.football"),
    ({"steering": ["football"]}, "steering"),
    ({"max_tokens": 0}, "max_tokens must be ≥ 1"),
    ({"max_tokens": -3}, "max_tokens must be ≥ 1"),
    ({"max_tokens": "12"}, "max_tokens"),
    ({"max_tokens": 201}, "over this server's limit of 200"),
    ({"prompt": "word " * 300}, "context is 256"),
    ({"prompt": "word " * 100, "max_tokens": 200}, "ask for at most"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "one prompt per request"),
    ({"temperature": 3}, "temperature"),
    ({"n": 2}, "n=2 is not supported"),
    ({"support": "q2-98", "steering": {"calm": 1}}, "unknown support 'q2-98'"),
    ({"support": "all"}, "a support needs a steering"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop sequences"),
    ({"logprobs": 2}, "logprobs is not supported"),
]


@pytest.mark.parametrize("change,words", BAD, ids=[str(c) for c, _ in BAD])
def test_bad_input_is_a_400_in_openai_shape_and_the_server_keeps_serving(server, change, words):
    _, base = server
    status, body = post(base, "/v1/completions", {"model": "tiny", "prompt": "Hi", **change})
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error"
    assert words in body["error"]["message"]
    assert complete(client(base), "Hi", max_tokens=2)


def test_malformed_json_an_unknown_model_and_empty_messages_are_refused(server):
    _, base = server
    status, body = post(base, "/v1/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = post(base, "/v1/completions", {"model": "gpt-4", "prompt": "Hi"})
    assert status == 404 and "serves 'tiny'" in body["error"]["message"]
    status, body = post(base, "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert status == 400 and "messages is empty" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown steering"):
        client(base).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}],
            extra_body={"steering": {"nope": 1}},
        )  # fmt: skip


def test_a_client_leaving_mid_stream_frees_its_row_and_its_batch_mate_goes_on(server):
    srv, base = server
    api = client(base)
    mate = (PROMPTS[3], {"calm": 1.0})
    alone = complete(api, *mate, max_tokens=60)
    stream = api.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True
    )
    chunks = iter(stream)
    next(chunks)
    while not srv.engine.running:
        time.sleep(0.005)
    leaving = srv.engine.running[0]
    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(complete, api, *mate, max_tokens=60)
        while srv.engine.load()[0] < 2:
            time.sleep(0.005)
        next(chunks)
        stream.close()
        assert result.result() == alone
    deadline = time.monotonic() + 10
    while srv.engine.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.engine.load() == (0, 0)
    assert leaving.cancelled and leaving.text.count < 200


def test_overload_is_a_503_and_no_accepted_request_is_lost(tokenizer, steerings):
    model = tiny_model(len(tokenizer))
    server = Server(model, tokenizer, steerings, "tiny", api_key="sesame", max_batch=2, max_queue=1)
    with serving(server) as base:
        with pytest.raises(openai.AuthenticationError):
            client(base, "wrong").models.list()
        api = client(base, "sesame")
        expected = complete(api, PROMPTS[2], {"football": 0.5}, max_tokens=80)

        def one(_: int) -> str | int:
            try:
                return complete(api, PROMPTS[2], {"football": 0.5}, max_tokens=80)
            except openai.APIStatusError as err:
                return err.status_code

        with ThreadPoolExecutor(10) as pool:
            outcomes = list(pool.map(one, range(10)))
    served = [o for o in outcomes if isinstance(o, str)]
    assert set(outcomes) - {expected} == {503}
    assert 3 <= len(served) < 10  # every accepted request answered, and in full


def test_a_steering_fitted_on_another_model_is_refused_at_start_up(tokenizer, steerings):
    other = tiny_model(len(tokenizer), hidden=48)
    with pytest.raises(ActSteerError, match="steering 'calm'.*fit a steering for this model"):
        Server(other, tokenizer, {"calm": steerings["calm"]}, "other")


def test_the_serve_command_refuses_a_mismatched_steering_in_one_line(
    tmp_path, tokenizer, steerings
):
    from typer.testing import CliRunner

    from actsteer import cli

    folder = tmp_path / "other"
    tiny_model(len(tokenizer), hidden=48).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    steerings["calm"].save(tmp_path / "calm.safetensors")
    spec = f"calm={tmp_path / 'calm.safetensors'}"
    result = CliRunner().invoke(cli.app, ["serve", "--model", str(folder), "--steering", spec])
    assert result.exit_code == 1 and "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: steering 'calm': ") and "fit a steering for this model" in last


def test_the_serve_command_binds_loopback_and_exits_cleanly_on_sigterm(
    tmp_path, tokenizer, steerings
):
    folder = tmp_path / "tiny"
    model = tiny_model(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    steerings["calm"].save(tmp_path / "calm.safetensors")
    calm = f"calm={tmp_path / 'calm.safetensors'}"
    with serve_command(folder, "--steering", calm) as (process, base):
        stream = client(base).completions.create(
            model=str(folder), prompt="Hi", max_tokens=100, temperature=0, stream=True,
            extra_body={"steering": {"calm": 0.5}},
        )  # fmt: skip
        first = next(iter(stream))
        assert first.choices[0].text is not None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


@pytest.mark.slow
def test_smollm2_serves_chat_and_completions_with_per_request_steering(smol, football, neutral):
    model, tok = smol
    steering = actsteer.fit(
        model, tok, neutral[:24], football[:24], modules="post-attn-ln", progress=False
    )
    server = Server(model, tok, {"football": steering}, "smollm2-135m")
    with serving(server) as base:
        api = client(base)
        messages = [{"role": "user", "content": "Tell me about your weekend."}]
        kwargs = dict(model="smollm2-135m", messages=messages, max_tokens=16, temperature=0)
        chat = api.chat.completions.create(**kwargs)
        stream = api.chat.completions.create(**kwargs, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == (
            chat.choices[0].message.content
        )
        prompts = ["I went to the park and", "My favourite thing about Sundays is",
                   "Yesterday the news said that", "You are such a"]  # fmt: skip
        lams = [None, 0.0, 0.5, 1.0, 0.0, None, 1.0, 0.5, 0.5, 1.0, None, 0.0]
        requests = [(prompts[i % 4], lam) for i, lam in enumerate(lams)]

        def one(i: int) -> str:
            prompt, lam = requests[i]
            body = {} if lam is None else {"steering": {"football": lam}}
            return api.completions.create(
                model="smollm2-135m", prompt=prompt, max_tokens=16, temperature=0,
                extra_body=body,
            ).choices[0].text  # fmt: skip

        alone = [one(i) for i in range(12)]
        server.engine.peak = 0
        with ThreadPoolExecutor(12) as pool:
            together = list(pool.map(one, range(12)))
        assert together == alone
        assert server.engine.peak > 1
        # prompt 1 alone: unsteered (5), λ = 0 (1) and λ = 1 (9)
        assert alone[1] == alone[5] and alone[9] != alone[5]


def test_a_budget_instead_of_lambda_runs_at_the_strength_the_calibration_curve_allows(
    tokenizer, steerings, neutral
):
    """{"max_kl": x} reads λ off the calibration curve stored in the artifact; the response
    says which λ ran (and every chunk of a stream); budgets the artifact cannot answer are a
    400 that says what to do."""
    model = tiny_model(len(tokenizer))  # tiny's weights; a server switches its attention
    found = actsteer.calibrate(
        steerings["football"], model, tokenizer, 0.02, cost="kl", prompts=neutral[100:108]
    )
    calibrated = found.steering
    served = {"football": calibrated, "calm": steerings["calm"]}
    with serving(Server(model, tokenizer, served, "tiny", max_tokens=200)) as base:
        api = client(base)
        budget = {"football": {"max_kl": 0.01}}
        response = api.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
            extra_body={"steering": budget},
        )  # fmt: skip
        lam = response.model_extra["actsteer"]["strengths"]["football"]
        assert lam == strength_for_budget("football", calibrated, budget["football"])
        assert 0 < lam <= found.strength
        assert response.choices[0].text == complete(api, PROMPTS[0], {"football": lam})
        assert response.choices[0].text != complete(api, PROMPTS[0])
        stream = api.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, stream=True,
            extra_body={"steering": budget},
        )  # fmt: skip
        for chunk in stream:
            assert chunk.model_extra["actsteer"]["strengths"] == {"football": lam}
        refusals = {
            "calm": ({"max_kl": 0.01}, "no calibration curve"),
            "football": ({"max_delta_ppl": 1.0}, "calibrated by kl, so it takes max_kl"),
        }
        for name, (asked, message) in refusals.items():
            with pytest.raises(openai.BadRequestError, match=message):
                complete(api, PROMPTS[0], {name: asked})
        status, body = post(
            base,
            "/v1/completions",
            {"model": "tiny", "prompt": "Hi", "steering": {"football": {"max_kl": -1.0}}},
        )
        assert status == 400 and "max_kl must be a number ≥ 0" in body["error"]["message"]
        assert complete(api, PROMPTS[1]) == complete(api, PROMPTS[1], {"football": 0})
