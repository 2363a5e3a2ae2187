"""What actsteer knows about each architecture family, in one table.

A family is chosen by the model's `config.model_type`. Its entry says which module presets
exist, which config flags give the Linear layers biases, which Linear layers read each RMSNorm
(so a shift after the norm can move into their biases), whether the RMSNorm computes
x̂ · (1 + γ) (Gemma), which Linear layer writes last to the residual stream in each block (so a
shift of the block's output can move into its bias) and which layers store their weight
transposed (GPT-2's Conv1D). Capture,
fold and the CLI's help read it from here; a model type missing from the table is a clear
error wherever the table is needed, never a silent default. To support a new family, add one
`Family` to FAMILIES.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

from actsteer.errors import ActSteerError

_BLOCK = r"(?:.*\.)?layers\.\d+\."
_LLAMA_READERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
_LLAMA_BIAS_FLAGS = {
    "attention_bias": _BLOCK + r"self_attn\.[qkvo]_proj",
    "mlp_bias": _BLOCK + r"mlp\.(?:gate|up|down)_proj",
}
#: The decoder blocks themselves: their outputs are the residual stream (where ActAdd, repeng
#: and llama.cpp's control vectors add their vectors); a vision tower's layers are not included.
_RESIDUAL = r"(?!.*vision)(?:.*\.)?layers\.\d+"
_LLAMA_PRESETS = {
    "post-attn-ln": _BLOCK + r"post_attention_layernorm",
    "layernorms": _BLOCK + r"(?:input_layernorm|post_attention_layernorm)|(?:.*\.)?norm",
    "attn-out": _BLOCK + r"self_attn\.o_proj",
    "mlp-out": _BLOCK + r"mlp\.down_proj",
    "residual": _RESIDUAL,
}


@dataclass(frozen=True)
class Family:
    """One architecture family.

    presets: name → full-match regex over module names (fit's default: choices.DEFAULT_MODULES).
    norm_readers: RMSNorm leaf name → the Linear layers (relative to the block) that alone read
      its output; a norm missing here feeds something else (the residual stream, the LM head)
      and its shift cannot be folded.
    norm_offset: 1.0 where the RMSNorm scales by (1 + γ) (Gemma), else 0.0.
    bias_flags: config flag → regex of the Linear layers the flag gives a bias.
    residual_writer: the Linear layer (relative to the block) whose output is the block's last
      write to the residual stream, so a shift of the block's output (the "residual" preset)
      moves into its bias; None where that write comes out of a norm without a bias.
    transposed_linears: class names of layers that store their weight as (in, out).
    """

    name: str
    model_types: tuple[str, ...]
    presets: dict[str, str]
    norm_readers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    norm_offset: float = 0.0
    bias_flags: dict[str, str] = field(default_factory=dict)
    residual_writer: str | None = None
    transposed_linears: tuple[str, ...] = ()


#: model_type of the module tree of a diffusers pipeline (see `actsteer.tree`).
PIPELINE_MODEL_TYPE = "diffusers-pipeline"

FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        ("llama", "mistral", "qwen2", "qwen3", "smollm3"),
        _LLAMA_PRESETS,
        norm_readers=_LLAMA_READERS,
        bias_flags=_LLAMA_BIAS_FLAGS,
        residual_writer="mlp.down_proj",
    ),
    Family(
        "phi3",  # fused projections: qkv_proj and gate_up_proj read the norms
        ("phi3",),
        _LLAMA_PRESETS,
        norm_readers={
            "input_layernorm": ("self_attn.qkv_proj",),
            "post_attention_layernorm": ("mlp.gate_up_proj",),
        },
        residual_writer="mlp.down_proj",
    ),
    Family(
        "olmo2",  # norms after attention and MLP, before the residual add: no readers
        ("olmo2",),
        {
            "post-attn-ln": _BLOCK + r"post_attention_layernorm",
            "layernorms": _BLOCK
            + r"(?:post_attention_layernorm|post_feedforward_layernorm)|(?:.*\.)?norm",
            "attn-out": _BLOCK + r"self_attn\.o_proj",
            "mlp-out": _BLOCK + r"mlp\.down_proj",
            "residual": _RESIDUAL,
        },
        bias_flags={"attention_bias": _BLOCK + r"self_attn\.[qkvo]_proj"},
    ),
    Family(
        "gemma",
        ("gemma", "gemma2", "gemma3", "gemma3_text"),
        {
            "post-attn-ln": _BLOCK + r"post_attention_layernorm",
            "layernorms": _BLOCK
            + r"(?:input|post_attention|pre_feedforward|post_feedforward)_layernorm"
            r"|(?:.*\.)?norm",
            "attn-out": _BLOCK + r"self_attn\.o_proj",
            "mlp-out": _BLOCK + r"mlp\.down_proj",
            "residual": _RESIDUAL,
        },
        norm_readers={
            "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
        },
        norm_offset=1.0,
        bias_flags=_LLAMA_BIAS_FLAGS,
    ),
    Family(
        "gpt2",
        ("gpt2",),
        {
            "post-attn-ln": r"(?:.*\.)?h\.\d+\.ln_2",
            "layernorms": r"(?:.*\.)?h\.\d+\.ln_[12]|(?:.*\.)?ln_f",
            "attn-out": r"(?:.*\.)?h\.\d+\.attn\.c_proj",
            "mlp-out": r"(?:.*\.)?h\.\d+\.mlp\.c_proj",
            "residual": r"(?:.*\.)?h\.\d+",
        },
        residual_writer="mlp.c_proj",
        transposed_linears=("Conv1D",),
    ),
    Family(
        "diffusion",  # a diffusers pipeline's components as one tree
        (PIPELINE_MODEL_TYPE,),
        {
            "unet-norms": r"unet\.(?:.*\.)?(?:norm\d*|conv_norm_out)",
            "dit-blocks": r"transformer\.(?:transformer_blocks|single_transformer_blocks)\.\d+",
            "text-encoder": r"text_encoder(?:_\d)?\.(?:.*\.)?(?:layers|block)\.\d+",
        },
    ),
)

_BY_MODEL_TYPE = {t: family for family in FAMILIES for t in family.model_types}
PRESET_NAMES = tuple(dict.fromkeys(name for f in FAMILIES for name in f.presets))


def model_type(model: nn.Module) -> str:
    """The model's config.model_type, or its class name when it has no config."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def find_family(model: nn.Module) -> Family | None:
    """The family of a model, or None for a model type the table does not know."""
    return _BY_MODEL_TYPE.get(model_type(model))


def family_of(model: nn.Module, needed_for: str) -> Family:
    """The family of a model, or a clear error saying what needed it."""
    family = find_family(model)
    if family is None:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise ActSteerError(
            f"{needed_for} needs to know the architecture, and model type {model_type(model)!r} "
            f"is not in actsteer's families table (known: {known}); add it to "
            "actsteer/families.py, or choose modules by a regular expression"
        )
    return family


def presets_help() -> str:
    """One line per family naming its presets, for the CLI's help."""
    return "; ".join(f"{f.name}: {', '.join(f.presets)}" for f in FAMILIES)
