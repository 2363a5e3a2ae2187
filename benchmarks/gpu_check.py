"""The GPU check (issue 27 §6): what the CPU tests cannot show, in one self-contained script.

No weights or tokenizers to download: Llama-shaped models built from configs (random weights)
and a word-level tokenizer built here; source and target texts are sentences over two disjoint
halves of its vocabulary. On each shape it checks, on the device and in the dtype given:

  λ = 0 is bit-identical to the plain model; hooks and folded weights agree (fold's probe
  tolerance of the dtype); per-row λ equals each row alone; a gated steering runs and a gate
  switched off is the ungated steering; LinEAS trains a few steps to a finite loss; fit
  captures --texts texts per set; `generate` steered ÷ plain throughput at batch 1 and 32,
  eager, and compiled with a static cache (CUDA graphs on CUDA; --compiled-shapes): compiled
  steered tokens against eager steered ones, no recompilation when λ changes.

    python benchmarks/gpu_check.py                         # CUDA, bfloat16, shapes 1b and 8b
    python benchmarks/gpu_check.py --device cpu --dtype float32 --shapes tiny --texts 64
The last line says whether every check passed; the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import actsteer
from actsteer.modes import EndToEnd

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocabulary
    "tiny": (64, 128, 4, 4, 2, 2000),
    "1b": (2048, 8192, 16, 32, 8, 32000),  # Llama-3.2-1B's shape (a smaller vocabulary)
    "8b": (4096, 14336, 32, 32, 8, 32000),  # Llama-3.1-8B's shape (a smaller vocabulary)
}
RESULTS: list[tuple[str, str, bool]] = []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=list(SHAPES))
    parser.add_argument("--texts", type=int, default=1000, help="texts per set to capture")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the throughput check")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--compiled-shapes", nargs="*", default=["1b", "tiny"], choices=list(SHAPES),
        help="shapes whose compiled generation is checked (each compiles twice)",
    )  # fmt: skip
    return parser.parse_args(argv)


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]"])}
    words |= {f"w{i}": i + 4 for i in range(vocab - 4)}
    core = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
        eos_token="[EOS]", padding_side="left",
    )  # fmt: skip


def sentences(count: int, low: int, high: int, seed: int) -> list[str]:
    """`count` sentences of 8–24 words drawn from words w`low` … w`high - 1`."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 25, (count,), generator=generator).tolist()
    return [
        " ".join(f"w{w}" for w in torch.randint(low, high, (n,), generator=generator).tolist())
        for n in lengths
    ]


