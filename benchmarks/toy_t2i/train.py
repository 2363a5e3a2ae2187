"""Train the toy text-to-image model on CPU and save it as a standard diffusers folder.

The model has Stable Diffusion 1.x's shape, only tiny, so that `StableDiffusionPipeline` runs it
unchanged and `DiffusionPipeline.from_pretrained(folder)` loads it back:

- tokenizer: a word-level `tokenizers` model over the caption vocabulary, wrapped as a
  `PreTrainedTokenizerFast` ([BOS] caption [EOS], padded to 24 tokens, lower-cased; built by
  `build_tokenizer` of tests/toy_t2i_world/pipeline.py, beside the dataset and detectors);
- text encoder: a 2-layer `CLIPTextModel` (hidden size 64), trained jointly with the UNet;
- VAE: an `AutoencoderKL` 32x32x3 -> 16x16x4, blocks (16, 32), no attention (trained first,
  mostly on 16x16 crops since it is convolutional, then frozen);
- UNet: a `UNet2DConditionModel` on 16x16x4 latents, blocks (32, 64, 64), self- and
  cross-attention at 8x8 and 4x4 (and in the mid block), GroupNorm everywhere;
- scheduler: DDPM noise schedule for training (SD's scaled-linear betas), DDIM for sampling.

Training drops 10% of captions (empty prompt), so classifier-free guidance works; the saved
weights are an exponential moving average. Usage:

    .venv/bin/python -m benchmarks.toy_t2i.train [OUT_DIR] [--steps N] [--vae-steps N]

OUT_DIR defaults to $ACTSTEER_CACHE/toy_t2i (or ~/.cache/actsteer/toy_t2i); weights never go
into the repository.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from tests.toy_t2i_world import dataset as ds
from tests.toy_t2i_world import measure
from tests.toy_t2i_world.pipeline import MAX_TOKENS, build_tokenizer, default_out_dir

SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    """A 2-layer CLIP text transformer, hidden size 64 (the UNet's cross-attention width)."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        projection_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    """32x32x3 <-> 16x16x4 KL autoencoder, blocks (16, 32), no attention."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=ds.SIZE,
        mid_block_add_attention=False,
    )


def build_unet(pooled_text: bool = False) -> UNet2DConditionModel:
    """SD-1.x-shaped UNet on 16x16x4 latents: blocks (32, 64, 64), attention at 8x8 and 4x4.

    With `pooled_text` (experimental, off by default), an attention-pooled summary of the text
    is added to the timestep embedding (diffusers' addition_embed_type="text"; SDXL adds pooled
    text the same way), so every ResNet block also gets the caption as a per-channel bias, not
    only through cross-attention at 8x8 and 4x4. This adds LayerNorms `add_embedding.norm1`
    (B, T, D) and `add_embedding.norm2` (B, D) to the UNet.
    """
    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4}
    return UNet2DConditionModel(
        **(extra if pooled_text else {}),
        sample_size=ds.SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
    )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def train_vae(
    vae: AutoencoderKL, images: torch.Tensor, steps: int, batch: int, t0: float, seed: int
) -> float:
    """Reconstruction (MSE) + 1e-6 KL, AdamW; returns the scaling factor 1/std(latents).

    The first 80% of the steps see random 16x16 crops (a quarter of the cost; the model is
    convolutional), the rest whole images, so GroupNorm statistics match inference.
    """
    g = torch.Generator().manual_seed(seed)
    half = ds.SIZE // 2
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
    vae.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 1e-3, 100)
        x = images[torch.randint(len(images), (batch,), generator=g)]
        if step < 0.8 * steps:
            oy, ox = (int(v) for v in torch.randint(0, half + 1, (2,), generator=g))
            x = x[:, :, oy : oy + half, ox : ox + half]
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 1e-6 * post.kl().sum() / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"vae step {step:5d}/{steps}  mse {mse.item():.5f}", t0)
    vae.eval()
    with torch.no_grad():
        z = torch.cat(
            [vae.encode(images[i : i + 512]).latent_dist.mean for i in range(0, 4096, 512)]
        )
    return float(1.0 / z.std())


