"""Transformer (DiT) denoisers: tiny config-built PixArt-α and Flux pipelines, "dit-blocks"."""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

import actsteer
from actsteer import Denoising, Steering
from actsteer.capture import resolve_modules
from actsteer.diffusion import generate_images, record_pipeline
from actsteer.tree import PipelineModules
from tests.test_diffusion import SOURCE, TARGET, word_tokenizer

PIXART_RUN = dict(
    denoising_steps=3, guidance_scale=4.0, height=8, width=8, use_resolution_binning=False,
    clean_caption=False, max_sequence_length=12,
)  # fmt: skip
FLUX_RUN = dict(denoising_steps=2, guidance_scale=4.0, height=8, width=8, max_sequence_length=12)


def tiny_t5(vocab: int) -> T5EncoderModel:
    config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return T5EncoderModel(config).eval()  # built from a config: in training mode, with dropout


@pytest.fixture(scope="module")
def pixart():
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=32,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=8,
    )  # fmt: skip
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=tiny_t5(len(tokenizer)), vae=vae,
        transformer=transformer, scheduler=DDIMScheduler(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pixart_steering(pixart) -> Steering:
    options = dict(PIXART_RUN, every=1)
    return actsteer.fit(pixart, source=SOURCE, target=TARGET, mode=Denoising.of(**options),
                        progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def flux():
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )

    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=12, eos_token_id=3,
        )
    )  # fmt: skip
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )  # fmt: skip
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
        layers_per_block=1, latent_channels=1, norm_num_groups=1, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
        tokenizer=tokenizer, text_encoder_2=tiny_t5(len(tokenizer)), tokenizer_2=tokenizer,
        transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_images(pipe, prompts, strengths, steering=None) -> np.ndarray:
    out = generate_images(pipe, prompts, strengths, steering, output_type="np", **PIXART_RUN)
    return np.stack([np.stack(row) for row in out])


def block_outputs(pipe, name: str, prompts, run: dict, steering=None) -> list[tuple]:
    """What module `name` passes on at every call of one run (after its steering hook)."""
    seen = []
    module = dict(PipelineModules(pipe).named_modules())[name]

    def keep(_module, _args, output):
        outputs = output if isinstance(output, tuple) else (output,)
        seen.append(tuple(o.clone() for o in outputs))

    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    kwargs = {k: v for k, v in run.items() if k != "denoising_steps"}
    with ExitStack() as stack:
        if steering is not None:
            stack.enter_context(steering.applied(pipe, 1.0))  # scalar λ
        stack.callback(module.register_forward_hook(keep).remove)  # runs after the steering
        with torch.inference_mode():
            pipe(prompts, num_inference_steps=run["denoising_steps"], generator=gens, **kwargs)
    return seen


def test_dit_blocks_preset_hooks_every_transformer_block(pixart, pixart_steering):
    names = resolve_modules(PipelineModules(pixart), "dit-blocks")
    assert names == ["transformer.transformer_blocks.0", "transformer.transformer_blocks.1"]
    assert pixart_steering.modules == names, "dit-blocks is the default for transformer denoisers"
    assert pixart_steering.maps[names[0]].omega.shape == (16,), "one map per channel (2 × 8)"
    plain = block_outputs(pixart, names[0], SOURCE[:2], PIXART_RUN)
    steered = block_outputs(pixart, names[0], SOURCE[:2], PIXART_RUN, pixart_steering)
    assert len(plain) == len(steered) == PIXART_RUN["denoising_steps"], (
        "one call per denoising step"
    )
    first, first_steered = plain[0][0], steered[0][0]
    assert first.shape == (4, 16, 16), "CFG batch of 2 prompts, 4×4 patches, 16 channels"
    assert torch.equal(first_steered[:2], first[:2]), "unconditional half untouched"
    assert (first_steered[2:] - first[2:]).abs().max() > 1e-4, "conditional half steered"


def test_dit_zero_strength_bit_identical_and_per_row_equals_separate_runs(pixart, pixart_steering):
    plain = pixart_images(pixart, SOURCE[:2], [0.0])
    assert np.array_equal(pixart_images(pixart, SOURCE[:2], [0.0], pixart_steering), plain)
    together = pixart_images(pixart, SOURCE[:2], [0.0, 0.5, 1.0], pixart_steering)
    assert np.abs(together[:, 2] - plain[:, 0]).max() > 1e-3, "λ = 1 changes the images"
    for s, lam in enumerate([0.0, 0.5, 1.0]):
        alone = pixart_images(pixart, SOURCE[:2], [lam], pixart_steering)
        np.testing.assert_allclose(together[:, s], alone[:, 0], atol=1e-3)


def test_dit_artifact_round_trip(pixart, pixart_steering, tmp_path):
    loaded = Steering.load(pixart_steering.save(tmp_path / "dit.safetensors"))
    assert loaded.modules == pixart_steering.modules
    assert loaded.info.denoising["max_sequence_length"] == 12
    np.testing.assert_array_equal(
        pixart_images(pixart, SOURCE[:1], [1.0], loaded),
        pixart_images(pixart, SOURCE[:1], [1.0], pixart_steering),
    )


def test_dual_stream_blocks_steer_the_image_stream(flux):
    names = resolve_modules(PipelineModules(flux), "dit-blocks")
    assert names == ["transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"]
    options = dict(FLUX_RUN, every=100)  # the first denoising step only
    steering = actsteer.fit(flux, source=SOURCE, target=TARGET, mode=Denoising.of(**options),
                            progress=False)  # fmt: skip
    # The blocks return (text stream, image stream): recording pools the image stream.
    recorded = record_pipeline(flux, TARGET, names, progress=False, **options)
    plain = block_outputs(flux, names[0], TARGET, FLUX_RUN)
    text, image = plain[0]
    assert text.shape[1] == 12 and image.shape[1] == 16, "12 text tokens, 4×4 latent tokens"
    torch.testing.assert_close(recorded[names[0]], image.mean(dim=1))
    # Each block's map moves its image stream and leaves its text stream alone.
    for name in names:
        alone = Steering({name: steering.maps[name]}, steering.info)
        plain = block_outputs(flux, name, SOURCE[:2], FLUX_RUN)
        steered = block_outputs(flux, name, SOURCE[:2], FLUX_RUN, alone)
        assert torch.equal(steered[0][0], plain[0][0]), f"{name}: text stream untouched"
        assert (steered[0][1] - plain[0][1]).abs().max() > 1e-4, f"{name}: image stream steered"
