"""The `actsteer` command line, one module per topic, all on one Typer app (`core.app`):

    lm        fit, demo, methods
    generate  generate
    serve     serve (the OpenAI API with per-request steering)
    image     generate-image
    evaluate  eval, sweep, plot
    calibrate calibrate
    gates     monitor (and generate --show-gate's view)
    inspect   inspect, export

`options` declares the options several commands share (--model, --support, --strength, …);
strengths follow one grammar (actsteer.strengths) and the model to load one rule
(actsteer.models.model_for). Every user error ends in one line on stderr, never a traceback.
"""

from __future__ import annotations

# Imported in the order of --help's panels: language models, images, files, evaluation.
from actsteer.cli import core, lm

# isort: split
from actsteer.cli import generate, serve

# isort: split
from actsteer.cli import image, inspect

# isort: split
from actsteer.cli import evaluate

# isort: split
from actsteer.cli import calibrate, gates
from actsteer.cli.core import app, normalise_argv

__all__ = [
    "app",
    "calibrate",
    "core",
    "evaluate",
    "gates",
    "generate",
    "image",
    "inspect",
    "lm",
    "main",
    "normalise_argv",
    "serve",
]


def main() -> None:
    """Entry point equivalent to the `actsteer` console script."""
    app()


if __name__ == "__main__":
    main()
