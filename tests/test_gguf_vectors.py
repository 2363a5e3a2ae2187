"""llama.cpp control vectors: the format facts llama.cpp's loader relies on, checked with the
`gguf` package (no llama.cpp needed), reading back files as repeng and llama.cpp write them,
and every refusal."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import actsteer
from actsteer import cli
from actsteer.export import export_control_vector
from actsteer.maps import AffineMap
from actsteer.steering import SteeringInfo

PROMPTS = ["The weather today is", "I think that the best way to"]
FOLD_HINT = "actsteer export --steering S -o DIR"


def logits(model, tok) -> torch.Tensor:
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**enc).logits


def additive(model, blocks=(1, 2), method="mean-act") -> actsteer.Steering:
    torch.manual_seed(0)
    width = model.config.hidden_size
    maps = {f"model.layers.{k}": AffineMap(torch.ones(width), torch.randn(width)) for k in blocks}
    return actsteer.Steering(maps, SteeringInfo(method=method, model_name="tiny"))


def write_like(path, tensors, hint="llama", arch="controlvector", unsigned_count=False):
    """A control vector written the way repeng (uint32 layer_count) or llama.cpp's
    cvector-generator (int32) writes one."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", hint)
    count = writer.add_uint32 if unsigned_count else writer.add_int32
    count(f"{arch}.layer_count", len(tensors))
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_file_is_what_llama_cpp_loads(tiny_llama, tmp_path):
    steering = additive(tiny_llama)
    path = export_control_vector(steering, tiny_llama, tmp_path / "v.gguf", strength=0.5)
    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def value(key):
        field = fields[key]
        return field.parts[field.data[0]]

    assert bytes(value("general.architecture")).decode() == "controlvector"
    assert bytes(value("controlvector.model_hint")).decode() == "llama"
    count = fields["controlvector.layer_count"]
    assert count.types == [gguf.GGUFValueType.INT32] and int(value(count.name)[0]) == 2
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.2"]  # no direction.0
    for tensor in reader.tensors:
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(n) for n in tensor.shape] == [32]  # 1-D, n_embd
        beta = steering.maps[f"model.layers.{tensor.name.split('.')[1]}"].beta
        np.testing.assert_array_equal(np.asarray(tensor.data), (0.5 * beta).numpy())
    assert bytes(value("actsteer.method")).decode() == "mean-act"


def test_read_back_steers_as_the_original(tiny_llama, tokenizer, tmp_path):
    steering = additive(tiny_llama)
    path = export_control_vector(steering, tiny_llama, tmp_path / "v.gguf", strength=0.5)
    read = actsteer.Steering.from_gguf(path, tiny_llama)
    assert read.modules == ["model.layers.1", "model.layers.2"] and read.method == "actadd"
    assert read.info.data["blocks"] == [1, 2] and read.info.data["actsteer"]["strength"] == "0.5"
    with steering.applied(tiny_llama, 0.5, "all"):
        expected = logits(tiny_llama, tokenizer)
    with read.applied(tiny_llama, 1.0):
        assert torch.equal(logits(tiny_llama, tokenizer), expected)
    with read.applied(tiny_llama, -2.0):  # llama.cpp's scale: any coefficient
        assert not torch.allclose(logits(tiny_llama, tokenizer), expected)
    read.save(tmp_path / "read.safetensors")
    assert actsteer.Steering.load(tmp_path / "read.safetensors").modules == read.modules


def test_repeng_and_llama_cpp_generator_files_read(tiny_llama, tmp_path):
    rng = np.random.default_rng(0)
    vectors = {f"direction.{k}": rng.standard_normal(32).astype(np.float32) for k in (1, 2)}
    for name, kwargs in [("repeng", {"unsigned_count": True}), ("cvector-generator", {})]:
        path = write_like(tmp_path / f"{name}.gguf", vectors, **kwargs)
        read = actsteer.Steering.from_gguf(path, tiny_llama)
        for k in (1, 2):
            np.testing.assert_array_equal(
                read.maps[f"model.layers.{k}"].beta.numpy(), vectors[f"direction.{k}"]
            )
            assert torch.equal(read.maps[f"model.layers.{k}"].omega, torch.ones(32))


@pytest.mark.parametrize(
    ("tensors", "kwargs", "message"),
    [
        ({"direction.0": np.ones(32, np.float32)}, {}, "steers block 0, and llama.cpp steers"),
        ({"direction.3": np.ones(32, np.float32)}, {}, "steers blocks 1 to 2 of this 3-block"),
        ({"direction.1": np.ones(16, np.float32)}, {}, "has 16 values but this model's"),
        ({"direction.1": np.ones(32, np.float16)}, {}, "only 1-D F32 direction tensors"),
        ({"direction.1": np.ones((2, 16), np.float32)}, {}, "only 1-D F32 direction tensors"),
        ({"bias.1": np.ones(32, np.float32)}, {}, "only tensors named direction.N"),
        ({"direction.1": np.ones(32, np.float32)}, {"hint": "gpt2"}, "made for a 'gpt2' model"),
        ({"direction.1": np.ones(32, np.float32)}, {"arch": "llama"}, "not a llama.cpp control"),
        ({}, {}, "holds no direction tensor"),
    ],
)
def test_bad_files_are_clear_errors(tiny_llama, tmp_path, tensors, kwargs, message):
    path = write_like(tmp_path / "bad.gguf", tensors, **kwargs)
    with pytest.raises(actsteer.ActSteerError, match=message):
        actsteer.Steering.from_gguf(path, tiny_llama)


