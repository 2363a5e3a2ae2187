"""Gates in `actsteer serve`, through the real `openai` client against a real server on
127.0.0.1: per-token gate telemetry (streamed and not), a request switching a steering's gate
off (= the ungated steering), bad switches refused with the server still serving, and gates
that carry state across passes refused at start-up."""

from __future__ import annotations

import pytest

import actsteer
from actsteer import ActSteerError
from tests.test_serve import client, post, serving, tiny_model

openai = pytest.importorskip("openai")
from actsteer.serving.app import Server  # noqa: E402

PROMPT = "The weather today is"


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def gated(tiny, tokenizer, neutral, football):
    return actsteer.fit(
        tiny, tokenizer, neutral[:32], football[:32], modules="layernorms", gate="token",
        progress=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny, tokenizer, gated):
    steerings = {"football": gated, "ungated": gated.without_gate()}
    with serving(Server(tiny, tokenizer, steerings, "tiny", max_tokens=64)) as base:
        yield base


def complete(base: str, steering: dict, actsteer_options: dict | None = None, **kwargs):
    extra = {"steering": steering}
    if actsteer_options is not None:
        extra["actsteer"] = actsteer_options
    return client(base).completions.create(
        model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, extra_body=extra, **kwargs
    )


def test_telemetry_returns_each_tokens_gate(server):
    response = complete(server, {"football": 1.0}, {"telemetry": True})
    gates = response.choices[0].model_extra["actsteer"]["gates"]
    assert len(gates) == 8
    assert all(set(g) == {"football"} and 0.0 < g["football"] < 1.0 for g in gates)
    plain = complete(server, {"football": 1.0})
    assert "actsteer" not in (plain.choices[0].model_extra or {})
    assert plain.choices[0].text == response.choices[0].text, "telemetry changes nothing"


def test_streamed_chunks_carry_their_tokens_gates(server):
    stream = complete(server, {"football": 1.0}, {"telemetry": True}, stream=True)
    chunks = list(stream)
    gates = [g for chunk in chunks for g in chunk.choices[0].model_extra["actsteer"]["gates"]]
    whole = complete(server, {"football": 1.0}, {"telemetry": True})
    assert gates == whole.choices[0].model_extra["actsteer"]["gates"]


def test_a_request_switches_a_gate_off(server):
    off = complete(server, {"football": 1.0}, {"gate": {"football": False}, "telemetry": True})
    ungated = complete(server, {"ungated": 1.0})
    assert off.choices[0].text == ungated.choices[0].text
    assert off.choices[0].model_extra["actsteer"]["gates"] == [{}] * 8, "no gate, no values"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gate": {"ungated": False}}, "not a gated steering of this request"),
        ({"gate": {"nope": False}}, "not a gated steering of this request"),
        ({"telemetry": "yes"}, "telemetry"),
        ({"gates": {}}, "gates"),
    ],
)
def test_bad_gate_options_are_refused_and_the_server_keeps_serving(server, options, message):
    status, body = post(
        server, "/v1/completions",
        {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "steering": {"football": 1.0},
         "actsteer": options},
    )  # fmt: skip
    assert status == 400 and message in body["error"]["message"]
    assert complete(server, {"football": 0.5}).choices[0].text


def test_gates_that_carry_state_are_refused_at_start_up(tiny, tokenizer, gated):
    context = gated.with_gate_settings(kind="context")
    with pytest.raises(ActSteerError, match="has a context gate.*serves token gates"):
        Server(tiny, tokenizer, {"context": context}, "tiny")
