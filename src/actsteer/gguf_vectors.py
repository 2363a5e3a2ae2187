"""llama.cpp control vectors: additive steerings of the residual stream as GGUF files, both ways.

The convention, as llama.cpp implements it (read in the llama.cpp that llama-cpp-python 0.3.36
vendors):

- src/llama-adapter.cpp, `llama_adapter_cvec`: one F32 vector of n_embd per layer
  il = 1 … n_layer − 1 ("there's never a tensor for layer 0"); each model graph adds it to the
  output of block il (`cur = build_cvec(cur, il)` right after the FFN's residual add, the tensor
  llama.cpp calls `l_out-il`). That is the output of Hugging Face's `model.layers[il]`, 0-based.
- common/common.cpp, `common_control_vector_load_one`: tensors named `direction.N`, F32, 1-D,
  all of one length; N = 0 is refused ("invalid (zero) direction tensor layer index"); tensors
  of one layer add up, and a file's scale multiplies them all.
- Metadata as llama.cpp's cvector-generator writes it: general.architecture = "controlvector",
  controlvector.model_hint (the model's llama.cpp architecture) and controlvector.layer_count
  (i32, the number of direction tensors); llama.cpp's loader reads neither.
- repeng's `export_gguf` writes `direction.{i}` for the vector it adds at the output of
  model.layers[i]: the same convention. llama.cpp's cvector-generator measures at `l_out` of
  block i and names the result direction.{i + 1}; it is read here the way llama.cpp applies it,
  at block i + 1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from actsteer.capture import resolve_modules
from actsteer.errors import ActSteerError
from actsteer.families import family_of, model_type
from actsteer.maps import SUPPORT_ALL, AffineMap, UnitMap, affine_only

ARCHITECTURE = "controlvector"
#: Hugging Face model types whose llama.cpp architecture has another name.
_LLAMA_CPP_ARCH = {"mistral": "llama", "gemma3_text": "gemma3"}
_FOLD_INSTEAD = (
    "; where the steering folds, `actsteer export --steering S -o DIR` writes a checkpoint "
    "instead, which llama.cpp's convert_hf_to_gguf.py turns into a GGUF model"
)


def llama_cpp_arch(model: nn.Module) -> str:
    """The name llama.cpp gives the model's architecture (its GGUF general.architecture)."""
    kind = model_type(model)
    return _LLAMA_CPP_ARCH.get(kind, kind)


def decoder_blocks(model: nn.Module) -> list[str]:
    """The model's decoder blocks in order: the "residual" preset of its family."""
    if "residual" not in family_of(model, "a llama.cpp control vector").presets:
        raise ActSteerError(
            f"model type {model_type(model)!r} has no decoder blocks to steer with a control vector"
        )
    return resolve_modules(model, "residual")


def first_block_left_out(maps: dict[str, UnitMap], model: nn.Module) -> str | None:
    """The first decoder block, where `maps` steer it: llama.cpp has no direction.0, so a
    control vector leaves that block's map out."""
    first = decoder_blocks(model)[0]
    return first if first in maps else None


