"""The vLLM plugin offline (`vllm.LLM`, one engine per execution mode: eager, and vLLM's
default compilation): steered vLLM agrees with steered Hugging Face as closely as plain vLLM
agrees with plain Hugging Face, a mixed batch equals each request alone, unsteered requests
and λ = 0 are the plain engine, new strengths and mixes compile nothing, bad requests and
unmappable modules are refused with clear messages."""

from __future__ import annotations

import os
import re
import sys

import cloudpickle
import pytest
import torch

from actsteer import Steering
from actsteer.maps import AffineMap
from tests.vllm.reference import PROMPTS, TOKENS, agreement, hf_greedy, model_folder, run

vllm = pytest.importorskip("vllm")
from actsteer.integrations.vllm import engine_args  # noqa: E402  (needs vllm)

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # functions run in vLLM's worker


@pytest.fixture(scope="module")
def prompt_ids(smol):
    return [smol[1](p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module", params=["eager", "compiled"])
def llm(request, steering_files):
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc of a test function
    engine = vllm.LLM(
        model=model_folder(),
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.1,
        seed=0,
        **engine_args(steering_files, compiled=request.param == "compiled"),
    )
    yield engine
    engine.llm_engine.engine_core.shutdown()  # the engine processes end with the module


def compiled(llm) -> bool:
    return llm.llm_engine.vllm_config.compilation_config.mode != 0


def compare(vllm_runs, hf_runs) -> tuple[int, float]:
    """Tokens agreeing before the first difference (summed over prompts) and the largest
    log-probability difference of the chosen tokens on those agreeing prefixes."""
    agreed, worst = 0, 0.0
    for (vt, vl), (ht, hl) in zip(vllm_runs, hf_runs, strict=True):
        n = agreement(vt, ht)
        agreed += n
        if n:
            worst = max(worst, max(abs(a - b) for a, b in zip(vl[:n], hl[:n], strict=True)))
    return agreed, worst


#: Configurations compared with HF: (steerings in order, λ). 'football' and 'mixed' have
#: support "all" (continuous maps); 'bounded' has support q0-100, whose bounds make the map
#: jump where a unit crosses one, so a difference of 1e-6 there shows in the log-probabilities
#: (HF itself, perturbed by relative noise of 1e-6 on its post-attention norms, moves "Yesterday
#: I went to the" by 9.6e-3 under support q0-100 at λ = 0.5, by 1.2e-5 under support "all"):
#: for it the tokens are compared, the log-probabilities only reported.
CONFIGS = [
    (("mixed", "football"), 0.0),
    (("mixed",), 0.5),
    (("mixed",), 1.0),
    (("football",), 0.5),
    (("football",), 1.0),
    (("mixed", "football"), 0.5),
    (("football", "mixed"), 1.0),
    (("bounded",), 0.5),
    (("bounded",), 1.0),
    (("gated",), 0.5),
    (("gated",), 1.0),
    (("gated", "mixed"), 1.0),
]


def test_steered_vllm_matches_steered_hf_as_closely_as_plain_does(llm, smol, steerings, prompt_ids):
    total = TOKENS * len(PROMPTS)
    hf_plain = [hf_greedy(smol, p) for p in prompt_ids]
    plain = compare(run(llm, prompt_ids, [None] * len(PROMPTS)), hf_plain)
    mode = "compiled" if compiled(llm) else "eager"
    print(f"\n{mode} plain: {plain[0]}/{total} tokens agree, max |Δ logprob| {plain[1]:.2e}")
    changed = False
    for names, lam in CONFIGS:
        extra = {"actsteer": {name: lam for name in names}}
        hf = [hf_greedy(smol, p, [(steerings[name], lam) for name in names]) for p in prompt_ids]
        steered = compare(run(llm, prompt_ids, [extra] * len(PROMPTS)), hf)
        print(f"λ={lam} {' then '.join(names)}: {steered[0]}/{total} agree, {steered[1]:.2e}")
        assert steered[0] >= plain[0] - 2, (names, lam, steered, plain)
        if "bounded" not in names:
            assert steered[1] <= max(10 * plain[1], 1e-4), (names, lam, steered, plain)
        changed |= any(h[0] != q[0] for h, q in zip(hf, hf_plain, strict=True))
    assert changed, "no steering changed a continuation: the comparison would not see one"


def test_a_mixed_batch_equals_each_request_alone(llm, prompt_ids):
    p = prompt_ids
    requests = [
        (p[0], None),
        (p[1], {"actsteer": {"football": 1.0}}),
        (p[2], {"actsteer": {"mixed": 0.5, "football": 0.5}}),
        (p[2], {"actsteer": {"football": 0.5, "mixed": 0.5}}),  # the other order
        (p[3], {"actsteer": "football=0.3"}),
        (p[1], {"actsteer": "mixed=1"}),
        (p[0], {"actsteer": {"bounded": 0.7}}),  # tokens only: see CONFIGS
        (p[3], {"actsteer": {"gated": 1.0}}),
    ]
    together = run(llm, [r[0] for r in requests], [r[1] for r in requests])
    alone = [run(llm, [prompt], [extra])[0] for prompt, extra in requests]
    for (tokens, logprobs), (tokens_alone, logprobs_alone), (_, extra) in zip(
        together, alone, requests, strict=True
    ):
        assert tokens == tokens_alone
        if "bounded" not in str(extra):
            assert torch.allclose(torch.tensor(logprobs), torch.tensor(logprobs_alone), atol=1e-4)
    assert together[2][1] != together[3][1], "the order of two steerings made no difference"


def test_unsteered_requests_in_a_steered_batch_and_zero_strength_are_the_plain_engine(
    llm, prompt_ids
):
    p = prompt_ids
    plain = run(llm, [p[0], p[1]], [None, None])
    mixed = run(llm, [p[0], p[1]], [None, {"actsteer": {"mixed": 1.0, "football": 1.0}}])
    zero = run(llm, [p[0], p[1]], [{"actsteer": {"football": 0.0}}, {"actsteer": "mixed=0"}])
    # vLLM on CPU is not bit-for-bit repeatable from one generate call to the next (1e-7)
    assert mixed[0][0] == plain[0][0] and zero[0][0] == plain[0][0] and zero[1][0] == plain[1][0]
    for found, expected in ((mixed[0], plain[0]), (zero[0], plain[0]), (zero[1], plain[1])):
        assert torch.allclose(torch.tensor(found[1]), torch.tensor(expected[1]), atol=1e-5)
    assert mixed[1][0] != plain[1][0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"nope": 1.0},
            r"unknown steering 'nope'; this engine serves: football, mixed, bounded, gated",
        ),
        ({"football": 1.5}, r"steering 'football': .*1"),
        ("football=x", r"strength of steering 'football' must be a number"),
        (3, r'extra_args\["actsteer"\] must be an object'),
    ],
)
def test_a_bad_request_is_refused_and_the_engine_keeps_serving(llm, prompt_ids, extra, message):
    with pytest.raises(vllm.exceptions.VLLMValidationError, match=message):
        run(llm, prompt_ids[:1], [{"actsteer": extra}])
    assert len(run(llm, prompt_ids[:1], [None])[0][0]) == TOKENS


