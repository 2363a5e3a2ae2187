"""The options several commands take, each declared once (as `Annotated` types).

A command gives its own default in its signature: `model: ModelOption = None`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from actsteer.choices import DEFAULT_MODEL, DEVICE_FORMS, DTYPE_NAMES, SUPPORTS, check_choice


def _support_choice(value: str | None) -> str | None:
    check_choice(value, SUPPORTS, "--support")
    return value


ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Built-in alias, local folder or hub id. Default: the model the steering was "
        f"fitted on, else {DEFAULT_MODEL}.",
        metavar="MODEL",
    ),
]


def _dtype_choice(value: str) -> str:
    check_choice(value, DTYPE_NAMES, "--dtype")
    return value


def _device_here(value: str) -> str:
    """The device, when this machine has it: checked as the command starts, not after its
    data is read and its model loaded."""
    if value != "cpu":
        from actsteer.placement import resolve_device

        resolve_device(value)
    return value


DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        help="Where the model runs: cpu, cuda, cuda:N, mps, or auto (accelerate spreads a model "
        "larger than one device over the GPUs there are, then the CPU).",
        metavar=DEVICE_FORMS.replace(", ", "|").replace(" or ", "|"),
        callback=_device_here,
    ),
]

DtypeOption = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="The model's dtype: float32, bfloat16, float16, or auto (the checkpoint's). "
        "Steering maps stay float32; the transport runs in the model's dtype.",
        metavar="|".join(DTYPE_NAMES),
        callback=_dtype_choice,
    ),
]

SupportOption = Annotated[
    str | None,
    typer.Option(
        "--support",
        help="Where maps apply: quantile ranges of the source activations, or all (use all to "
        "induce a concept). Default: the steering's (fit: the method's; export: all, the one "
        "support that folds exactly).",
        metavar="|".join(SUPPORTS),
        callback=_support_choice,
    ),
]

StrengthOption = Annotated[
    list[str] | None,
    typer.Option(
        "--strength",
        "-s",
        help="λ values: numbers, START:STOP:STEP (STOP included) or a,b,c; several numbers "
        "after one flag (-s 0 0.5 1) or the flag repeated. `--` ends options. Default: the "
        "steering's default strength.",
        metavar="λ|START:STOP:STEP",
    ),
]

ExtrapolateOption = Annotated[
    float | None,
    typer.Option(
        "--extrapolate",
        help="Accept λ up to this value beyond a method's range (AcT: λ > 1 pushes past "
        "the fitted transport), e.g. to see where an induction saturates.",
        metavar="UPPER",
    ),
]

ChatOption = Annotated[
    bool,
    typer.Option(
        "--chat",
        help="Instruct models: each text or prompt is a user turn of the tokenizer's chat "
        "template (the assistant's turn opened).",
    ),
]

FieldOption = Annotated[
    str | None,
    typer.Option(
        "--field",
        help="The text's field of .jsonl rows, column of a .csv or field of hf:ID data "
        "(default: text).",
        metavar="NAME",
    ),
]

ForceOption = Annotated[
    bool,
    typer.Option(
        "--force", help="Replace an existing output (default: refuse it). Writes are atomic."
    ),
]

MaxNewTokensOption = Annotated[int, typer.Option(help="Tokens to generate per row.", min=1)]

MaxLengthOption = Annotated[int, typer.Option(help="Tokens kept per text.", min=1)]

DenoisingStepsOption = Annotated[
    int | None, typer.Option(help="Pipelines: denoising steps (default 20).", min=1)
]

OldStepsOption = Annotated[
    int | None,
    typer.Option(
        "--steps",
        hidden=True,
        min=1,
        help="The old name of --denoising-steps (pipelines) and --training-steps (lineas).",
    ),
]

GuidanceScaleOption = Annotated[
    float, typer.Option(help="Pipelines: classifier-free guidance scale.")
]

SizeOption = Annotated[
    int | None, typer.Option(help="Pipelines: image height and width (default: its own).")
]

SelectOption = Annotated[
    str | None,
    typer.Option(
        "--modules",
        help="Apply only the steering's modules whose names match this regular expression "
        "(whole names, e.g. 'model\\.layers\\.(8|14)'); the others stay untouched. No refit.",
        metavar="PATTERN",
    ),
]
