"""MMLU accuracy by answer-letter likelihood on a fixed, documented subset.

Prompt as lm-evaluation-harness's MMLU: a header, `shots` solved examples, then
"<question>\\nA. …\\nB. …\\nC. …\\nD. …\\nAnswer:"; the prediction is whichever of " A", " B",
" C", " D" gets the highest next-token probability. The local file has no subject field, so the
header is "The following are multiple choice questions (with answers)." and the few-shot
examples are drawn (seeded) from rows outside the evaluated subset, the same for every
question. Subset: shuffle the row indices with `seed`, keep the first `n_questions` (so smaller
subsets are prefixes of larger ones). Defaults: 500 questions, 5 shots, seed 0.

Questions (see `actsteer.evaluation.data`): `data`; else mmlu/mmlu_2850.jsonl under
$ACTSTEER_DATA; else the hub's cais/mmlu (config "all", test split: 14,042 questions, so the
default subset differs from the local file's). Rows are {question, choices[4], answer 0-3} in
both; the hub's `subject` is not used (the header stays the generic one).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from actsteer.errors import ActSteerError
from actsteer.evaluation.common import describe_steering, resolve_strengths, steering_applied
from actsteer.evaluation.data import fixed_subset, read_rows, require_keys, resolve_data
from actsteer.evaluation.likelihood import encode, next_token_logprobs
from actsteer.evaluation.stats import bootstrap_mean_ci
from actsteer.evaluation.tasks.registry import Task, register
from actsteer.steering import Steering

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MMLU_FILE = "mmlu/mmlu_2850.jsonl"
MMLU_HUB = ("cais/mmlu", "all", "test")
LETTERS = ("A", "B", "C", "D")
N_QUESTIONS = 500
SHOTS = 5
HEADER = "The following are multiple choice questions (with answers).\n\n"


@dataclass
class MMLUResult:
    """Accuracy (fraction in [0, 1]) with a bootstrap 95% interval over questions."""

    TASK: ClassVar[str] = "mmlu"
    METRICS: ClassVar[dict[str, str]] = {"accuracy": "MMLU accuracy"}

    strength: float
    accuracy: float
    accuracy_ci: tuple[float, float]
    n_questions: int
    settings: dict[str, Any] = field(default_factory=dict)
    predictions: list[int] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy}

    def intervals(self) -> dict[str, tuple[float, float]]:
        return {"accuracy": self.accuracy_ci}


def data_source(data: str | Path | None = None) -> Path | str:
    """The questions' source: `data`, else MMLU_FILE under $ACTSTEER_DATA, else MMLU_HUB."""
    return resolve_data(data, MMLU_FILE, MMLU_HUB, "MMLU")


def load_mmlu(data: str | Path | None = None) -> list[dict[str, Any]]:
    """Rows {question, choices[4], answer 0-3}; data: a JSONL file or "hf:ID"."""
    rows = read_rows(data_source(data), "MMLU")
    for number, row in enumerate(rows):
        where = f"MMLU row {number}"
        require_keys(row, ("question", "choices", "answer"), where)
        if len(row["choices"]) != 4 or int(row["answer"]) not in range(4):
            raise ActSteerError(f"{where}: needs 4 choices and an answer index 0-3")
        row.setdefault("idx", number)
    return rows


def format_question(row: dict[str, Any], answer: bool = False) -> str:
    """One question in the harness format, with its answer letter when `answer`."""
    lines = [row["question"].strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, row["choices"], strict=True)]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {LETTERS[int(row['answer'])]}\n\n" if answer else text


def letter_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids of " A" … " D"; each must be one token."""
    ids = [encode(tokenizer, f" {letter}") for letter in LETTERS]
    if any(len(i) != 1 for i in ids):
        raise ActSteerError(f"answer letters are not single tokens for this tokenizer: {ids}")
    return [i[0] for i in ids]


def evaluate_grid(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    steering: Steering | None = None,
    strengths: Sequence[float] | float | None = None,
    *,
    data: str | Path | None = None,
    n_questions: int | None = N_QUESTIONS,
    shots: int = SHOTS,
    seed: int = 0,
    batch_size: int = 8,
    support: str | None = None,
    progress: bool = True,
) -> list[MMLUResult]:
    """Accuracy at each strength on the seeded subset (n_questions=None: every row)."""
    strengths = resolve_strengths(steering, strengths)
    source = data_source(data)
    rows = load_mmlu(source)
    indices, subset = fixed_subset(rows, n_questions, seed)
    rest = sorted(set(range(len(rows))) - set(indices))
    if shots < 0 or shots > len(rest):
        raise ActSteerError(f"shots must be between 0 and {len(rest)} here, got {shots}")
    shot_rows = [rows[i] for i in random.Random(seed + 1).sample(rest, shots)]
    prefix = HEADER + "".join(format_question(row, answer=True) for row in shot_rows)
    contexts = [format_question(row) for row in subset]
    answers = np.array([int(row["answer"]) for row in subset])
    candidates = letter_ids(tokenizer)
    settings = {
        "data": str(source),
        "n_questions": len(subset),
        "seed": seed,
        "shots": shots,
        "shot_idx": [row["idx"] for row in shot_rows],
        "support": support,
        "steering": describe_steering(steering),
    }
    results = []
    for strength in tqdm(strengths, desc="mmlu λ", disable=not progress or len(strengths) < 2):
        with steering_applied(model, steering, strength, support):
            logprobs = next_token_logprobs(
                model,
                tokenizer,
                contexts,
                candidates,
                shared_prefix=prefix,
                batch_size=batch_size,
                progress=progress,
                desc="mmlu",
            )
        predictions = logprobs.argmax(axis=1)
        correct = (predictions == answers).astype(np.float64)
        results.append(
            MMLUResult(
                strength=strength,
                accuracy=float(correct.mean()),
                accuracy_ci=bootstrap_mean_ci(correct, seed=seed),
                n_questions=len(subset),
                settings=dict(settings),
                predictions=[int(p) for p in predictions],
            )
        )
    return results


MMLU = register(
    Task(
        name="mmlu",
        evaluate_grid=evaluate_grid,
        result_type=MMLUResult,
        generation=False,
        description="MMLU accuracy by answer-letter likelihood",
    )
)