def try_install(worker, module: str, width: int, tables: bool) -> str:
    """In vLLM's worker: install a steering of `module` on the loaded model (eager hooks, or
    `tables` for the compiled mode); the error."""
    from actsteer.integrations.batch import BatchSteering
    from actsteer.integrations.vllm import install, install_tables

    steering = Steering({module: AffineMap(torch.ones(width), torch.zeros(width))})
    model = worker.model_runner.model
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    buffers = len(list(model.buffers()))
    try:
        if tables:
            install_tables(model, BatchSteering({"bad": steering}), 576, 64)
        else:
            install(model, BatchSteering({"bad": steering}), 576)
    except Exception as err:  # the message travels back to the test
        assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
        assert len(list(model.buffers())) == buffers
        return str(err)
    return ""


@pytest.mark.parametrize(
    ("module", "width", "message"),
    [
        ("model.layers.0.self_attn.q_proj", 576, r"inside vLLM's fused qkv_proj"),
        ("model.layers.2.mlp.up_proj", 1536, r"inside vLLM's fused gate_up_proj"),
        ("model.embed_tokens", 576, r"VocabParallelEmbedding, not a norm"),
        ("model.layers.1.post_attention_layernorm", 100, r"100 units .* has 576"),
    ],
)
def test_an_unmappable_module_is_a_clear_error_and_hooks_nothing(llm, module, width, message):
    (error,) = llm.collective_rpc(try_install, args=(module, width, compiled(llm)))
    assert error, f"{module} was installed"
    assert re.search(message, error), error


