"""Instruct models' chat format: each text a user turn of the tokenizer's chat template.

`chat_texts` ends each with the assistant's turn opening, the way an instruct model sees a
request. Fitting with chat=True pools every token of that formatted prompt, the template's
included: the template is the same for source and target, so it shifts both alike, and with
`last` pooling the sample is the assistant's turn opening, the position the answer starts from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from actsteer.errors import ActSteerError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def chat_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[str]:
    """Each text as a user turn in the tokenizer's chat template, the assistant's turn opened;
    a tokenizer without a chat template is a clear error."""
    if not getattr(tokenizer, "chat_template", None):
        raise ActSteerError(
            "this tokenizer has no chat template (a base model?); drop --chat / chat=True"
        )
    bos = tokenizer.bos_token or ""
    adds_bos = bool(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    formatted = []
    for text in texts:
        turn = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        rendered = str(rendered)
        if adds_bos and rendered.startswith(bos):  # the tokenizer adds it again
            rendered = rendered[len(bos) :]
        formatted.append(rendered)
    return formatted
