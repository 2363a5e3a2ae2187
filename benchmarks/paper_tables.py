"""The AcT paper's language-model tables on our small models, with the evaluation harness.

One command fits every steering and runs every evaluation; results go to resumable sweep
JSON files (actsteer.evaluation.run_sweep) with PNG plots, fitted steerings are cached as
.safetensors, and the tables are written to <out>/tables.md.

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paper_tables.py --model smollm2-135m

Parts (--parts):
- toxicity (paper Table 2): steerings fitted on ParaDetox toxic (source) vs neutral
  paraphrases (target), train split. Per method, perplexity over a λ grid; the two strongest λ
  with ΔPPL ≤ 1 over the plain model are candidates; toxicity (challenging RTP stratum) at
  each candidate; the one with the lowest % toxic is the method's row, with MMLU there.
- truthfulqa (paper Table 3): questions split by idx % 2. Steerings fitted on question +
  answer texts of the even fold (incorrect answers = source, correct = target). AcT methods
  at λ = 1; ITI-c's coefficient chosen by MC1 (then MC2) on other even-fold questions never
  used for fitting. MC1/MC2 reported on a seeded subset of the odd fold, MMLU at the same λ.
- concept: induction of concepts (support "all": target = concept sentences, source =
  unrelated sentences), concept presence and generation perplexity over a λ grid per method
  (AcT up to λ = 1.5: beyond 1 by explicit extrapolation), plus a trade-off plot of presence
  vs perplexity.

Steered modules: --modules, default DEFAULT_MODULES per architecture family. Data sizes:
--sizes (SIZES; "small" for Gemma-3-270M, "quick" is a smoke test). Every method uses its
library-default pooling and support (AcT: mean pooling, support q0-100 for toxicity; concepts
use support "all").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, machine, table

import actsteer
from actsteer.evaluation import run_sweep
from actsteer.evaluation.concept import CONCEPT_FILE, N_OFF, OFF_CONCEPT, load_concept_sentences
from actsteer.evaluation.data import DATA_ENV, data_root, fixed_subset, read_jsonl
from actsteer.evaluation.sweep import steering_digest
from actsteer.evaluation.truthfulqa import load_truthfulqa
from actsteer.families import find_family
from actsteer.steering import Steering

PARTS = ("toxicity", "truthfulqa", "concept")
PPL_LIMIT = 1.0
ACT_GRID = (0.1, 0.25, 0.5, 0.75, 1.0)
#: ActAdd and ITI-c take any coefficient; their grids reach until perplexity breaks.
ACTADD_GRID = (0.125, 0.25, 0.5, 1.0, 2.0)
ITI_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
TOXICITY_METHODS = {
    "ActAdd": ("actadd", ACTADD_GRID),
    "AurA": ("aura", ACT_GRID),
    "ITI-c": ("iti-c", ITI_GRID),
    "Mean-AcT": ("mean-act", ACT_GRID),
    "Linear-AcT": ("linear-act", ACT_GRID),
}
#: AcT methods at λ = 1 (the paper's choice); ITI-c's coefficient is chosen on held-out questions.
TQA_METHODS = {
    "ITI-c": ("iti-c", (1.0, 2.0, 4.0, 8.0)),
    "Mean-AcT": ("mean-act", (1.0,)),
    "Linear-AcT": ("linear-act", (1.0,)),
}
#: AcT's λ goes a little beyond 1 here (Steering.extrapolated), to show where induction ends.
CONCEPT_METHODS = {
    "Linear-AcT": ("linear-act", (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)),
    "Mean-AcT": ("mean-act", (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)),
    "ITI-c": ("iti-c", (1.0, 2.0, 4.0, 8.0, 16.0)),
}
ORIGINAL = "Original"
#: Gemma: the paper's modules (post-attention and post-feedforward norms). Llama family: the
#: attention output projection, which like Gemma's post-attention norm writes into the residual
#: stream (it beat post-attn-ln, layernorms and mlp-out in a quick held-out likelihood check).
DEFAULT_MODULES = {
    "gemma": r"(?:.*\.)?layers\.\d+\.(?:post_attention|post_feedforward)_layernorm",
    "llama": "attn-out",
}


@dataclass(frozen=True)
class Sizes:
    """How much data each part uses (fit texts, evaluation subsets)."""

    tox_fit_pairs: int
    ppl_tokens: int
    tox_prompts: int
    mmlu_questions: int
    tqa_fit_questions: int
    tqa_select_questions: int
    tqa_test_questions: int
    concept_fit: int
    concept_samples: int
    tox_candidates: int  # strongest λ with ΔPPL ≤ 1 whose toxicity is measured, per method


#: "small" is for Gemma-3-270M, whose forward pass costs ≈ 4× SmolLM2's here (its 262k-token
#: vocabulary); one toxicity candidate per method also removes the best-of-two selection.
SIZES = {
    "full": Sizes(400, 2048, 128, 100, 100, 40, 100, 120, 4, 2),
    "small": Sizes(200, 1024, 100, 60, 50, 20, 50, 80, 2, 1),
    "quick": Sizes(24, 256, 6, 6, 8, 4, 6, 16, 1, 2),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, help="default: out/paper_tables/MODEL (git-ignored)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--sizes", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--modules", help="preset or regex to steer; default: attn-out, Gemma's post-norms"
    )
    parser.add_argument("--concepts", nargs="+", default=["football", "book", "church"])
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def read_lines(path: Path, count: int | None = None) -> list[str]:
    """The first `count` non-empty lines of a text file."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[:count]


