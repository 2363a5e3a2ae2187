"""Exporting a steering for other engines: folded into the weights and saved as a stock
transformers folder that any engine reading such checkpoints serves at full speed, or, for an
additive steering of the residual stream, as a llama.cpp control vector (GGUF)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from actsteer.errors import ActSteerError
from actsteer.gguf_vectors import first_block_left_out, write_control_vector
from actsteer.outputs import check_output, written_file, written_folder
from actsteer.steering import Steering
from actsteer.version import __version__

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def export(
    steering: Steering,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    directory: str | Path,
    strength: float = 1.0,
    support: str | None = None,
    force: bool = False,
) -> Path:
    """Fold the steering into `model` and save a stock transformers checkpoint to `directory`.

    A non-empty `directory` is refused unless `force`, which replaces it whole (nothing of its
    old contents stays mixed in); the checkpoint is written beside it and moved into place
    when complete."""
    directory = Path(directory)
    check_output(directory, force, "export directory")
    steering.fold(model, strength, support)
    with written_folder(directory) as scratch:
        model.save_pretrained(scratch)
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
        _write_note(steering, strength, scratch)
    return directory


def _write_note(steering: Steering, strength: float, directory: Path) -> None:
    note = {
        "folded_by": "actsteer",
        "method": steering.method,
        "strength": strength,
        "support": "all",
        "modules": steering.modules,
        "model": steering.info.model_name,
        "data": steering.info.data,
    }
    (directory / "actsteer_fold.json").write_text(json.dumps(note, indent=2))


def export_control_vector(
    steering: Steering,
    model: PreTrainedModel,
    path: str | Path,
    strength: float = 1.0,
    support: str = "all",
    force: bool = False,
) -> Path:
    """Write the steering at `strength` as a llama.cpp control vector: λ·β of block k as tensor
    direction.k (see `actsteer.gguf_vectors`). Steerings llama.cpp cannot express (ω ≠ 1, a
    bounded support, modules other than decoder blocks) are refused, saying why; block 0, which
    llama.cpp never steers, is left out with a warning. An existing file is refused unless
    `force`, and replaced only once the new one is complete."""
    path = Path(path)
    check_output(path, force, "control vector file")
    if steering.gates:
        raise ActSteerError(
            "a gated steering is not a control vector: llama.cpp adds one fixed vector per "
            "block to every token, while a gate sets each token's strength from its "
            "activations; export steering.without_gate() (every token at λ) instead"
        )
    steering.check_strength(strength)
    steering.check_compatible(model)
    provenance = {
        "method": steering.method,
        "strength": f"{strength:g}",
        "model": steering.info.model_name,
        "version": __version__,
    }
    with written_file(path) as scratch:
        write_control_vector(steering.maps, model, scratch, strength, support, provenance)
    first = first_block_left_out(steering.maps, model)
    if first is not None:
        warnings.warn(
            f"actsteer: the control vector leaves out the map of the first block ({first!r}): "
            "llama.cpp never steers block 0, so it applies the other blocks' maps only (to "
            "preview that steering, give generate --modules the other blocks)",
            stacklevel=2,
        )
    return path
