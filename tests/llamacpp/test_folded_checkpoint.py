"""Linear-AcT in llama.cpp: a steering folded into SmolLM2's weights (`actsteer export`),
converted by llama.cpp's own convert_hf_to_gguf.py (from the llama-cpp-python source that
`make test-llamacpp` builds, given as $LLAMA_CPP_SDIST) into an F32 GGUF, and run by llama.cpp,
gives the hooked Hugging Face model's next-token distribution.

Both engines compute in float32 here, so they agree to float32 rounding: the test asks for a
gap of log-probabilities (over the 32 most probable tokens) a hundred times smaller than what
the steering changes.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

import actsteer
from actsteer.export import export
from tests.conftest import package_texts
from tests.llamacpp.test_control_vector import TOP, cpp_logprobs, hf_logprobs, llama_cpp

SOURCE_TREE = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
PROMPTS = ["The weather today is", "Yesterday I went to the", "My favourite food is"]


@pytest.fixture(scope="module")
def converter(tmp_path_factory):
    """llama.cpp's converter and its gguf-py, unpacked from the llama-cpp-python source."""
    sdist = os.environ.get("LLAMA_CPP_SDIST")
    if not sdist:
        pytest.skip("set LLAMA_CPP_SDIST to llama-cpp-python's source archive (make does)")
    root = tmp_path_factory.mktemp("src")
    with tarfile.open(sdist) as archive:
        wanted = [
            m
            for m in archive.getmembers()
            if m.name == SOURCE_TREE + "convert_hf_to_gguf.py"
            or m.name.startswith((SOURCE_TREE + "conversion/", SOURCE_TREE + "gguf-py/"))
        ]
        archive.extractall(root, wanted, filter="data")
    return root / SOURCE_TREE


def test_folded_linear_act_runs_in_llama_cpp(smol, converter, tmp_path):
    model, tok = smol
    steering = actsteer.fit(
        model, tok, package_texts("neutral")[:32], package_texts("football")[:32],
        modules="post-attn-ln", method="linear-act", progress=False,
    )  # fmt: skip
    ids = [tok(p).input_ids for p in PROMPTS]
    plain = [hf_logprobs(model, i) for i in ids]
    with steering.applied(model, 0.6, "all"):
        hooked = [hf_logprobs(model, i) for i in ids]
    export(steering, copy.deepcopy(model), tok, tmp_path / "folded", 0.6, "all")
    converted = tmp_path / "folded-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(converter / "gguf-py")}
    subprocess.run(
        [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(tmp_path / "folded"),
         "--outfile", str(converted), "--outtype", "f32"],
        check=True, capture_output=True, env=env,
    )  # fmt: skip
    llm = llama_cpp.Llama(
        model_path=str(converted), n_ctx=128, logits_all=True, n_threads=2, verbose=False
    )
    try:
        for token_ids, before, after in zip(ids, plain, hooked, strict=True):
            served = cpp_logprobs(llm, token_ids, None)
            top = np.argsort(after)[-TOP:]
            moved = np.abs(after[top] - before[top]).max()
            gap = np.abs(served[top] - after[top]).max()
            print(f"steering moves {moved:.3f}, llama.cpp vs hooked model {gap:.2e}")
            assert moved > 100 * gap, (moved, gap)
    finally:
        llm.close()
