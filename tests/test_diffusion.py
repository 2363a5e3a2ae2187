"""Text-to-image pipelines: tiny config-built Stable Diffusion and PixArt (DiT) pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

import actsteer
from actsteer import ActSteerError, Denoising, Steering
from actsteer.capture import resolve_modules
from actsteer.diffusion import generate_images, record_pipeline
from actsteer.guidance import Guidance
from actsteer.tree import PipelineModules

WORDS = [
    *("a", "an", "the", "on", "no", "beach", "grass", "striped"),
    *("red", "blue", "green", "pink", "square", "circle", "dog", "cat", "elephant"),
]
SOURCE = [
    f"a {c} {s} on the beach, a pink elephant" for c in ("red", "blue") for s in ("dog", "cat")
]
TARGET = [f"a {c} {s} on the beach" for c in ("red", "blue") for s in ("dog", "cat")]
RUN = dict(denoising_steps=4, guidance_scale=4.0, height=8, width=8)


def word_tokenizer(max_length: int = 12) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, model_max_length=max_length, pad_token="[PAD]",
        unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
    )  # fmt: skip


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd_pipeline()


def tiny_sd_pipeline():
    """A random Stable Diffusion pipeline built from configs: 8×8 latents, a word tokenizer."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=12,
        )
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32,), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=8,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd_steering(sd_pipe) -> Steering:
    settings = Denoising.of(denoising_steps=4, guidance_scale=4.0, every=1, height=8, width=8)
    return actsteer.fit(sd_pipe, source=SOURCE, target=TARGET, mode=settings, progress=False)


def images(pipe, prompts, strengths, steering=None) -> np.ndarray:
    out = generate_images(pipe, prompts, strengths, steering, output_type="np", **RUN)
    return np.stack([np.stack(row) for row in out])


