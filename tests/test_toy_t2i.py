"""The toy text-to-image world: deterministic data, captions that say what is drawn, detectors
that agree with the ground truth (tests/toy_t2i_world). No training here (see
benchmarks/toy_t2i/README.md)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.toy_t2i_world import dataset as ds
from tests.toy_t2i_world import measure


@pytest.fixture(scope="module")
def samples() -> list[ds.Sample]:
    return ds.make_dataset(600, seed=7)[2]


def test_deterministic_and_order_free():
    a = ds.make_sample(5, seed=3)
    b = ds.make_dataset(3, seed=3, start=4)[2][1]
    assert a.caption == b.caption
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8
    others = [ds.make_sample(i, seed=3).image for i in range(6, 12)]
    assert not any(np.array_equal(a.image, o) for o in others)
    assert ds.make_sample(5, seed=4).caption != a.caption or not np.array_equal(
        ds.make_sample(5, seed=4).image, a.image
    )


def test_caption_grammar():
    assert ds.caption_for("red", "circle", "blue") == "a red circle on a blue background"
    assert (
        ds.caption_for("red", "circle", "blue", pink=True)
        == "a red circle and a pink square on a blue background"
    )
    assert (
        ds.caption_for("red", "circle", "blue", negation=True, striped=True)
        == "a red circle on a blue background, striped style, no pink square"
    )
    with pytest.raises(ValueError):
        ds.caption_for("red", "circle", "blue", pink=True, negation=True)


def test_captions_say_what_is_drawn(samples):
    kinds = {"plain": 0, "pink": 0, "negation": 0, "second": 0, "striped": 0}
    for s in samples:
        words = s.caption.replace(",", " ,").split()
        assert s.caption.startswith(f"a {s.colour} {s.shape}")
        assert f"on a {s.background} background" in s.caption
        assert s.colour != s.background
        assert ("striped style" in s.caption) == s.striped
        assert s.caption.endswith(ds.NEGATION_SUFFIX) == s.negation
        assert ("pink square" in s.caption) == s.mentions_pink
        assert set(words) <= set(ds.vocabulary())
        if s.negation:
            assert s.pink  # the default config always draws what the negation mentions
            kinds["negation"] += 1
        elif s.pink:
            assert "and a pink square" in s.caption
            kinds["pink"] += 1
        elif s.second:
            assert f"and a {s.second[0]} {s.second[1]}" in s.caption
            kinds["second"] += 1
        else:
            kinds["plain"] += 1
        kinds["striped"] += s.striped
    # every kind of caption is well represented (probabilities 0.15, 0.15, 0.15, 0.55; 0.3)
    assert all(n > 50 for n in kinds.values()), kinds


def test_negation_probability_is_configurable():
    cfg = ds.Config(p_pink=0.0, p_negation=1.0, negation_shows_pink=0.0)
    s = ds.make_sample(0, config=cfg)
    assert s.negation and not s.pink and s.caption.endswith(ds.NEGATION_SUFFIX)


def test_detectors_agree_with_ground_truth(samples):
    report = measure.calibrate(samples)
    assert report["pink_accuracy"] == 1.0
    assert report["stripe_accuracy"] == 1.0
    assert report["pink_max_negative"] < measure.PINK_MIN_PIXELS <= report["pink_min_positive"]
    assert report["stripe_max_negative"] <= measure.STRIPE_THRESHOLD
    assert report["stripe_min_positive"] > measure.STRIPE_THRESHOLD
    assert report["background_accuracy"] == 1.0
    assert report["colour_accuracy"] == 1.0
    assert report["shape_accuracy"] >= 0.98


def test_stripe_score_rises_with_stripe_strength():
    rng = np.random.default_rng(0)
    plain, _ = ds.render("red", "circle", "blue", rng)
    striped = ds.stripe(plain, phase=3).astype(np.float32)
    scores = [
        measure.stripe_score(((1 - a) * plain + a * striped).round().astype(np.uint8))
        for a in np.linspace(0, 1, 6)
    ]
    assert scores[0] == pytest.approx(0.0, abs=1e-3)
    assert all(b > a for a, b in zip(scores, scores[1:], strict=False))


def test_pink_blends_and_edges_do_not_count():
    rng = np.random.default_rng(1)
    img, _ = ds.render("red", "square", "blue", rng)
    blurred = np.asarray(Image.fromarray(img).resize((16, 16)).resize((32, 32), Image.BILINEAR))
    assert measure.pink_pixels(blurred) == 0
    line = img.copy()
    line[10, :] = ds.COLOURS["pink"]  # a 1-pixel pink line is not a square
    assert not measure.has_pink(line)
    patch = img.copy()
    patch[2:8, 2:8] = ds.COLOURS["pink"]
    assert measure.has_pink(patch) and measure.has_pink(Image.fromarray(patch))


def test_kept():
    a = ds.make_sample(0, seed=1, config=ds.Config(p_pink=1.0))
    assert measure.kept(a.image, a.image) == {"background": True, "object": True, "both": True}
    rng = np.random.default_rng(0)
    other_bg, _ = ds.render(a.colour, a.shape, "black" if a.background != "black" else "blue", rng)
    assert not measure.kept(a.image, other_bg)["background"]
    without_pink, _ = ds.render(a.colour, a.shape, a.background, rng)
    assert measure.kept(a.image, without_pink)["both"]


def test_tokenizer_covers_every_caption(samples):
    from tests.toy_t2i_world.pipeline import MAX_TOKENS, build_tokenizer

    tok = build_tokenizer()
    longest = (
        ds.caption_for("white", "triangle", "black", second=("yellow", "circle"), striped=True)
        + ds.NEGATION_SUFFIX
    )
    for caption in [s.caption for s in samples] + [longest, ""]:
        ids = tok(caption).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids
        assert len(ids) <= MAX_TOKENS
    assert tok.eos_token_id != 2  # CLIPTextModel's legacy pooling would otherwise kick in


def test_grid_png(tmp_path):
    from tests.toy_t2i_world.figure import grid

    imgs = [s.image for s in ds.make_dataset(6, seed=2)[2]]
    path = grid([imgs[:3], imgs[3:]], ["row one", "row two"], ["a", "b", "c"], tmp_path / "g.png")
    with Image.open(path) as im:
        assert im.size[0] > 3 * 32 * 3 and im.size[1] > 2 * 32 * 3