def test_unsupported_compilation_prefix_caching_and_a_missing_logits_processor_are_refused():
    from actsteer.errors import ActSteerError
    from actsteer.integrations.vllm import LOGITS_PROCESSOR, SCHEDULER, check_engine

    def check(**kwargs):
        settings = {"enforce_eager": True, "enable_prefix_caching": False}
        settings["logits_processors"] = [LOGITS_PROCESSOR]
        args = vllm.EngineArgs(model=model_folder(), load_format="actsteer", **(settings | kwargs))
        config = args.create_engine_config()
        if "cudagraph_mode" in kwargs.get("compilation_config", {}):  # CPU turns graphs off
            config.compilation_config.cudagraph_mode = kwargs["compilation_config"][
                "cudagraph_mode"
            ]
        check_engine(config)

    compiled = {"enforce_eager": False}
    with pytest.raises(ActSteerError, match=r"compilation modes .*not STOCK_TORCH_COMPILE"):
        check(**compiled, compilation_config={"mode": 1})
    full = vllm.config.CUDAGraphMode.FULL_AND_PIECEWISE
    with pytest.raises(ActSteerError, match=r"FULL_AND_PIECEWISE: a full CUDA graph .*PIECEWISE"):
        check(**compiled, compilation_config={"cudagraph_mode": full})
    with pytest.raises(ActSteerError, match=r"max_autotune or freezing"):
        check(**compiled, compilation_config={"inductor_compile_config": {"max_autotune": True}})
    with pytest.raises(ActSteerError, match=r"--scheduler-cls .*enable_prefix_caching=False"):
        check(enable_prefix_caching=True)
    with pytest.raises(ActSteerError, match=r"--logits-processors"):
        check(logits_processors=None)
    check()
    check(**compiled)
    check(enable_prefix_caching=True, scheduler_cls=SCHEDULER)