def test_unet_norm_preset_covers_every_norm(sd_pipe):
    names = resolve_modules(PipelineModules(sd_pipe), "unet-norms")
    assert "unet.conv_norm_out" in names
    assert "unet.down_blocks.0.resnets.0.norm1" in names
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.norm1" in names
    assert all(n.startswith("unet.") for n in names)
    groupnorms = [m for n, m in sd_pipe.unet.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len([n for n in names if "transformer_blocks" not in n]) == len(groupnorms)


def test_recording_pools_conditional_half_over_steps(sd_pipe):
    names = ["unet.conv_norm_out", "unet.down_blocks.0.attentions.0.transformer_blocks.0.norm1"]
    opts = dict(denoising_steps=4, every=2, height=8, width=8, progress=False)
    samples = record_pipeline(sd_pipe, TARGET, names, guidance_scale=4.0, **opts)
    assert samples[names[0]].shape == (len(TARGET) * 2, 32), "prompts × recorded steps, channels"
    assert samples[names[1]].shape == (len(TARGET) * 2, 32)
    # At the first step the conditional half equals a run without guidance (same noise).
    first = dict(opts, every=100)
    guided = record_pipeline(sd_pipe, TARGET, names, guidance_scale=4.0, **first)
    plain = record_pipeline(sd_pipe, TARGET, names, guidance_scale=1.0, **first)
    for name in names:
        assert torch.allclose(guided[name], plain[name], atol=1e-5)


def test_zero_strength_is_bit_identical_and_steering_acts(sd_pipe, sd_steering):
    plain = images(sd_pipe, TARGET[:2], [0.0])
    assert np.array_equal(images(sd_pipe, TARGET[:2], [0.0], sd_steering), plain)
    steered = images(sd_pipe, TARGET[:2], [1.0], sd_steering)
    assert np.abs(steered - plain).max() > 1e-3
    assert np.array_equal(images(sd_pipe, TARGET[:2], [0.0]), plain), "hooks removed on exit"


def test_per_row_strength_equals_separate_runs(sd_pipe, sd_steering):
    together = images(sd_pipe, SOURCE[:2], [0.0, 0.5, 1.0], sd_steering)
    for s, lam in enumerate([0.0, 0.5, 1.0]):
        alone = images(sd_pipe, SOURCE[:2], [lam], sd_steering)
        # Batches of different sizes round differently over the denoising loop: allow a quarter
        # of one 8-bit colour level.
        np.testing.assert_allclose(together[:, s], alone[:, 0], atol=1e-3)


def first_outputs(pipe, component: str, prompts, steering=None, strength=1.0, **kw) -> list:
    """The outputs of every call of one pipeline component during one run (first tensor)."""
    seen = []

    def keep(module, args, output):
        seen.append(output[0].clone())  # UNet sample, text encoder last hidden state

    handle = getattr(pipe, component).register_forward_hook(keep)
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    run = dict(num_inference_steps=2, guidance_scale=4.0, height=8, width=8, generator=gens)
    try:
        with torch.inference_mode():
            if steering is None:
                pipe(prompts, **run)
            else:
                with steering.applied(pipe, strength, **kw):
                    pipe(prompts, **run)
    finally:
        handle.remove()
    return seen


def test_conditional_cfg_steers_only_the_conditional_half(sd_pipe, sd_steering):
    n = 2
    plain = first_outputs(sd_pipe, "unet", SOURCE[:n])[0]
    for strength in (1.0, torch.ones(n)):  # scalar and per-row λ
        steered = first_outputs(sd_pipe, "unet", SOURCE[:n], sd_steering, strength)[0]
        assert torch.equal(steered[:n], plain[:n]), "unconditional half untouched"
        assert (steered[n:] - plain[n:]).abs().max() > 1e-4
    both = first_outputs(sd_pipe, "unet", SOURCE[:n], sd_steering, 1.0, guidance="both")[0]
    assert (both[:n] - plain[:n]).abs().max() > 1e-4
    with pytest.raises(ActSteerError, match="unknown guidance"):
        sd_steering.attach(sd_pipe, guidance="uncond")
    with pytest.raises(ActSteerError, match="unknown cfg"):
        sd_steering.attach(sd_pipe, cfg="uncond")


def test_the_old_cfg_argument_still_works_with_a_warning(sd_pipe, sd_steering):
    n = 2
    both = first_outputs(sd_pipe, "unet", SOURCE[:n], sd_steering, 1.0, guidance="both")[0]
    with pytest.warns(DeprecationWarning, match="now called guidance="):
        old = first_outputs(sd_pipe, "unet", SOURCE[:n], sd_steering, 1.0, cfg="both")[0]
    assert torch.equal(old, both)


def test_guidance_is_read_per_call(sd_pipe, sd_steering):
    """A run without guidance after one with it, under the same hooks: every row is steered."""
    n, seen = 2, []
    handle = sd_pipe.unet.register_forward_hook(lambda m, a, o: seen.append(o[0].clone()))
    run = dict(num_inference_steps=2, height=8, width=8)

    def generate(guidance_scale: float) -> torch.Tensor:
        seen.clear()
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        sd_pipe(SOURCE[:n], guidance_scale=guidance_scale, generator=gens, **run)
        return seen[0]

    try:
        with torch.inference_mode():
            plain = generate(1.0)
            with sd_steering.applied(sd_pipe, 1.0):
                generate(4.0)
                steered = generate(1.0)
    finally:
        handle.remove()
    assert steered.shape[0] == n, "no CFG batch"
    assert all((steered[i] - plain[i]).abs().max() > 1e-4 for i in range(n))


@pytest.mark.parametrize("call", ["positional", "sample", "hidden_states"])
def test_a_pipeline_without_the_flag_splits_a_batch_of_twice_the_prompts(call):
    """Without do_classifier_free_guidance, a denoiser call whose latents have twice the rows the
    text encoder saw is a CFG batch; decided once per denoiser call, from its input."""
    state = Guidance(object())
    assert not state.has_flag
    state.text_calls["text_encoder"] = 0
    state._count("text_encoder", None, (torch.zeros(3, 7, dtype=torch.long),), {})
    for rows, split in ((6, True), (3, False)):
        latents = torch.zeros(rows, 4, 8, 8)
        args, kwargs = ((latents,), {}) if call == "positional" else ((), {call: latents})
        state._reset(None, args, kwargs)
        assert state.split == split


def test_conditional_cfg_steers_the_prompt_encoding_only(sd_pipe):
    steering = actsteer.fit(sd_pipe, source=SOURCE, target=TARGET, modules="text-encoder",
                            mode=Denoising.of(**RUN), progress=False)  # fmt: skip
    plain = first_outputs(sd_pipe, "text_encoder", SOURCE[:2])
    steered = first_outputs(sd_pipe, "text_encoder", SOURCE[:2], steering)
    both = first_outputs(sd_pipe, "text_encoder", SOURCE[:2], steering, guidance="both")
    assert len(plain) == len(steered) == 2, "prompts, then negative prompts"
    assert (steered[0] - plain[0]).abs().max() > 1e-4
    assert torch.equal(steered[1], plain[1])
    assert (both[1] - plain[1]).abs().max() > 1e-4


def test_scalar_strength_equals_per_row_strength(sd_pipe, sd_steering):
    per_row = images(sd_pipe, SOURCE[:2], [0.7], sd_steering)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.inference_mode(), sd_steering.applied(sd_pipe, 0.7):
        scalar = sd_pipe(SOURCE[:2], num_inference_steps=4, guidance_scale=4.0, height=8,
                         width=8, generator=gens, output_type="np").images  # fmt: skip
    np.testing.assert_allclose(per_row[:, 0], scalar, atol=1e-5)


def test_artifact_round_trip(sd_pipe, sd_steering, tmp_path):
    loaded = Steering.load(sd_steering.save(tmp_path / "neg.safetensors"))
    assert loaded.modules == sd_steering.modules
    np.testing.assert_array_equal(
        images(sd_pipe, SOURCE[:1], [1.0], loaded), images(sd_pipe, SOURCE[:1], [1.0], sd_steering)
    )


def test_clear_errors(sd_pipe, smol, neutral, football):
    with pytest.raises(ActSteerError, match="preset 'post-attn-ln' does not apply"):
        actsteer.fit(sd_pipe, source=SOURCE, target=TARGET, modules="post-attn-ln")
    with pytest.raises(ActSteerError, match="matches no module"):
        actsteer.fit(sd_pipe, source=SOURCE, target=TARGET, modules=r"transformer\.blocks\.\d+")
    model, tok = smol
    lm_steering = actsteer.fit(model, tok, neutral[:4], football[:4], progress=False)
    with pytest.raises(ActSteerError, match="which this model does not have"):
        lm_steering.attach(sd_pipe)


def test_cli_fits_and_renders_a_grid(sd_pipe, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from actsteer import cli

    folder = tmp_path / "pipe"
    sd_pipe.save_pretrained(folder)
    (tmp_path / "a.txt").write_text("\n".join(SOURCE))
    (tmp_path / "b.txt").write_text("\n".join(TARGET))
    runner = CliRunner()
    common = ["--pipeline", str(folder), "--denoising-steps", "2", "--size", "8"]
    fitted = runner.invoke(
        cli.app,
        ["fit", *common, "--source", str(tmp_path / "a.txt"), "--target", str(tmp_path / "b.txt")]
        + ["--modules", "unet-norms", "-o", str(tmp_path / "neg.safetensors")],
    )
    assert fitted.exit_code == 0, fitted.output
    rendered = runner.invoke(
        cli.app,
        ["generate-image", *common, "--steering", str(tmp_path / "neg.safetensors")]
        + ["--strength", "0", "0.5", "1", "-p", SOURCE[0], "-p", SOURCE[1]]
        + ["-o", str(tmp_path / "grid.png")],
    )
    assert rendered.exit_code == 0, rendered.output
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (220 + 3 * 8, 24 + 2 * 8)
    both = runner.invoke(
        cli.app,
        ["generate-image", *common, "--steering", str(tmp_path / "neg.safetensors")]
        + ["--strength", "0", "0.5", "1", "-p", SOURCE[0], "-p", SOURCE[1], "--cfg", "both"]
        + ["-o", str(tmp_path / "both.png")],
    )
    assert both.exit_code == 0, both.output
    conditional, halves = (
        np.asarray(grid.convert("RGB")),
        np.asarray(Image.open(tmp_path / "both.png").convert("RGB")),
    )
    assert np.array_equal(conditional[:, 220:228], halves[:, 220:228]), "λ = 0 columns agree"
    assert not np.array_equal(conditional, halves), "--cfg both steers the other half too"


@pytest.mark.parametrize("channels, side", [(8, 4), (64, 40)])  # stored over H×W, or broadcast
@pytest.mark.parametrize("support", ["q0-100", "all"])
def test_per_channel_hook_equals_the_reference_map(channels, side, support):
    from actsteer.maps import AffineMap, support_bounds

    g = torch.Generator().manual_seed(channels)
    amap = AffineMap(torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g))
    amap.bounds = support_bounds(torch.randn(100, channels, generator=g))
    conv = torch.nn.Identity()
    steering = Steering({"": amap})
    a = torch.randn(3, channels, side, side, generator=g) * 1.5
    for strength in (0.6, torch.tensor([0.0, 0.5, 1.0])):
        with torch.inference_mode(), steering.applied(conv, strength, support):
            hooked = conv(a)
        lam = strength.view(-1, 1, 1, 1) if isinstance(strength, torch.Tensor) else strength
        expected = amap(a.movedim(1, -1), lam, support).movedim(-1, 1)
        torch.testing.assert_close(hooked, expected, rtol=1e-6, atol=1e-6)


def test_folding_into_unet_norms_equals_hooks_on_both_halves(sd_pipe, sd_steering):
    """GroupNorm and LayerNorm maps fold into γ and δ: the folded pipeline renders what the
    hooks render with guidance="both", with no hooks."""
    import copy

    folded = sd_steering.fold(copy.deepcopy(sd_pipe), strength=0.7, support="all")
    kinds = {type(sd_pipe.components["unet"].get_submodule(n.split(".", 1)[1])).__name__
             for n in sd_steering.maps}  # fmt: skip
    assert {"GroupNorm", "LayerNorm"} <= kinds

    def render(pipe) -> np.ndarray:
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(SOURCE[:2], num_inference_steps=4, guidance_scale=4.0, height=8, width=8,
                    generator=gens, output_type="np").images  # fmt: skip

    with torch.inference_mode():
        plain = render(sd_pipe)
        with sd_steering.applied(sd_pipe, 0.7, "all", guidance="both"):
            hooked = render(sd_pipe)
        without_hooks = render(folded)
    assert np.abs(hooked - plain).max() > 1e-3
    np.testing.assert_allclose(without_hooks, hooked, atol=1e-4)
    assert not any(m._forward_hooks for m in folded.unet.modules())
