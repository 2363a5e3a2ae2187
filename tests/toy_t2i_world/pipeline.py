"""The toy pipeline's tokenizer and loading a saved pipeline folder.

`build_tokenizer` is the word-level tokenizer that `benchmarks/toy_t2i/train.py` saves with the
model (the tests check it covers every caption); `load` reads a saved pipeline such as
tests/assets/toy_t2i, by default from the training script's default folder.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from . import dataset as ds

MAX_TOKENS = 24
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]  # ids 0..3; EOS != 2 avoids CLIP's legacy path


def default_out_dir() -> Path:
    """$ACTSTEER_CACHE/toy_t2i, or ~/.cache/actsteer/toy_t2i."""
    root = os.environ.get("ACTSTEER_CACHE") or Path.home() / ".cache" / "actsteer"
    return Path(root) / "toy_t2i"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the caption vocabulary: '[BOS] words [EOS]', lower-cased."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ds.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=MAX_TOKENS,
    )


def load(model_dir: str | Path | None = None):
    """The saved pipeline (CPU, float32, progress bar off)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir or default_out_dir()))
    pipe.set_progress_bar_config(disable=True)
    return pipe
