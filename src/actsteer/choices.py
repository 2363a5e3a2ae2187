"""The names users choose among (supports, poolings, positions, guidance modes, the default
model) as Literal types with their values, the one check of a choice, and the defaults the CLI's
help shows, kept free of torch so that `actsteer --help` can show them at no cost.

The modules that implement each choice import its names and defaults from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

from actsteer.errors import ActSteerError

Support = Literal["q0-100", "q1-99", "q5-95", "all"]
Pooling = Literal["mean", "last", "max", "all"]
Positions = Literal["all", "prompt", "generated", "last"]
GuidanceMode = Literal["conditional", "both"]
GateKind = Literal["token", "context", "prompt"]
DtypeName = Literal["float32", "bfloat16", "float16", "auto"]


def check_choice(value: object, choices: Iterable[str], what: str) -> None:
    """The one check of a choice: None passes, anything else not among `choices` is
    "unknown WHAT 'VALUE'; choose one of A, B, C"."""
    options = tuple(choices)
    if value is not None and value not in options:
        raise ActSteerError(f"unknown {what} {value!r}; choose one of {', '.join(options)}")


#: Supports stored with every map, as (lower, upper) quantiles of the source samples in percent.
SUPPORT_QUANTILES: dict[str, tuple[float, float]] = {
    "q0-100": (0.0, 100.0),
    "q1-99": (1.0, 99.0),
    "q5-95": (5.0, 95.0),
}
#: The unbounded support: every activation is transported.
SUPPORT_ALL = "all"
SUPPORTS: tuple[str, ...] = get_args(Support)

#: How token activations become samples (actsteer.capture).
POOLINGS: tuple[str, ...] = get_args(Pooling)
#: The language-model modules fit steers when none are named: the attention outputs, the
#: strongest layer-wise setting of the defaults study (docs/benchmarks.md, issue 14 §2b).
DEFAULT_MODULES = "attn-out"
#: Which token positions a hook steers (actsteer.sources).
POSITIONS: tuple[str, ...] = get_args(Positions)
#: Which halves of a classifier-free-guidance batch are steered (actsteer.guidance).
GUIDANCE_MODES: tuple[str, ...] = get_args(GuidanceMode)
#: How a gate turns scores into a token's strength (actsteer.gates).
GATE_KINDS: tuple[str, ...] = get_args(GateKind)
#: The dtypes a model loads in (actsteer.placement); auto: the checkpoint's own.
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
#: What --device takes (actsteer.placement); auto: accelerate's device_map="auto".
DEVICE_FORMS = "cpu, cuda, cuda:N, mps or auto"
#: The model used when none is given (actsteer.models).
DEFAULT_MODEL = "smollm2-135m"

#: Perplexity (actsteer.evaluation.tasks.perplexity): the first 4096 tokens of WikiText-2 test, in
#: blocked windows of 512.
PERPLEXITY_TOKENS = 4096
PERPLEXITY_WINDOW = 512
#: Calibration (actsteer.calibration): 8 passages of the perplexity window after the perplexity
#: task's tokens; unbounded methods double λ up to a cap.
CALIBRATION_PASSAGES = 8
CALIBRATION_CAP = 256.0
