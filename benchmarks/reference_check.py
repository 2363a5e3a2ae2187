"""actsteer's sequential Linear-AcT against the reference implementation's own incremental mode.

The reference is Apple's ml-act (github.com/apple/ml-act), run unchanged in its own virtual
environment by reference_mlact.py (its `learn_intervention` with incremental "incr": per
module, both subsets recorded with the maps of all earlier modules applied, λ = 1, support
q_0_100). actsteer fits the same texts with `fit(mode="sequential")`. Both sides: SmolLM2-135M-
Instruct in float32 on CPU (the same weights: this script saves the model actsteer loads and
the reference loads that folder), the first N toxic source / neutral target lines of
$ACTSTEER_DATA/toxicity_fit, the same tokenisation (the model's tokenizer, no added special
tokens, truncation at 128, right padding), mean pooling over real tokens, support q0-100 = per
unit min/max of the pooled source samples, batch size 32. The texts are sorted by token length
on both sides (little padding; neither estimator depends on the order of the texts). The
reference runs as a process of its own while actsteer fits.

Printed per module: the relative error ‖a − r‖₂ / ‖r‖₂ of ω and β (and of the support bounds);
then max and median over modules, for the sequential fit and, as a control that the check can
fail, for actsteer's independent fit against the same reference maps.

Setup of the reference side (once):
  mkdir -p /tmp/ml-act && git --git-dir=PATH/TO/ml-act.git archive HEAD act | tar -x -C /tmp/ml-act
  python3 -m venv /tmp/venv-mlact && /tmp/venv-mlact/bin/pip install torch==2.13.0 \
      transformers==5.24.0 safetensors numpy pandas hydra-core omegaconf pyyaml tqdm \
      scikit-learn pillow diffusers huggingface_hub accelerate wandb

  .venv/bin/python benchmarks/reference_check.py              # runs both sides
  .venv/bin/python benchmarks/reference_check.py --reference-maps maps.safetensors  # reuse
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import begin, read_lines, table
from safetensors import safe_open

import actsteer
from actsteer.capture import resolve_modules
from actsteer.sequential import execution_order

#: No ":" in the regex: ml-act reads "name:N" as output N of a module (so no "(?:...)").
#: actsteer's support name → ml-act's quantiles_src.
SUPPORTS = {"q0-100": "q_0_100", "all": "q_all"}
NORMS = r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)"
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=256, help="source and target lines each")
    parser.add_argument("--modules", default=NORMS, help="module regex (default: 60 norms)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument(
        "--support", choices=sorted(SUPPORTS), default="q0-100", help="support of applied maps"
    )
    parser.add_argument("--mlact", type=Path, default=Path("/tmp/ml-act"))
    parser.add_argument("--mlact-python", type=Path, default=Path("/tmp/venv-mlact/bin/python"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/actsteer-reference-check"))
    parser.add_argument(
        "--reference-maps", type=Path, help="reuse maps written by reference_mlact.py"
    )
    return parser.parse_args(argv)


def start_reference(args: argparse.Namespace, model, tok, source, target):
    """Save the model and texts and start ml-act's incremental fit in its venv (a process that
    runs while actsteer fits); returns the process and the path its maps will be written to."""
    work = args.work
    if work.exists() and any(work.iterdir()):
        sys.exit(f"--work {work} is not empty; remove it or pass another folder")
    (work / "mlact").mkdir(parents=True)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    texts = work / "texts.json"
    texts.write_text(json.dumps({"toxic": source, "non-toxic": target}))
    out = work / "reference.safetensors"
    command = [
        str(args.mlact_python), str(HERE / "reference_mlact.py"), "--mlact", str(args.mlact),
        "--model-dir", str(work / "model"), "--texts", str(texts), "--modules", args.modules,
        "--work", str(work / "mlact"), "--out", str(out), "--batch-size", str(args.batch_size),
        "--max-length", str(args.max_length), "--threads", str(args.threads),
        "--support", SUPPORTS[args.support],
    ]  # fmt: skip
    print("reference:", " ".join(command), flush=True)
    log = (work / "reference.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), out


def relative(a: torch.Tensor, r: torch.Tensor) -> float:
    return float((a.double() - r.double()).norm() / r.double().norm())


def compare(steering: actsteer.Steering, ref: dict[str, torch.Tensor], order: list[str]):
    """Per module: relative errors of ω, β, lo, hi against the reference."""
    rows = []
    for name in order:
        m = steering.maps[name]
        lo, hi = m.bounds["q0-100"]
        rows.append(
            (
                name,
                relative(m.omega, ref[f"{name}.omega"]),
                relative(m.beta, ref[f"{name}.beta"]),
                relative(lo, ref[f"{name}.lo"]),
                relative(hi, ref[f"{name}.hi"]),
            )
        )
    return rows


def summary(rows, column: int) -> tuple[float, float]:
    values = [row[column] for row in rows]
    return max(values), statistics.median(values)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if ":" in args.modules:
        sys.exit("--modules must not contain ':' (ml-act reads 'name:N' as output N of a module)")
    begin("benchmarks/reference_check.py", argv, args.threads)
    model, tok = actsteer.load_model("smollm2-135m")  # float32, CPU
    # Sorted by token length (both sides, same order): batches with little padding. The
    # estimators do not depend on the order of the texts.
    source = sorted(read_lines("source", 0, args.lines), key=lambda t: len(tok(t).input_ids))
    target = sorted(read_lines("target", 0, args.lines), key=lambda t: len(tok(t).input_ids))
    names = resolve_modules(model, args.modules)
    order = execution_order(model, tok, source[0], names)
    print(f"{len(source)} + {len(target)} texts, {len(names)} modules", flush=True)

    process, path = None, args.reference_maps
    if path is None:
        process, path = start_reference(args, model, tok, source, target)
    # "sequential, batch B/2": actsteer against itself with other batches, i.e. float32 rounding
    # alone: the floor any two implementations can reach on this model and data.
    runs = {
        "sequential": ("sequential", args.batch_size),
        f"sequential, batch {args.batch_size // 2}": ("sequential", args.batch_size // 2),
        "independent": ("independent", args.batch_size),
    }
    fits, seconds = {}, {}
    for label, (mode, batch_size) in runs.items():
        started = time.perf_counter()
        fits[label] = actsteer.fit(
            model, tok, source=source, target=target, modules=names, method="linear-act",
            mode=mode, pooling="mean", support=args.support, batch_size=batch_size,
            max_length=args.max_length, progress=False,
        )  # fmt: skip
        seconds[label] = time.perf_counter() - started
        print(f"actsteer {label} fit: {seconds[label]:.0f} s", flush=True)
    if process is not None and process.wait() != 0:
        sys.exit(f"the reference run failed (exit {process.returncode}); see {args.work}")
    with safe_open(str(path), "pt") as f:
        ref = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        meta = f.metadata()
    ref_order = json.loads(meta["order"])
    if ref_order != order:
        sys.exit(f"module order differs: reference {ref_order[:3]}…, actsteer {order[:3]}…")
    print(f"reference: {len(ref_order)} modules fitted in order, {meta['seconds']} s", flush=True)
    rows = {label: compare(s, ref, order) for label, s in fits.items()}
    half = f"sequential, batch {args.batch_size // 2}"
    own = {
        f"{name}.{key}": tensor
        for name, m in fits["sequential"].maps.items()
        for key, tensor in (
            ("omega", m.omega), ("beta", m.beta), ("lo", m.bounds["q0-100"][0]),
            ("hi", m.bounds["q0-100"][1]),
        )
    }  # fmt: skip
    rows[f"{half} vs actsteer sequential"] = noise = compare(fits[half], own, order)
    print(
        table(
            [
                "module",
                "ω rel. err.",
                "β rel. err.",
                "lo rel. err.",
                "hi rel. err.",
                f"ω, β: batch {args.batch_size // 2} vs {args.batch_size}",
            ],
            [
                (n, *(f"{v:.2e}" for v in vals), f"{own_row[1]:.1e}, {own_row[2]:.1e}")
                for (n, *vals), own_row in zip(rows["sequential"], noise, strict=True)
            ],
        )  # fmt: skip
    )
    print()
    lines = []
    for label, mode_rows in rows.items():
        for column, what in ((1, "ω"), (2, "β"), (3, "support lo"), (4, "support hi")):
            worst, median = summary(mode_rows, column)
            against = "" if " vs " in label else " vs ml-act"
            lines.append((f"actsteer {label}{against}", what, f"{worst:.2e}", f"{median:.2e}"))
    print(table(["comparison", "", "max over modules", "median"], lines))
    worst = max(max(summary(rows["sequential"], 1)[0], summary(rows["sequential"], 2)[0]), 0.0)
    verdict = "PASS" if worst <= args.tolerance else "FAIL"
    print(f"\n{verdict}: sequential max relative error {worst:.2e} (tolerance {args.tolerance})")
    if verdict == "FAIL":
        sys.exit(1)


if __name__ == "__main__":
    main()
