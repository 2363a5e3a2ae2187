"""GPUs and dtypes from the command line (issue 26): --device and --dtype on every command that
loads a model, checked before any weight is read; bfloat16 on the CPU agrees with float32 within
bfloat16's rounding, and λ = 0 is the plain bfloat16 model bit for bit. The CUDA paths are
checked on a GPU by benchmarks/gpu_check.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import actsteer
from actsteer import ActSteerError, cli
from actsteer.placement import resolve_device, resolve_dtype

pytestmark = pytest.mark.filterwarnings("ignore:actsteer. little data")


@pytest.fixture(scope="module")
def model_folder(tiny_llama, tokenizer, tmp_path_factory):
    """The tiny Llama saved as a model folder, so the real load_model reads it."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_files(neutral, football, tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    (folder / "s.txt").write_text("\n".join(neutral[:32]) + "\n")
    (folder / "t.txt").write_text("\n".join(football[:32]) + "\n")
    return folder / "s.txt", folder / "t.txt"


def test_dtypes_by_name():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ActSteerError, match="unknown dtype 'float64'; choose one of float32"):
        resolve_dtype("float64")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_missing_gpu_is_named_before_anything_loads():
    with pytest.raises(ActSteerError, match="sees no CUDA GPU .*use --device cpu"):
        resolve_device("cuda:0")
    with pytest.raises(ActSteerError, match="unknown device 'gpu'; give cpu, cuda, cuda:N"):
        resolve_device("gpu")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto") == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("command", ["fit", "generate", "calibrate", "eval", "monitor", "serve"])
def test_every_model_command_checks_device_and_dtype_first(command):
    """The reason, before any file is read or model loaded (their options are missing here)."""
    result = CliRunner().invoke(cli.app, [command, "--device", "cuda"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "sees no CUDA GPU" in result.stderr, result.output
    wrong = CliRunner().invoke(cli.app, [command, "--dtype", "float64"])
    assert wrong.exit_code == 1 and "unknown --dtype 'float64'" in wrong.stderr


def test_bfloat16_fit_and_steering_agree_with_float32(tiny_llama, tokenizer, neutral, football):
    plain32, plain16 = tiny_llama, copy.deepcopy(tiny_llama).to(torch.bfloat16)
    fitted = {
        dtype: actsteer.fit(m, tokenizer, neutral[:32], football[:32], support="all")
        for dtype, m in (("float32", plain32), ("bfloat16", plain16))
    }
    for name in fitted["float32"].modules:
        a, b = fitted["float32"].maps[name], fitted["bfloat16"].maps[name]
        assert b.omega.dtype == torch.float32, "maps stay float32"
        torch.testing.assert_close(b.omega, a.omega, rtol=0.02, atol=0.02)
        torch.testing.assert_close(b.beta, a.beta, rtol=0.05, atol=1e-3)
    ids = tokenizer(["The weather today is", "Kick-off is at"], return_tensors="pt", padding=True)
    with torch.no_grad():
        p32, p16 = plain32(**ids).logits, plain16(**ids).logits.float()
        with fitted["float32"].applied(plain32, 1.0):
            s32 = plain32(**ids).logits
        with fitted["bfloat16"].applied(plain16, 1.0):
            s16 = plain16(**ids).logits.float()
        with fitted["bfloat16"].applied(plain16, 0.0):
            zero16 = plain16(**ids).logits.float()
    rounding = (p32 - p16).abs().max()
    assert torch.equal(zero16, p16), "λ = 0 is the plain bfloat16 model, bit for bit"
    assert (s32 - p32).abs().max() > 10 * rounding, "the steering moves more than rounding"
    assert (s32 - s16).abs().max() < 3 * rounding


def test_export_writes_the_dtype_asked(model_folder, text_files, tmp_path):
    """fit, generate and export from the real loader in bfloat16: the folded checkpoint is
    bfloat16 (half the float32 size) and matches the hooked bfloat16 model."""
    source, target = text_files
    steering = tmp_path / "s.safetensors"
    runner = CliRunner()
    placed = ["--model", str(model_folder), "--dtype", "bfloat16", "--device", "cpu"]
    fit = ["fit", "--source", str(source), "--target", str(target), "-o", str(steering)]
    result = runner.invoke(cli.app, [*fit, *placed, "--support", "all"])
    assert result.exit_code == 0, result.output
    assert "(cpu, bfloat16)" in result.stderr
    generated = runner.invoke(
        cli.app,
        ["generate", "--steering", str(steering), "--max-new-tokens", "3", *placed, "--", "Hi"],
    )
    assert generated.exit_code == 0, generated.output
    outs = {}
    for dtype in ("bfloat16", "float32"):
        out = outs[dtype] = tmp_path / dtype
        args = ["export", "--steering", str(steering), "-o", str(out), "--dtype", dtype]
        exported = runner.invoke(cli.app, [*args, "--model", str(model_folder)])
        assert exported.exit_code == 0, exported.output
        assert float(exported.stdout.rsplit("max |Δ| = ", 1)[1].split()[0]) < 0.05
    with safe_open(str(outs["bfloat16"] / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict) == {torch.bfloat16}
    assert json.loads((outs["bfloat16"] / "config.json").read_text())["dtype"] == "bfloat16"
    sizes = {d: (outs[d] / "model.safetensors").stat().st_size for d in outs}
    assert sizes["bfloat16"] < 0.55 * sizes["float32"]


def test_auto_placement_loads_through_accelerate(model_folder, tokenizer, monkeypatch):
    """device "auto" hands placement to accelerate (here, with no GPU, all on the CPU) and gives
    the same model as a plain CPU load; dtype "auto" keeps the checkpoint's float32."""
    from actsteer import models

    asked = []
    original = models.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        asked.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", recording)
    auto, _ = actsteer.load_model(str(model_folder), device="auto", dtype="auto")
    plain, _ = actsteer.load_model(str(model_folder))
    assert asked == ["auto", None]
    assert next(auto.parameters()).dtype == torch.float32, "the checkpoint's own dtype"
    ids = tokenizer(["Hello there"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(auto(**ids).logits, plain(**ids).logits)


@pytest.mark.parametrize("contents", [[], ["notes.txt"]])
def test_a_folder_without_a_model_says_so(contents, tmp_path):
    for name in contents:
        (tmp_path / name).write_text("not a model\n")
    result = CliRunner().invoke(cli.app, ["generate", "--model", str(tmp_path), "--", "Hi"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "holds no model: a model folder has config.json" in result.stderr
