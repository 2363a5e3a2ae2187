"""Exporting a steered checkpoint: the steering folded into the weights, saved as a stock
transformers folder that any engine reading such checkpoints serves at full speed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from actsteer.steering import Steering

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def export(
    steering: Steering,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    directory: str | Path,
    strength: float = 1.0,
    support: str | None = None,
) -> Path:
    """Fold the steering into `model` and save a stock transformers checkpoint to `directory`."""
    directory = Path(directory)
    steering.fold(model, strength, support)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
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
    return directory