@torch.no_grad()
def vae_check(vae: AutoencoderKL, seed: int, n: int = 256) -> dict[str, float]:
    """Detector accuracies on VAE reconstructions of held-out images (the VAE's ceiling)."""
    _, _, samples = ds.make_dataset(n, seed=seed + 10_000)
    x = to_tensor(np.stack([s.image for s in samples]))
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    arr = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for s, img in zip(samples, arr, strict=True):
        s.image = img
    report = measure.calibrate(samples)
    keys = ("pink_accuracy", "stripe_accuracy", "background_accuracy", "colour_accuracy")
    return {k: round(float(report[k]), 3) for k in (*keys, "shape_accuracy")}


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds of all images (unscaled)."""
    means, stds = [], []
    for i in range(0, len(images), 512):
        post = vae.encode(images[i : i + 512]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


class EMA:
    """Exponential moving average of a set of parameters."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        params = [p for m in modules for p in m.parameters()]
        for p, s in zip(params, self.shadow, strict=True):
            p.copy_(s)


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    t0: float,
    seed: int,
    p_uncond: float = 0.1,
) -> EMA:
    """Epsilon-prediction with min-SNR(5) weighting; text encoder trained jointly; EMA."""
    g = torch.Generator().manual_seed(seed)
    noise_sched = DDPMScheduler(**SCHEDULE)
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=True)
    ema = EMA([unet, text_encoder], decay=0.999)
    mean, std = latents
    unet.train()
    text_encoder.train()
    running = 0.0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, 200)
        idx = torch.randint(len(mean), (batch,), generator=g)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        tok = ids[idx].clone()
        drop = torch.rand(batch, generator=g) < p_uncond
        tok[drop] = empty_ids
        cond = text_encoder(tok).last_hidden_state
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(min(ema.decay, (1 + step) / (10 + step)))
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            _log(f"unet step {step:5d}/{steps}  loss {running:.4f}", t0)
    return ema


def main(argv: list[str] | None = None) -> Path:
    """Parse arguments, train the VAE, then the UNet + text encoder, and save the pipeline."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, default=default_out_dir())
    ap.add_argument("--images", type=int, default=20000, help="training images")
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2500, help="UNet training steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="dataset and training seed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--pooled-text",
        action="store_true",
        help="experimental: also add pooled text to the timestep embedding",
    )
    ap.add_argument(
        "--vae-from", type=Path, default=None, help="reuse the VAE of a saved toy pipeline"
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    images_np, captions, _ = ds.make_dataset(args.images, seed=args.seed)
    images = to_tensor(images_np)
    tokenizer = build_tokenizer()
    ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
    ids = ids.input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
    _log(f"dataset: {len(captions)} images, vocabulary {len(tokenizer)}", t0)

    vae = build_vae()
    text_encoder = build_text_encoder(len(tokenizer))
    unet = build_unet(pooled_text=args.pooled_text)
    n_params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))
    }
    _log(f"parameters: {n_params}", t0)

    if args.vae_from is not None:
        vae = AutoencoderKL.from_pretrained(args.vae_from / "vae").eval()
        scale = float(vae.config.scaling_factor)
    else:
        scale = train_vae(vae, images, args.vae_steps, args.batch, t0, args.seed)
        vae.register_to_config(scaling_factor=scale)
    t_vae = time.perf_counter() - t0
    _log(f"vae done, scaling factor {scale:.4f}", t0)
    vae_report = vae_check(vae, args.seed)
    _log(f"detectors on VAE reconstructions: {vae_report}", t0)
    mean, std = encode_latents(vae, images)
    mean, std = mean * scale, std * scale
    ema = train_unet(
        unet,
        text_encoder,
        (mean, std),
        ids,
        empty.input_ids[0],
        args.steps,
        args.batch,
        args.lr,
        t0,
        args.seed + 1,
    )
    ema.copy_to([unet, text_encoder])
    unet.eval()
    text_encoder.eval()
    elapsed = time.perf_counter() - t0

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(
            **SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out)
    info = {
        "images": args.images,
        "vae_steps": args.vae_steps,
        "vae_from": str(args.vae_from) if args.vae_from else None,
        "unet_steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "pooled_text": args.pooled_text,
        "seed": args.seed,
        "threads": args.threads,
        "parameters": n_params,
        "vae_seconds": round(t_vae, 1),
        "vae_reconstruction_detectors": vae_report,
        "train_seconds": round(elapsed, 1),
        "dataset_config": ds.Config().__dict__,
    }
    (args.out / "toy_t2i.json").write_text(json.dumps(info, indent=2) + "\n")
    _log(f"saved to {args.out} ({elapsed / 60:.1f} min of training)", t0)
    return args.out


if __name__ == "__main__":
    main()