def build(shape: str, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    hidden, intermediate, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def check(shape: str, name: str, passed: bool, detail: str) -> None:
    RESULTS.append((shape, f"{name}: {detail}", passed))
    print(f"  [{'ok' if passed else 'FAILED'}] {name}: {detail}", flush=True)


def logits(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits.float()


def tokens_per_second(generate: Callable[[], torch.Tensor], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out.numel() / (time.perf_counter() - start)


def run_shape(shape: str, args: argparse.Namespace, dtype: torch.dtype) -> None:
    print(f"\n## {shape} ({args.device}, {args.dtype})", flush=True)
    started = time.perf_counter()
    model = build(shape, args.device, dtype)
    tok = word_tokenizer(SHAPES[shape][5])
    half = SHAPES[shape][5] // 2
    source, target = sentences(args.texts, 4, half, 0), sentences(args.texts, half, 2 * half, 1)
    prompts = sentences(32, 4, 2 * half, 2)
    batch = {k: v.to(args.device) for k, v in tok(prompts[:4], return_tensors="pt",
                                                    padding=True).items()}  # fmt: skip

    fit_start = time.perf_counter()
    steering = actsteer.fit(
        model, tok, source, target, modules="post-attn-ln", support="all", progress=False
    )
    check(shape, "capture and fit", True,
          f"{2 * args.texts} texts in {time.perf_counter() - fit_start:.1f} s")  # fmt: skip

    plain = logits(model, batch)
    with steering.applied(model, 0.0):
        zero = logits(model, batch)
    check(shape, "λ = 0", torch.equal(plain, zero), "bit-identical to the plain model")

    with steering.applied(model, 1.0):
        hooked = logits(model, batch)
    folded = steering.fold(copy.deepcopy(model), 1.0)  # refuses if it disagrees with the hooks
    gap = float((logits(folded, batch) - hooked).abs().max() / hooked.abs().max())
    del folded
    check(shape, "fold", True, f"folded vs hooked logits, relative gap {gap:.2e}")

    lams = torch.tensor([0.0, 0.5, 1.0, 0.25])
    with steering.applied(model, lams):
        per_row = logits(model, batch)
    alone = []
    for row, lam in enumerate(lams.tolist()):
        one = {k: v[row : row + 1] for k, v in batch.items()}
        with steering.applied(model, lam):
            alone.append(logits(model, one))
    worst = max(float((per_row[r] - a[0]).abs().max()) for r, a in enumerate(alone))
    scale = float(per_row.abs().max())
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    check(shape, "per-row λ", worst <= tolerance * scale,
          f"max |batch − alone| {worst:.2e} (logits up to {scale:.1f})")  # fmt: skip

    gated = steering.with_gate(model, tok, source[:256], target[:256], "token", progress=False)
    with gated.applied(model, 1.0):
        with_gate = logits(model, batch)
    with gated.applied(model, 1.0, gated=False):
        gate_off = logits(model, batch)
    check(shape, "gate", bool(torch.isfinite(with_gate).all()) and torch.equal(gate_off, hooked),
          "gated logits finite; gate switched off = the ungated steering")  # fmt: skip

    mode = EndToEnd(training_steps=3, texts_per_step=8)
    lineas = actsteer.fit(
        model, tok, source[:64], target[:64], method="lineas", mode=mode,
        modules="post-attn-ln", progress=False,
    )  # fmt: skip
    curve = (lineas.info.data.get("training") or {}).get("loss_curve") or []
    finite = all(torch.isfinite(m.beta).all() for m in lineas.maps.values())
    last = f"{curve[-1][1]:.4g}" if curve else "n/a"
    check(shape, "LinEAS", finite and last != "n/a", f"3 steps, maps finite, final loss {last}")

    for size in (1, 32):
        inputs = tok(prompts[:size], return_tensors="pt", padding=True).to(args.device)
        options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       do_sample=False, pad_token_id=tok.pad_token_id)  # fmt: skip

        def generate(options: dict = options, inputs: dict = inputs) -> torch.Tensor:
            with torch.inference_mode():
                return model.generate(**inputs, **options)[:, inputs["input_ids"].shape[1] :]

        generate()  # warm-up
        ratios = []
        for _ in range(args.rounds):
            unsteered = tokens_per_second(generate, args.device)
            with steering.applied(model, 1.0):
                steered = tokens_per_second(generate, args.device)
            ratios.append(steered / unsteered)
        check(shape, f"generate batch {size}", True,
              f"steered ÷ plain {statistics.median(ratios):.3f} (median of {args.rounds}; "
              f"eager)")  # fmt: skip
    if shape in args.compiled_shapes:
        compiled_generation(model, tok, steering, prompts, shape, args)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def compiled_generation(model, tok, steering, prompts, shape: str, args) -> None:
    """Static-cache generation with a compiled forward (on CUDA with CUDA graphs:
    mode="reduce-overhead"), plain, then steered (one recompilation when the steering comes:
    actsteer.compiled): the steered tokens against eager steered ones, no graph compiled when
    λ changes, and compiled steered ÷ compiled plain throughput at batch 1 and 32 (plain
    rounds first, then steered: switching would recompile)."""
    from torch._dynamo.utils import counters

    cuda = args.device.startswith("cuda")
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                   do_sample=False, pad_token_id=tok.pad_token_id,
                   cache_implementation="static")  # fmt: skip
    inputs = {b: tok(prompts[:b], return_tensors="pt", padding=True).to(args.device)
              for b in (1, 32)}  # fmt: skip

    def generate(b: int) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(**inputs[b], **options)[:, inputs[b]["input_ids"].shape[1] :]

    with steering.applied(model, 1.0):
        eager_steered = generate(32)
    eager_forward = model.forward
    model.forward = torch.compile(model.forward, mode="reduce-overhead" if cuda else None)
    try:
        speeds: dict[str, dict[int, list[float]]] = {"plain": {1: [], 32: []}, "steered": {}}
        for b in (1, 32):
            generate(b)  # compiles
            speeds["plain"][b] = [tokens_per_second(lambda b=b: generate(b), args.device)
                                  for _ in range(args.rounds)]  # fmt: skip
        with steering.applied(model, 1.0) as handle:
            compiled_steered = generate(32)
            handle.set_strength(0.5)
            generate(1), generate(32)  # the other λ, and batch 1 compiled once
            graphs = counters["stats"]["unique_graphs"]
            handle.set_strength(1.0)
            steered = {b: [tokens_per_second(lambda b=b: generate(b), args.device)
                           for _ in range(args.rounds)] for b in (1, 32)}  # fmt: skip
            recompiled = counters["stats"]["unique_graphs"] - graphs
    finally:
        model.forward = eager_forward
    same = float((compiled_steered == eager_steered).float().mean())
    check(shape, "compiled steered", same >= 0.9 and recompiled == 0,
          f"{same:.0%} of greedy tokens as eager steered; {recompiled} graphs compiled when "
          f"λ changed")  # fmt: skip
    for b in (1, 32):
        ratio = statistics.median(steered[b]) / statistics.median(speeds["plain"][b])
        check(shape, f"compiled generate batch {b}", True,
              f"steered ÷ plain {ratio:.3f} (medians of {args.rounds}; static cache"
              f"{', CUDA graphs' if cuda else ''})")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run with --device cpu --dtype float32 "
                             "--shapes tiny for the CPU form")  # fmt: skip
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for shape in args.shapes:
        run_shape(shape, args, dtype)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the next shape gets the memory this one held
    failed = [f"{shape}: {what}" for shape, what, passed in RESULTS if not passed]
    print("\nall checks passed" if not failed else f"\n{len(failed)} check(s) FAILED: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