def compilation_counts(worker) -> dict:
    """In vLLM's worker: vLLM's compilation counters, Dynamo's counts of graphs and frames
    compiled, and whether the model's backbone runs a compiled function."""
    import dataclasses

    from vllm.compilation.counter import compilation_counter

    counts = dataclasses.asdict(compilation_counter)
    counts["dynamo_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    counts["dynamo_frames"] = dict(torch._dynamo.utils.counters["frames"])
    counts["compiled_backbone"] = any(
        getattr(m, "aot_compiled_fn", None) is not None or getattr(m, "compiled", False) is True
        for m in worker.model_runner.model.modules()
    )
    return counts


def test_new_strengths_and_mixes_compile_nothing(llm, prompt_ids):
    """In compiled mode: after a first steered batch, other strengths, other steerings, other
    mixes and other batch sizes run the graph already compiled (vLLM's and Dynamo's counters
    unchanged) and do steer."""
    if not compiled(llm):
        pytest.skip("eager mode compiles nothing")
    first = run(llm, prompt_ids[:2], [{"actsteer": {"football": 1.0}}, None])
    (before,) = llm.collective_rpc(compilation_counts)
    print(f"\ncompilation counters: {before}")
    assert before["compiled_backbone"], before
    later = [
        run(llm, prompt_ids[:2], [{"actsteer": {"football": 0.3}}, None]),
        run(llm, prompt_ids, [{"actsteer": {"mixed": 1.0, "gated": 0.5}}] * 4),
        run(llm, prompt_ids[:3], [None, {"actsteer": "bounded=0.5"}, {"actsteer": "gated=1"}]),
    ]
    (after,) = llm.collective_rpc(compilation_counts)
    assert after == before
    assert later[0][0][0] != first[0][0]  # λ 0.3 is not λ 1


def test_prefix_caching_keeps_each_steerings_prefixes_apart(llm, smol, steerings, prompt_ids):
    """A shared system prompt, longer than a KV block, served unsteered and steered in turn:
    a prefix is reused only by requests with the same steerings (vLLM's num_cached_tokens), and
    each request gets what it gets with nothing cached (HF's greedy tokens, as in the other
    tests). Prints the prefill saved."""
    block = llm.llm_engine.vllm_config.cache_config.block_size
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    shared = (smol[1]("You are a helpful assistant. " * 40).input_ids * 4)[: block + 8]
    prompt = shared + prompt_ids[2]
    order = [None, {"football": 1.0}, {"football": 1.0}, None, {"football": 0.5},
             {"mixed": 0.5, "football": 0.5}, {"football": 0.0}, {"football": 0.5}]  # fmt: skip
    expected_hit = [False, False, True, True, False, False, True, True]
    cached, prompt_tokens = 0, 0
    for spec, hit in zip(order, expected_hit, strict=True):
        extra = None if spec is None else {"actsteer": spec}
        params = vllm.SamplingParams(temperature=0, max_tokens=TOKENS, min_tokens=TOKENS,
                                     extra_args=extra)  # fmt: skip
        [out] = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        assert (out.num_cached_tokens >= block) == hit, (spec, out.num_cached_tokens)
        applied = [(steerings[name], lam) for name, lam in (spec or {}).items()]
        reference, _ = hf_greedy(smol, prompt, applied)
        assert agreement(list(out.outputs[0].token_ids), reference) >= TOKENS // 2, spec
        cached, prompt_tokens = cached + out.num_cached_tokens, prompt_tokens + len(prompt)
    print(f"\nprefix cache: {cached} of {prompt_tokens} prompt tokens served from it "
          f"({cached / prompt_tokens:.0%}; block size {block})")  # fmt: skip


def count_transport_calls(worker, on: bool) -> int:
    """In vLLM's worker: start (on) or stop counting the calls of the one transport; the count
    so far."""
    from actsteer.transport import Transport

    original = getattr(Transport, "uncounted", None)
    if on and original is None:
        Transport.uncounted = Transport.__call__
        Transport.calls = 0

        def counted(self, a, strength):
            Transport.calls += 1
            return Transport.uncounted(self, a, strength)

        Transport.__call__ = counted
    elif not on and original is not None:
        Transport.__call__ = original
        del Transport.uncounted
    return getattr(Transport, "calls", 0)


def test_the_plugins_hooks_steer_through_the_one_transport(llm, prompt_ids):
    """Each steered module's eager hook in vLLM calls actsteer.transport.Transport (per-token
    λ); the compiled hook calls its functions (tests/test_slots.py)."""
    if compiled(llm):
        pytest.skip("the compiled graph calls the transport's functions, traced")
    llm.collective_rpc(count_transport_calls, args=(True,))
    try:
        run(llm, prompt_ids[:1], [None])
        (unsteered,) = llm.collective_rpc(count_transport_calls, args=(True,))
        run(llm, prompt_ids[:1], [{"actsteer": {"football": 1.0}}])
        (steered,) = llm.collective_rpc(count_transport_calls, args=(True,))
    finally:
        llm.collective_rpc(count_transport_calls, args=(False,))
    assert unsteered == 0
    assert steered - unsteered >= 30 * TOKENS  # the 30 post-attn-ln of every forward pass