def test_missing_and_damaged_files_are_clear_errors(tiny_llama, tmp_path):
    with pytest.raises(actsteer.ActSteerError, match="no control vector file"):
        actsteer.Steering.from_gguf(tmp_path / "none.gguf", tiny_llama)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(actsteer.ActSteerError, match="not a readable GGUF file"):
        actsteer.Steering.from_gguf(tmp_path / "junk.gguf", tiny_llama)


def test_what_llama_cpp_cannot_express_is_refused(
    tiny_llama, tokenizer, neutral, football, tmp_path
):
    out = tmp_path / "v.gguf"
    linear = actsteer.fit(
        tiny_llama, tokenizer, neutral[:32], football[:32], modules=r"model\.layers\.[12]",
        method="linear-act", progress=False,
    )  # fmt: skip
    norms = additive(tiny_llama)
    norms.maps = {"model.layers.1.post_attention_layernorm": norms.maps["model.layers.1"]}
    cases = [
        (linear, {}, r"scales \d+ unit\(s\) \(ω ≠ 1\)"),
        (additive(tiny_llama), {"support": "q0-100"}, "moves only activations inside"),
        (norms, {}, "is not a decoder block's output"),
        (additive(tiny_llama, blocks=(0,)), {}, "first decoder block only, which llama.cpp"),
    ]
    for steering, kwargs, message in cases:
        with pytest.raises(actsteer.ActSteerError, match=message) as error:
            export_control_vector(steering, tiny_llama, out, 1.0, **kwargs)
        assert FOLD_HINT in str(error.value)
        assert not out.exists()
    with pytest.raises(actsteer.ActSteerError, match="outside"):
        export_control_vector(additive(tiny_llama), tiny_llama, out, 1.5)


def test_block_0_is_left_out_with_a_warning(tiny_llama, tmp_path):
    """llama.cpp never steers block 0: the control vector of a steering of the whole residual
    stream holds the other blocks, and says it left block 0 out."""
    steering = additive(tiny_llama, blocks=(0, 1))
    left_out = r"leaves out the map of the first block \('model\.layers\.0'\)"
    with pytest.warns(UserWarning, match=left_out):
        export_control_vector(steering, tiny_llama, tmp_path / "v.gguf", 0.5)
    read = actsteer.Steering.from_gguf(tmp_path / "v.gguf", tiny_llama)
    assert read.modules == ["model.layers.1"]
    torch.testing.assert_close(
        read.maps["model.layers.1"].beta, 0.5 * steering.maps["model.layers.1"].beta
    )


def test_cli_exports_a_control_vector(tiny_llama, tokenizer, monkeypatch, tmp_path):
    monkeypatch.setattr(cli.core, "load_model", lambda name, **placement: (tiny_llama, tokenizer))
    steering = additive(tiny_llama)
    steering.save(tmp_path / "s.safetensors")
    out = tmp_path / "v.gguf"
    args = ["export", "--steering", str(tmp_path / "s.safetensors"), "--format", "gguf"]
    result = CliRunner().invoke(cli.app, [*args, "--strength", "0.25", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "direction.1, direction.2" in result.stdout
    read = actsteer.Steering.from_gguf(out, tiny_llama)
    torch.testing.assert_close(
        read.maps["model.layers.2"].beta, 0.25 * steering.maps["model.layers.2"].beta
    )
    again = CliRunner().invoke(cli.app, [*args, "-o", str(out)])
    assert again.exit_code != 0 and "exists" in again.stderr
    assert (
        actsteer.Steering.from_gguf(out, tiny_llama)
        .maps["model.layers.2"]
        .beta.equal(read.maps["model.layers.2"].beta)
    )  # the refused export left the file as it was
    forced = CliRunner().invoke(cli.app, [*args, "-o", str(out), "--force", "-s", "1"])
    assert forced.exit_code == 0, forced.output
    assert actsteer.Steering.from_gguf(out, tiny_llama).info.data["actsteer"]["strength"] == "1"
    bounded = tmp_path / "bounded.gguf"
    refused = CliRunner().invoke(cli.app, [*args, "--support", "q0-100", "-o", str(bounded)])
    assert refused.exit_code != 0 and "moves only activations inside" in refused.stderr
    assert "Traceback" not in refused.output and not bounded.exists()
    unknown = CliRunner().invoke(cli.app, [*args[:3], "--format", "onnx", "-o", str(out)])
    assert unknown.exit_code != 0 and "--format" in unknown.stderr
