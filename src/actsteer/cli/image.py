"""Text-to-image commands: generate-image (fit takes --pipeline for fitting)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from actsteer.choices import GUIDANCE_MODES, check_choice
from actsteer.cli.core import IMAGE_PANEL, app, renamed_steps, status
from actsteer.cli.options import (
    DenoisingStepsOption,
    DeviceOption,
    DtypeOption,
    ForceOption,
    GuidanceScaleOption,
    OldStepsOption,
    SizeOption,
    StrengthOption,
    SupportOption,
)
from actsteer.errors import ActSteerError
from actsteer.outputs import check_output, written_file


@app.command("generate-image", rich_help_panel=IMAGE_PANEL)
def generate_image(
    pipeline: Annotated[str, typer.Option(help="A diffusers pipeline folder or hub id.")],
    prompts: Annotated[
        list[str], typer.Option("--prompt", "-p", help="A prompt; repeat for more rows.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the PNG grid.")],
    steering_path: Annotated[
        Path | None, typer.Option("--steering", help="A steering fitted on this pipeline.")
    ] = None,
    strength: StrengthOption = None,
    support: SupportOption = None,
    denoising_steps: DenoisingStepsOption = None,
    steps: OldStepsOption = None,
    guidance_scale: GuidanceScaleOption = 5.0,
    seed: Annotated[int, typer.Option(help="Noise seed of the first prompt (+1 per row).")] = 0,
    size: SizeOption = None,
    guidance: Annotated[
        str,
        typer.Option(
            help="Classifier-free guidance: steer its conditional half only, or both halves.",
            metavar="|".join(GUIDANCE_MODES),
        ),
    ] = "conditional",
    cfg: Annotated[
        str | None,
        typer.Option("--cfg", hidden=True, help="Deprecated: the old name of --guidance."),
    ] = None,
    force: ForceOption = False,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = "float32",
) -> None:
    """Render a labelled PNG grid: rows are prompts, columns strengths λ (one pipeline call).

    Every column of a row starts from the same noise, so columns differ only by the steering.
    """
    from actsteer.diffusion import generate_images, image_grid, load_pipeline
    from actsteer.steering import Steering
    from actsteer.strengths import parse_strength_specs, resolve_strengths

    if cfg is not None:
        status("warning: --cfg is now called --guidance; --cfg goes away in the next release")
        guidance = cfg
    check_choice(guidance, GUIDANCE_MODES, "--guidance" if cfg is None else "--cfg")
    denoising_steps = renamed_steps(steps, denoising_steps, "--denoising-steps") or 20
    if output.suffix.lower() != ".png":
        raise ActSteerError(f"--output should end in .png, got {output}")
    check_output(output, force)
    steering = Steering.load(steering_path) if steering_path is not None else None
    strengths = resolve_strengths(
        steering,
        parse_strength_specs(strength) if strength else None,
        support=support,
        needs="--steering FILE",
    )
    status(f"Loading pipeline {pipeline} …")
    pipe = load_pipeline(pipeline, device=device, dtype=dtype)
    extra: dict[str, Any] = {} if size is None else {"height": size, "width": size}
    status(f"Rendering {len(prompts)} prompt(s) × {len(strengths)} strength(s) in one call …")
    images = generate_images(
        pipe, prompts, strengths, steering, support=support, denoising_steps=denoising_steps,
        guidance_scale=guidance_scale, seed=seed, guidance=guidance, **extra,
    )  # fmt: skip
    with written_file(output) as scratch:
        image_grid(images, prompts, strengths).save(scratch)
    typer.echo(f"Saved {len(prompts)}×{len(strengths)} grid to {output}")
