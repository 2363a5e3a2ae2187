"""Do LinEAS's settings move *unseen* texts toward the target? Held-out W2 ratios against
Linear-AcT on two data sets (issue 28 §3).

SmolLM2-135M-Instruct (float32, CPU), modules --modules (default post-attn-ln), fits on
--lines texts per set, measured on --held-out other texts per set:
- `paradetox`: toxic ParaDetox sentences → their neutral paraphrases (toxicity_fit/source.txt,
  target.txt; held out: source_val.txt, target_val.txt);
- `unpaired`: toxic ParaDetox sentences → WikiText-2 sentences (not paraphrases: texts that
  differ in the property and in everything else; later lines of source.txt, sentences of
  wikitext/wiki.test.raw, held-out ones from further on).
Never the evaluation prompts. For each steering: the end-to-end distance (LinEAS's loss: Σ
modules Σ units W2² between pooled activations of held-out source texts through the steered
model at λ = 1, its own default support, and of held-out target texts on the plain model),
divided by the same distance unsteered: < 1 moves unseen texts closer.

--draw N fits on another draw of texts (N × --lines further into each file; WikiText's after
the held-out ones); the held-out texts are the same in every draw. Results are kept per (data
set, modules, lines, draw, variant) in --out (JSON), so a killed run resumes.

  ACTSTEER_DATA=../shared/data .venv/bin/python benchmarks/lineas_generalisation.py
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from _common import DATA, ROOT, begin, load_json, read_lines, save_json, table

import actsteer
from actsteer.capture import record
from actsteer.lineas import end_to_end_distance
from actsteer.modes import EndToEnd

#: The steerings compared: name → fit keywords (LinEAS's training settings as EndToEnd).
VARIANTS: dict[str, dict] = {
    "linear-act": {},
    "lineas": {"method": "lineas"},
    "lineas, held out 0.25": {"method": "lineas", "mode": EndToEnd(held_out=0.25)},
    "lineas, sparsity 0.1": {"method": "lineas", "mode": EndToEnd(sparsity=0.1)},
    "lineas, sparsity 0.3": {"method": "lineas", "mode": EndToEnd(sparsity=0.3)},
    "lineas, sparsity 1": {"method": "lineas", "mode": EndToEnd(sparsity=1.0)},
    "lineas, sparsity 3": {"method": "lineas", "mode": EndToEnd(sparsity=3.0)},
    "lineas, sparsity 10": {"method": "lineas", "mode": EndToEnd(sparsity=10.0)},
    "lineas, held out 0.25, sparsity 0.1": {
        "method": "lineas",
        "mode": EndToEnd(held_out=0.25, sparsity=0.1),
    },
}


def wikitext_sentences(count: int, start: int = 0) -> list[str]:
    """Sentences of 8–40 words from WikiText-2's test paragraphs (headings skipped), in order."""
    raw = (DATA.parent / "wikitext" / "wiki.test.raw").read_text(encoding="utf-8")
    sentences = []
    for line in raw.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<=\.) ", line):
            if 8 <= len(sentence.split()) <= 40:
                sentences.append(sentence)
    return sentences[start : start + count]


def data_sets(lines: int, held: int, draw: int) -> dict[str, tuple[list[str], ...]]:
    """name → (fit source, fit target, held-out source, held-out target)."""
    start = draw * lines
    wiki_start = lines + held + (draw - 1) * lines if draw else 0
    return {
        "paradetox": (
            read_lines("source", start, lines),
            read_lines("target", start, lines),
            read_lines("source_val", 0, held),
            read_lines("target_val", 0, held),
        ),
        "unpaired": (
            read_lines("source", 1000 + start, lines),
            wikitext_sentences(lines, start=wiki_start),
            read_lines("source_val", held, held),
            wikitext_sentences(held, start=lines),
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lines", type=int, default=32)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--draw", type=int, default=0, help="which draw of fit texts (0: first)")
    parser.add_argument("--modules", default="post-attn-ln")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "runs" / "lineas-generalisation.json"
    )
    args = parser.parse_args()
    run = begin("benchmarks/lineas_generalisation.py", None, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")
    results = load_json(args.out)
    names = None
    for data_name, (source, target, held_source, held_target) in data_sets(
        args.lines, args.held_out, args.draw
    ).items():
        plain = {}
        for variant in args.variants:
            lines = f"{args.lines}" + (f" (draw {args.draw})" if args.draw else "")
            key = f"{data_name} | {args.modules} | {lines} | {variant}"
            if key in results:
                continue
            started = time.perf_counter()
            steering = actsteer.fit(
                model, tok, source=source, target=target, modules=args.modules,
                progress=False, **VARIANTS[variant],
            )  # fmt: skip
            seconds = time.perf_counter() - started
            names = steering.modules
            if not plain:
                plain["target"] = record(model, tok, held_target, names, progress=False)
                unsteered = record(model, tok, held_source, names, progress=False)
                plain["distance"] = end_to_end_distance(unsteered, plain["target"])
            with steering.applied(model, 1.0):
                steered = record(model, tok, held_source, names, progress=False)
            distance = end_to_end_distance(steered, plain["target"])
            training = steering.info.data.get("training", {})
            results[key] = {
                "distance": distance,
                "unsteered": plain["distance"],
                "ratio": distance / plain["distance"],
                "fit_seconds": seconds,
                "chosen_step": training.get("chosen_step"),
                "units_touched": training.get("units_touched"),
            }
            save_json(args.out, results)
            print(f"{key}: ratio {distance / plain['distance']:.3f} ({seconds:.0f} s)", flush=True)
    rows = []
    for key, result in results.items():
        rows.append(
            [*key.split(" | "), f"{result['ratio']:.3f}", f"{result['distance']:.2f}",
             f"{result['unsteered']:.2f}", result["chosen_step"] or "–",
             f"{result['fit_seconds']:.0f}"]
        )  # fmt: skip
    header = ["data", "modules", "lines", "steering", "held-out W2 ÷ unsteered", "W2",
              "unsteered", "chosen step", "fit s"]  # fmt: skip
    print(table(header, rows))
    print(f"{run.command}; {run.env}; {run.seconds() / 60:.1f} min")


if __name__ == "__main__":
    main()
