"""The reference side of reference_check.py: Apple's ml-act code fits Linear-AcT maps in its own
incremental ("incr") mode and the maps are written as safetensors.

Runs in the reference's own virtual environment, not actsteer's (it imports ml-act's `act`
package, Hydra, OmegaConf, diffusers, wandb). Nothing of ml-act is re-implemented or changed:
its Hydra configs (text_generation.yaml with intervention_params=linear_ot: incremental incr,
pooling mean, quantiles_src q_0_100, strength 1) are composed and then given this run's
settings, and its own `learn_intervention(cfg)` runs: ResponsesManager records the module's
pooled responses of both subsets with the maps of all earlier modules applied (its
LinearOTHook, loaded from the saved state dicts), InterventionsManager fits LinearOTHook on
them (solve_ot_1d + LinearProj.optimize) and saves a state dict, module by module.

Settings given to ml-act's config (all through config keys its code reads):
  model.model_path       the folder the actsteer side saved the model to (same weights)
  model.padding_side     "right" (ml-act's get_huggingface_model defaults to left padding,
                         which shifts positions of padded rows since only input_ids and
                         attention_mask reach the model; actsteer records right-padded)
  model.seq_len          tokenizer.model_max_length, the truncation length (128, as actsteer)
  model.module_names     the regex of the 60 norm outputs
  task_params.dataset    "json-subsets" with the texts as {"toxic": [...], "non-toxic": [...]}
  responses.balanced_data, responses.shuffle   false: batches in the file's order
  intervention_params.hook_params.quantiles_src   --support (q_0_100, its default, or q_all)
  device cpu, dtype float32, responses.num_workers 0, batch size, data/cache dirs

Output: safetensors with `<module>.omega`, `<module>.beta` (LinearProj w1, b1), `<module>.lo`,
`<module>.hi` (quantiles_dict_src["q_0_100"]), and the module order in the metadata.

  /tmp/venv-mlact/bin/python benchmarks/reference_mlact.py --mlact /tmp/ml-act \
      --model-dir DIR --texts texts.json --modules REGEX --work DIR --out maps.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlact", type=Path, required=True, help="checkout of apple/ml-act")
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--texts", type=Path, required=True, help="json-subsets JSON file")
    parser.add_argument("--modules", required=True, help="module regex (ml-act module_names)")
    parser.add_argument("--work", type=Path, required=True, help="empty folder for ml-act files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--support", default="q_0_100", help="ml-act's quantiles_src for applied maps (q_all: none)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("HF_HUB_CACHE", None)  # ml-act would look for the model path under it
    sys.path.insert(0, str(args.mlact.resolve()))
    import torch
    from act.scripts import learn_intervention as li  # registers the ${dtype:...} resolver
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    configs = (args.mlact / "act" / "configs").resolve()
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose("text_generation", overrides=["model=gpt2", "device=cpu"])
    with open_dict(cfg):
        cfg.data_dir = str(args.work)
        cfg.cache_dir = str(args.work)
        cfg.model.model_path = str(args.model_dir.resolve())
        cfg.model.padding_side = "right"
        cfg.model.seq_len = args.max_length
        cfg.model.default_batch_size = args.batch_size
        cfg.model.module_names = [args.modules]
        cfg.task_params.dataset = "json-subsets"
        cfg.task_params.dataset_params = {"json_path": str(args.texts.resolve())}
        cfg.responses.num_workers = 0
        # The texts in the file's order (sorted by length: little padding), not ml-act's
        # stratified shuffle; every text of both subsets is used either way (equal counts).
        cfg.responses.balanced_data = False
        cfg.responses.shuffle = False
        cfg.intervention_params.hook_params.quantiles_src = args.support
    params = cfg.interventions.intervention_params
    print(
        "ml-act intervention_params:",
        json.dumps(OmegaConf.to_container(params, resolve=True), default=str),
        flush=True,
    )
    assert params.name == "linear_ot" and params.incremental == "incr"
    started = time.perf_counter()
    manager = li.learn_intervention(cfg)
    seconds = time.perf_counter() - started
    assert manager is not None

    # The module order ml-act fitted in: its own module-name search over the model.
    from act.models.model_with_hooks import ModelWithHooks
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir))
    order = ModelWithHooks.find_module_names(model, [args.modules])
    tensors = {}
    for name in order:
        state = torch.load(manager.output_path / f"{name}.statedict")
        lo, hi = state["quantiles_dict_src"]["q_0_100"]
        tensors[f"{name}.omega"] = state["net.w1"].reshape(-1).float().contiguous()
        tensors[f"{name}.beta"] = state["net.b1"].reshape(-1).float().contiguous()
        tensors[f"{name}.lo"] = lo.reshape(-1).float().contiguous()
        tensors[f"{name}.hi"] = hi.reshape(-1).float().contiguous()
    meta = {
        "order": json.dumps(order),
        "seconds": f"{seconds:.1f}",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    save_file(tensors, str(args.out), metadata=meta)
    print(f"ml-act incremental fit of {len(order)} modules: {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