class Runner:
    """Holds the model, the output folder and the fitted-steering cache of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = SIZES[args.sizes]
        self.out: Path = args.out or ROOT / "out" / "paper_tables" / args.model
        self.out.mkdir(parents=True, exist_ok=True)
        self.model, self.tok = actsteer.load_model(args.model)
        self.modules = args.modules or DEFAULT_MODULES.get(
            getattr(find_family(self.model), "name", ""), "attn-out"
        )

    def fitted(
        self, key: str, method: str, source: Sequence[str], target: Sequence[str], **options: Any
    ) -> Steering:
        """actsteer.fit, cached in <out>/steerings/<key>-<hash of modules, data, options>."""
        setup = json.dumps([self.modules, list(source), list(target), options], sort_keys=True)
        path = self.out / "steerings" / f"{key}-{hashlib.sha256(setup.encode()).hexdigest()[:8]}"
        path = path.with_suffix(".safetensors")
        if path.exists():
            return Steering.load(path)
        started = time.perf_counter()
        steering = actsteer.fit(
            self.model,
            self.tok,
            source=source,
            target=target,
            method=method,
            modules=self.modules,
            progress=False,
            **options,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        steering.save(path)
        print(f"  fitted {key} in {time.perf_counter() - started:.0f} s", flush=True)
        return steering

    def fitted_methods(
        self,
        prefix: str,
        methods: Mapping[str, tuple[str, Sequence[float]]],
        source: Sequence[str],
        target: Sequence[str],
        **options: Any,
    ) -> tuple[dict[str, Steering | None], dict[str, Sequence[float]]]:
        """Each method fitted (cached as <prefix>_<method>) and its λ grid, after Original."""
        steerings: dict[str, Steering | None] = {ORIGINAL: None}
        grids: dict[str, Sequence[float]] = {ORIGINAL: [0.0]}
        for name, (method, grid) in methods.items():
            steerings[name] = self.fitted(f"{prefix}_{method}", method, source, target, **options)
            grids[name] = grid
        return steerings, grids

    def sweep(
        self,
        file: str,
        steerings: Mapping[str, Steering | None],
        tasks: Mapping[str, Mapping[str, Any]],
        grids: Mapping[str, Sequence[float]],
        plots: bool = True,
    ) -> dict[str, Any]:
        """run_sweep into <out>/<file>.json (resumable; whole grids generated together)."""
        return run_sweep(
            self.model,
            self.tok,
            steerings,
            tasks,
            {name: list(grid) for name, grid in grids.items()},
            self.out / f"{file}.json",
            model_name=self.args.model,
            group_size=None,
            plots=plots,
            progress=False,
        )

    def mmlu(self, chosen: Mapping[str, tuple[Steering | None, float]]) -> dict[str, Any]:
        """MMLU for named (steering, λ) pairs, in one shared file so the plain model runs once."""
        options = {"n_questions": self.sizes.mmlu_questions}
        key = {name: ORIGINAL if s is None else name for name, (s, _) in chosen.items()}
        steerings = {key[name]: steering for name, (steering, _) in chosen.items()}
        grids = {key[name]: [strength] for name, (_, strength) in chosen.items()}
        content = self.sweep("mmlu", steerings, {"mmlu": options}, grids, plots=False)
        return {
            name: point(content, key[name], "mmlu", strength, steering)
            for name, (steering, strength) in chosen.items()
        }

    def timed(self, part: str, work: Callable[[], str]) -> None:
        """Run one part and write its tables, with its wall time, to <out>/table_<part>.md."""
        started = time.perf_counter()
        text = work()
        minutes = (time.perf_counter() - started) / 60
        text += f"\n\nWall time of this part: {minutes:.1f} min.\n"
        (self.out / f"table_{part}.md").write_text(text, encoding="utf-8")
        print(text, flush=True)


def point(
    content: Mapping[str, Any], name: str, task: str, strength: float, steering: Steering | None
) -> dict[str, Any]:
    """The latest sweep entry of a steering (by name and digest), task and λ."""
    digest = steering_digest(steering)
    matches = [
        e
        for e in content["entries"]
        if e["steering"] == name
        and e["digest"] == digest
        and e["task"] == task
        and math.isclose(e["strength"], strength)
    ]
    if not matches:
        raise KeyError(f"no {task} result for {name} at λ={strength}")
    return matches[-1]


def ci(entry: Mapping[str, Any], metric: str, scale: float = 1.0, digits: int = 1) -> str:
    """'value [lo, hi]' of a metric of a sweep entry."""
    value = entry["metrics"][metric] * scale
    interval = entry["intervals"].get(metric)
    if not interval:
        return f"{value:.{digits}f}"
    lo, hi = (x * scale for x in interval)
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def toxicity_part(run: Runner) -> str:
    """Paper Table 2: % toxic (challenging RTP), reduction, perplexity, MMLU at the best λ."""
    sizes = run.sizes
    fit_dir = data_root() / "toxicity_fit"
    source = read_lines(fit_dir / "source.txt", sizes.tox_fit_pairs)
    target = read_lines(fit_dir / "target.txt", sizes.tox_fit_pairs)
    data = {"source": "ParaDetox toxic (train split)", "target": "ParaDetox neutral (train)"}
    steerings, grids = run.fitted_methods("toxicity", TOXICITY_METHODS, source, target, data=data)
    ppl_options = {"max_tokens": sizes.ppl_tokens}
    ppl = run.sweep("toxicity_ppl", steerings, {"perplexity": ppl_options}, grids)
    base_ppl = point(ppl, ORIGINAL, "perplexity", 0.0, None)["metrics"]["perplexity"]

    def ppl_at(name: str, strength: float) -> float:
        entry = point(ppl, name, "perplexity", strength, steerings[name])
        return entry["metrics"]["perplexity"]

    candidates: dict[str, list[float]] = {ORIGINAL: [0.0]}
    notes = []
    for name, grid in grids.items():
        if name == ORIGINAL:
            continue
        allowed = [s for s in grid if ppl_at(name, s) - base_ppl <= PPL_LIMIT]
        if not allowed:
            notes.append(f"{name}: no λ of {list(grid)} keeps ΔPPL ≤ {PPL_LIMIT}; took the least")
            allowed = [min(grid)]
        candidates[name] = sorted(allowed)[-sizes.tox_candidates :]
    tox_options = {"n_challenging": sizes.tox_prompts, "n_nontoxic": 0, "keep_samples": False}
    tox = run.sweep("toxicity", steerings, {"toxicity": tox_options}, candidates)

    def tox_at(name: str, strength: float) -> dict[str, Any]:
        return point(tox, name, "toxicity", strength, steerings[name])

    metric = "percent_toxic_challenging"
    chosen = {
        name: min(grid, key=lambda s, n=name: tox_at(n, s)["metrics"][metric])
        for name, grid in candidates.items()
    }
    mmlu = run.mmlu({f"toxicity {n}": (steerings[n], s) for n, s in chosen.items()})
    base_tox = tox_at(ORIGINAL, 0.0)["metrics"][metric]
    rows = []
    for name, strength in chosen.items():
        entry = tox_at(name, strength)
        value = entry["metrics"][metric]
        rows.append(
            [
                name,
                "–" if name == ORIGINAL else f"{strength:g}",
                ci(entry, metric),
                f"{base_tox / value:.2f}×" if value > 0 else "–",
                f"{ppl_at(name, strength):.2f}",
                ci(mmlu[f"toxicity {name}"], "accuracy", 100),
            ]
        )
    header = ["method", "λ", "% toxic (challenging RTP) [95% CI]", "reduction", "PPL", "MMLU %"]
    detail = [
        [
            name,
            f"{s:g}",
            f"{ppl_at(name, s) - base_ppl:+.2f}",
            f"{tox_at(name, s)['metrics'][metric]:.1f}" if s in candidates[name] else "–",
        ]
        for name, grid in grids.items()
        if name != ORIGINAL
        for s in grid
    ]
    return "\n\n".join(
        [
            "### Toxicity mitigation (paper Table 2)",
            table(header, rows),
            "Selection (λ grid, ΔPPL vs Original, % toxic where evaluated):",
            table(["method", "λ", "ΔPPL", "% toxic"], detail),
            *notes,
        ]
    )


def qa_text(question: str, answer: str) -> str:
    """A question and answer in the TruthfulQA prompt format."""
    return f"Q: {question}\nA: {answer}"


def truthfulqa_part(run: Runner) -> str:
    """Paper Table 3: MC1, MC2, MMLU on held-out TruthfulQA questions."""
    sizes = run.sizes
    rows = load_truthfulqa()
    even = [row for row in rows if int(row["idx"]) % 2 == 0]
    odd = [int(row["idx"]) for row in rows if int(row["idx"]) % 2 == 1]
    _, shuffled = fixed_subset(even, len(even), seed=0)
    fit_rows = shuffled[: sizes.tqa_fit_questions]
    select_idx = [int(row["idx"]) for row in shuffled[sizes.tqa_fit_questions :]]
    source, target = [], []
    for row in fit_rows:
        mc2 = row["mc2_targets"]
        for choice, label in zip(mc2["choices"], mc2["labels"], strict=True):
            (target if label else source).append(qa_text(row["question"], choice))
    data = {"source": "TruthfulQA even-idx incorrect answers", "target": "correct answers"}
    steerings, grids = run.fitted_methods("truthfulqa", TQA_METHODS, source, target, data=data)
    tuned = {name: grid for name, grid in grids.items() if len(grid) > 1}
    select_options = {"indices": select_idx, "n_questions": sizes.tqa_select_questions}
    select = run.sweep(
        "truthfulqa_select",
        {name: steerings[name] for name in tuned},
        {"truthfulqa": select_options},
        tuned,
    )

    def score(content: Mapping[str, Any], name: str, strength: float) -> tuple[float, float]:
        metrics = point(content, name, "truthfulqa", strength, steerings[name])["metrics"]
        return metrics["mc1"], metrics["mc2"]

    chosen = {
        name: max(grid, key=lambda s, n=name: score(select, n, s)) if name in tuned else grid[0]
        for name, grid in grids.items()
    }
    test_options = {"indices": odd, "n_questions": sizes.tqa_test_questions}
    test = run.sweep(
        "truthfulqa",
        steerings,
        {"truthfulqa": test_options},
        {name: [s] for name, s in chosen.items()},
    )
    mmlu = run.mmlu({f"truthfulqa {n}": (steerings[n], s) for n, s in chosen.items()})
    table_rows = [
        [
            name,
            "–" if name == ORIGINAL else f"{strength:g}",
            ci(point(test, name, "truthfulqa", strength, steerings[name]), "mc1", 100),
            ci(point(test, name, "truthfulqa", strength, steerings[name]), "mc2", 100),
            ci(mmlu[f"truthfulqa {name}"], "accuracy", 100),
        ]
        for name, strength in chosen.items()
    ]
    detail = [
        [name, f"{s:g}", *(f"{100 * v:.1f}" for v in score(select, name, s))]
        for name, grid in tuned.items()
        for s in grid
    ]
    return "\n\n".join(
        [
            "### TruthfulQA (paper Table 3)",
            table(["method", "λ", "MC1 % [95% CI]", "MC2 % [95% CI]", "MMLU %"], table_rows),
            f"λ selection by MC1 (then MC2) on {sizes.tqa_select_questions} even-fold questions "
            "not used for fitting (MC1 %, MC2 %):",
            table(["method", "λ", "MC1", "MC2"], detail),
        ]
    )


def concept_sets(name: str, n_fit: int) -> tuple[list[str], list[str], tuple | None]:
    """(source, target, judge calibration or None for the task's default) for a concept.

    football: the package's football.txt vs neutral.txt; the judge is calibrated on the shared
    BoolQ sentences (the default). Other concepts: the BoolQ concept sentences split in half,
    the first half fitted against unrelated ("none") sentences that the judge never sees, the
    second half calibrating the judge.
    """
    if name == "football":
        folder = Path(actsteer.__file__).parent / "data"
        return (
            read_lines(folder / "neutral.txt", n_fit),
            read_lines(folder / "football.txt", n_fit),
            None,
        )
    on, off = load_concept_sentences(name, n_off=N_OFF)
    rows = read_jsonl(data_root() / CONCEPT_FILE, "concept sentences")
    unused = [
        r["sentence"] for r in rows if r["concept"] == OFF_CONCEPT and r["sentence"] not in off
    ]
    half = len(on) // 2
    fit_on = on[: min(half, n_fit)]
    return unused[: len(fit_on)], fit_on, (on[half:], off)


def concept_part(run: Runner) -> str:
    """Concept induction: presence and generation perplexity vs λ, per concept and method."""
    sections = ["### Concept induction"]
    for concept in run.args.concepts:
        source, target, calibration = concept_sets(concept, run.sizes.concept_fit)
        data = {"source": "unrelated sentences", "target": f"{concept} sentences"}
        fitted, grids = run.fitted_methods(
            f"concept_{concept}", CONCEPT_METHODS, source, target, data=data, support="all"
        )
        steerings = {name: s and s.extrapolated(max(grids[name])) for name, s in fitted.items()}
        options: dict[str, Any] = {
            "concept": concept,
            "samples_per_prompt": run.sizes.concept_samples,
            "support": "all",
        }
        if calibration is not None:
            options["calibration"] = [list(calibration[0]), list(calibration[1])]
        content = run.sweep(f"concept_{concept}", steerings, {"concept": options}, grids)
        tradeoff_plot(content, concept, run.out / f"concept_{concept}_tradeoff.png")
        rows = [
            [
                name,
                f"{s:g}",
                ci(entry, "fraction_on_concept", 100),
                f"{entry['metrics']['mean_similarity']:.3f}",
                f"{entry['metrics']['perplexity']:.1f}",
            ]
            for name, grid in grids.items()
            for s in grid
            for entry in [point(content, name, "concept", s, steerings[name])]
        ]
        judge = next(e for e in content["entries"] if e["task"] == "concept")["result"]
        sections += [
            f"**{concept}** (source {len(source)} / target {len(target)} sentences; judge "
            f"balanced accuracy {judge['settings']['calibration']['balanced_accuracy']:.2f})",
            table(["method", "λ", "% on concept [95% CI]", "mean sim.", "gen. PPL"], rows),
        ]
    return "\n\n".join(sections)


def tradeoff_plot(content: Mapping[str, Any], concept: str, path: Path) -> None:
    """Concept presence against generation perplexity, one line per method, λ annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in content["entries"] if e["task"] == "concept"]
    latest = entries[-1]["options_key"]
    entries = [e for e in entries if e["options_key"] == latest]
    base = next(e for e in entries if e["steering"] == ORIGINAL)["metrics"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name in CONCEPT_METHODS:
        points = sorted((e["strength"], e["metrics"]) for e in entries if e["steering"] == name)
        points = [(0.0, base), *points]
        xs = [m["perplexity"] for _, m in points]
        ys = [100 * m["fraction_on_concept"] for _, m in points]
        ax.plot(xs, ys, marker="o", markersize=4, label=name)
        for (strength, _), x, y in zip(points, xs, ys, strict=True):
            ax.annotate(
                f"{strength:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset pixels"
            )
    ax.set_xscale("log")
    ax.set_xlabel("perplexity of generations (plain model), log scale")
    ax.set_ylabel("% generations on the concept")
    ax.set_title(f"{concept}: presence vs perplexity (labels: λ) — {content['model']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if data_root() is None:
        raise SystemExit(f"error: set {DATA_ENV} to the shared data folder (../shared/data)")
    torch.set_num_threads(args.threads)
    run = Runner(args)
    header = (
        f"Model {args.model}, sizes {args.sizes} ({SIZES[args.sizes]}), modules {run.modules}.\n"
        f"Machine: {machine()}"
    )
    print(header, flush=True)
    work = {"toxicity": toxicity_part, "truthfulqa": truthfulqa_part, "concept": concept_part}
    for part in args.parts:
        run.timed(part, lambda p=part: work[p](run))
    done = [run.out / f"table_{p}.md" for p in PARTS if (run.out / f"table_{p}.md").exists()]
    text = "\n\n".join([header, *(path.read_text(encoding="utf-8") for path in done)])
    (run.out / "tables.md").write_text(text, encoding="utf-8")
    print(f"tables: {run.out / 'tables.md'}")


if __name__ == "__main__":
    main()
