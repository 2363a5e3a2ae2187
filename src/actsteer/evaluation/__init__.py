"""Evaluation harness: what a steering does to behaviour, and what it costs in quality.

One module per task in `tasks/`, each registering itself with its `evaluate_grid(model, tok,
steering, strengths, **options)`, which returns one typed result per λ;
`evaluate(task, model, tok, steering=None, strength=None, **options)` is the one entry for one λ:

    toxicity    % toxic RealToxicityPrompts continuations (alt-profanity-check), per stratum
    perplexity  teacher-forced perplexity on held-out text (WikiText-2 test by default)
    truthfulqa  TruthfulQA MC1 / MC2 by answer log-likelihood
    mmlu        MMLU accuracy by answer-letter likelihood
    concept     fraction of generations about a concept (MiniLM judge) + their perplexity

`run_sweep` runs tasks × steerings × a λ grid into a resumable JSON file with PNG plots.
Each task reads `data=PATH` (or "hf:ID[:CONFIG[:SPLIT]]"), else its default file under
$ACTSTEER_DATA, else its hub dataset (`datasets`, in the `actsteer[eval]` extra).
"""

from actsteer.evaluation.plots import plot_sweep
from actsteer.evaluation.sampling import Sampling
from actsteer.evaluation.sweep import parse_strengths, run_sweep
from actsteer.evaluation.tasks import (
    TASKS,
    Task,
    concept,
    evaluate,
    get_task,
    mmlu,
    perplexity,
    toxicity,
    truthfulqa,
)
from actsteer.evaluation.tasks.concept import ConceptJudge, ConceptResult
from actsteer.evaluation.tasks.mmlu import MMLUResult
from actsteer.evaluation.tasks.perplexity import PerplexityResult
from actsteer.evaluation.tasks.toxicity import (
    ToxicityResult,
    sampled_toxicity_effect,
    score_toxicity,
)
from actsteer.evaluation.tasks.truthfulqa import TruthfulQAResult

__all__ = [
    "TASKS",
    "ConceptJudge",
    "ConceptResult",
    "MMLUResult",
    "PerplexityResult",
    "Sampling",
    "Task",
    "ToxicityResult",
    "TruthfulQAResult",
    "concept",
    "evaluate",
    "get_task",
    "mmlu",
    "parse_strengths",
    "perplexity",
    "plot_sweep",
    "run_sweep",
    "sampled_toxicity_effect",
    "score_toxicity",
    "toxicity",
    "truthfulqa",
]
