"""The module tree a steering acts on: a model itself, or a diffusers pipeline's components.

A pipeline's torch components (unet or transformer, text encoders, vae) are seen as one tree
(`unet.down_blocks.0.resnets.0.norm1`, `text_encoder.text_model…`), so module selection,
artifacts and hooks work for pipelines exactly as for language models.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from actsteer.errors import ActSteerError
from actsteer.families import PIPELINE_MODEL_TYPE

#: Pipeline components that denoise (their batch holds both classifier-free-guidance halves).
DENOISERS = ("unet", "transformer", "prior", "decoder")

#: diffusers transformer blocks that return (encoder_hidden_states, hidden_states): the image
#: stream, the one "dit-blocks" steers, is their second output (the first is the text stream).
TEXT_FIRST_BLOCKS = frozenset(
    {
        "JointTransformerBlock", "AuraFlowJointTransformerBlock", "FluxTransformerBlock",
        "FluxSingleTransformerBlock", "Flux2TransformerBlock", "Flux2SingleTransformerBlock",
        "Flux3SingleTransformerBlock", "ChromaTransformerBlock", "QwenImageTransformerBlock",
        "BriaTransformerBlock", "BriaSingleTransformerBlock", "BriaFiboTransformerBlock",
        "LongCatImageTransformerBlock", "LongCatImageSingleTransformerBlock",
        "OvisImageTransformerBlock", "OvisImageSingleTransformerBlock",
    }
)  # fmt: skip


def is_pipeline(obj: object) -> bool:
    """A diffusers pipeline (checked by class name, so diffusers is imported only when used)."""
    return any(cls.__name__ == "DiffusionPipeline" for cls in type(obj).__mro__)


class PipelineModules(nn.ModuleDict):
    """A pipeline's torch components as one module tree; hooks on it act on the pipeline."""

    def __init__(self, pipe: Any) -> None:
        components = {k: v for k, v in pipe.components.items() if isinstance(v, nn.Module)}
        super().__init__(components)
        self.config = SimpleNamespace(model_type=PIPELINE_MODEL_TYPE)
        self.name_or_path = getattr(pipe, "name_or_path", "") or type(pipe).__name__


def module_tree(model: Any) -> nn.Module:
    """The module tree to steer: the model itself, or a pipeline's components together."""
    return PipelineModules(model) if is_pipeline(model) else model


def model_name(model: nn.Module) -> str:
    """The name a model was loaded under (hub id, folder or alias), else its class name."""
    return getattr(model, "name_or_path", "") or type(model).__name__


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: its first parameter's device (CPU for a model on `meta`,
    whose layers accelerate moves to their execution device as they run)."""
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def stream_index(module: nn.Module) -> int:
    """Which element of the module's tuple output carries its activations (usually the first)."""
    return 1 if type(module).__name__ in TEXT_FIRST_BLOCKS else 0


def output_tensor(output: object, stream: int = 0, residual: bool = False) -> torch.Tensor:
    """The activations in a module's output: the output itself, or element `stream` of a tuple
    output; with `residual`, a (hidden, residual) pair's sum (vLLM's decoder layers return the
    two parts of the residual stream that a Hugging Face decoder layer returns as one)."""
    if residual and isinstance(output, tuple):
        return output[0] + output[1]
    tensor = output[stream] if isinstance(output, tuple) else output
    if not isinstance(tensor, torch.Tensor):
        raise ActSteerError(
            f"module output of type {type(tensor).__name__} cannot be steered; "
            "choose modules that return a tensor"
        )
    return tensor


def with_output(
    output: object, tensor: torch.Tensor, stream: int = 0, residual: bool = False
) -> object:
    """The module output with `tensor` in place of what `output_tensor` read from it (other
    elements of a tuple, such as vLLM's (output, bias), kept; a residual pair as (0, tensor))."""
    if not isinstance(output, tuple):
        return tensor
    if residual:
        return (torch.zeros_like(tensor), tensor)
    return (*output[:stream], tensor, *output[stream + 1 :])