def write_control_vector(
    maps: dict[str, UnitMap],
    model: nn.Module,
    path: str | Path,
    strength: float,
    support: str,
    provenance: dict[str, str] | None = None,
) -> Path:
    """Write λ·β of each steered block as tensor `direction.<block>` of a control-vector GGUF.

    Only what llama.cpp can add is accepted: support "all", ω = 1 (Mean-AcT, ActAdd, ITI-c),
    decoder block outputs. Block 0 is left out (llama.cpp never steers it; see
    `first_block_left_out`). `provenance` goes in as `actsteer.*` strings.
    """
    import gguf

    affine = {
        name: affine_only(
            amap, "a llama.cpp control vector", "serve it with `actsteer serve` or vLLM instead"
        )
        for name, amap in maps.items()
    }
    if support != SUPPORT_ALL:
        raise ActSteerError(
            f"support {support!r} moves only activations inside per-unit bounds, and a control "
            "vector adds the same vector to every activation; export with --support all"
            + _FOLD_INSTEAD
        )
    blocks = decoder_blocks(model)
    index = {name: i for i, name in enumerate(blocks)}
    directions: dict[int, np.ndarray] = {}
    for name, amap in affine.items():
        if name not in index:
            raise ActSteerError(
                f"module {name!r} is not a decoder block's output, and llama.cpp adds control "
                "vectors only to the residual stream (fit with --modules residual)" + _FOLD_INSTEAD
            )
        scale, shift = amap.at(strength)
        if (scale != 1).any():
            raise ActSteerError(
                f"the map of {name!r} scales {int((scale != 1).sum())} unit(s) (ω ≠ 1), and a "
                "control vector only adds a vector; additive methods (mean-act, actadd, iti-c) "
                "export" + _FOLD_INSTEAD
            )
        if index[name] > 0:  # llama.cpp has no direction.0: callers say block 0 is left out
            directions[index[name]] = shift.detach().float().cpu().numpy()
    if not directions:
        raise ActSteerError(
            "this steering acts on the first decoder block only, which llama.cpp never steers "
            "(its control vectors start at block 1): fit on later blocks" + _FOLD_INSTEAD
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", llama_cpp_arch(model))
    writer.add_int32(f"{ARCHITECTURE}.layer_count", len(directions))
    for key, value in (provenance or {}).items():
        writer.add_string(f"actsteer.{key}", value)
    for block in sorted(directions):
        writer.add_tensor(f"direction.{block}", directions[block])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _string(field: Any) -> str:
    """The value of a GGUF string field."""
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def read_control_vector(
    path: str | Path, model: nn.Module
) -> tuple[dict[str, UnitMap], dict[str, Any]]:
    """The maps (ω = 1, β = the summed `direction.N`, at block N) of a control-vector GGUF for
    `model`, and a description of the file; anything llama.cpp would refuse, or that does not
    fit the model, is a clear error."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ActSteerError(f"no control vector file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as err:
        raise ActSteerError(f"{str(path)!r} is not a readable GGUF file: {err}") from None
    fields = reader.fields
    arch = _string(fields["general.architecture"]) if "general.architecture" in fields else None
    if arch != ARCHITECTURE:
        raise ActSteerError(
            f"{str(path)!r} is not a llama.cpp control vector (general.architecture is "
            f"{arch!r}, not {ARCHITECTURE!r}); a model GGUF is loaded with actsteer.load_model"
        )
    hint_field = fields.get(f"{ARCHITECTURE}.model_hint")
    hint = _string(hint_field) if hint_field is not None else None
    if hint is not None and hint not in (model_type(model), llama_cpp_arch(model)):
        raise ActSteerError(
            f"{str(path)!r} was made for a {hint!r} model, and this model is "
            f"{model_type(model)!r}; use a control vector made for this model"
        )
    blocks = decoder_blocks(model)
    config: Any = getattr(model, "config", None)
    width = int(config.hidden_size)
    vectors: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        found = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if found is None:
            raise ActSteerError(
                f"{str(path)!r} holds tensor {tensor.name!r}; a control vector holds only "
                "tensors named direction.N"
            )
        block = int(found[1])
        shape = [int(n) for n in tensor.shape]
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(shape) != 1:
            raise ActSteerError(
                f"tensor {tensor.name!r} of {str(path)!r} is {tensor.tensor_type.name} of shape "
                f"{shape}; llama.cpp reads only 1-D F32 direction tensors"
            )
        if shape[0] != width:
            raise ActSteerError(
                f"tensor {tensor.name!r} of {str(path)!r} has {shape[0]} values but this model's "
                f"residual stream has {width}; use a control vector made for this model"
            )
        if not 1 <= block < len(blocks):
            raise ActSteerError(
                f"tensor {tensor.name!r} of {str(path)!r} steers block {block}, and llama.cpp "
                f"steers blocks 1 to {len(blocks) - 1} of this {len(blocks)}-block model"
            )
        values = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
        vectors[block] = vectors[block] + values if block in vectors else values
    if not vectors:
        raise ActSteerError(f"{str(path)!r} holds no direction tensor: it steers nothing")
    maps: dict[str, UnitMap] = {
        blocks[block]: AffineMap(torch.ones(width), vectors[block]) for block in sorted(vectors)
    }
    provenance = {
        key.removeprefix("actsteer."): _string(field)
        for key, field in fields.items()
        if key.startswith("actsteer.")
    }
    description = {"gguf": str(path), "model_hint": hint, "blocks": sorted(vectors)}
    return maps, {**description, **({"actsteer": provenance} if provenance else {})}
