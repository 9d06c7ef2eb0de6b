"""Tests for benchmarks/pointwise_vs_pairwise.py: the toy judges' properties, and one tiny run of its entry point."""

import json

import numpy as np
import pytest
from PIL import Image

import pointwise_vs_pairwise as pvp
import pref_grpo as pg

PROMPT = "a red apple"


def flat(rgb) -> Image.Image:
    return Image.new("RGB", (16, 16), tuple(int(c) for c in rgb))


def checker(rgb, delta: int) -> Image.Image:
    """The mean colour `rgb`, with alternating pixels +-delta: more contrast, the same mean colour."""
    x = np.tile(np.array(rgb, dtype=float), (16, 16, 1))
    sign = np.where((np.indices((16, 16)).sum(0) % 2)[..., None] == 0, 1.0, -1.0)
    return Image.fromarray(np.clip(x + sign * delta, 0, 255).astype(np.uint8))


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def test_ground_truth_does_not_see_contrast_but_the_opinion_does():
    plain, contrasty = flat((180, 60, 60)), checker((180, 60, 60), 50)
    assert pg.colour_distance(PROMPT, plain) == pytest.approx(pg.colour_distance(PROMPT, contrasty))
    assert pvp.contrast(plain) == pytest.approx(0, abs=1e-12) and pvp.contrast(contrasty) == pytest.approx(50 / 255)
    gap = pvp.opinion(PROMPT, contrasty, 1.0, "contrast") - pvp.opinion(PROMPT, plain, 1.0, "contrast")
    assert gap == pytest.approx(50 / 255)
    assert pvp.opinion(PROMPT, contrasty, 0.0, "contrast") == pytest.approx(pvp.opinion(PROMPT, plain, 0.0, "contrast"))


def test_brightness_flaw_at_weight_one_rates_yellow_as_high_as_red():
    red, yellow = flat((255, 0, 0)), flat((255, 255, 0))
    assert pvp.brightness(red) == pytest.approx(0.299) and pvp.brightness(yellow) == pytest.approx(0.886)
    assert pg.colour_distance(PROMPT, red) == 0 and pg.colour_distance(PROMPT, yellow) == pytest.approx(1)
    assert pvp.opinion(PROMPT, yellow, 1.0, "brightness") == pytest.approx(pvp.opinion(PROMPT, red, 1.0, "brightness"),
                                                                           abs=0.02)
    assert pvp.opinion(PROMPT, yellow, 0.5, "brightness") < pvp.opinion(PROMPT, red, 0.5, "brightness") - 0.2


def test_pointwise_scores_lie_in_the_narrow_band_and_repeat_for_the_same_image():
    scorer = pvp.make_pointwise_scorer()
    images = random_images(20) + [flat((255, 0, 0)), flat((0, 255, 255)), checker((128, 128, 128), 127)]
    scores, info = scorer([PROMPT] * len(images), images)
    lo, hi = pvp.SCORE_BAND
    assert all(lo <= s <= hi for s in scores) and hi - lo <= 0.1
    assert scorer([PROMPT] * 3, images[:3])[0] == scores[:3]  # a temperature-0 scorer: same image, same score
    assert {"toy_opinion", "toy_flaw"} <= set(info)


@pytest.mark.parametrize("flaw, top", [("brightness", 2.0), ("contrast", 1.5)])
def test_pointwise_score_is_the_opinion_plus_its_noise_squeezed_into_the_band(flaw, top):
    scorer = pvp.make_pointwise_scorer(flaw_weight=1.0, noise=0.01, band=(0.25, 0.35), flaw=flaw)
    noiseless = pvp.make_pointwise_scorer(flaw_weight=1.0, noise=0.0, band=(0.25, 0.35), flaw=flaw)
    images = random_images(200, seed=1)
    noisy, _ = scorer([PROMPT] * 200, images)
    clean, _ = noiseless([PROMPT] * 200, images)
    q = [pvp.opinion(PROMPT, im, 1.0, flaw) for im in images]
    assert clean == pytest.approx([0.25 + 0.1 * x / top for x in q])
    errors = (np.array(noisy) - np.array(clean)) * top / 0.1  # back in units of q
    assert errors.std() == pytest.approx(0.01, rel=0.2) and abs(errors.mean()) < 0.003


@pytest.mark.parametrize("flaw, worse, better", [
    ("brightness", (255, 0, 60), (255, 60, 0)),  # as far from red, but green is brighter than blue
    ("contrast", flat((150, 90, 90)), checker((150, 90, 90), 60)),  # the same colour, more contrast
])
def test_both_judges_share_the_flaw_and_its_weight(flaw, worse, better):
    scorer, judge = pvp.make_pointwise_scorer(flaw=flaw), pvp.make_pairwise_judge(flaw=flaw)
    assert scorer.flaw_weight == judge.flaw_weight == pvp.FLAW_WEIGHT > 0 and scorer.flaw == judge.flaw == flaw
    worse, better = (flat(x) if isinstance(x, tuple) else x for x in (worse, better))
    assert pg.colour_distance(PROMPT, worse) == pytest.approx(pg.colour_distance(PROMPT, better), abs=1e-3)
    (s_worse, s_better), _ = scorer([PROMPT] * 2, [worse, better])
    assert s_better > s_worse  # the gaps are far above the noise
    assert judge([PROMPT], [better], [worse])[0] == [1.0]
    redder, greyer = flat((200, 50, 50)), flat((130, 100, 100))  # the real quality still counts
    assert judge([PROMPT], [redder], [greyer])[0] == [1.0]
    (s_redder, s_greyer), _ = scorer([PROMPT] * 2, [redder, greyer])
    assert s_redder > s_greyer


def test_default_judges_share_one_flaw():
    assert pvp.make_pointwise_scorer().flaw == pvp.make_pairwise_judge().flaw == pvp.FLAW


def test_swapping_a_and_b_gives_one_minus_p_and_a_noiseless_judge_follows_the_opinion():
    judge, exact = pvp.make_pairwise_judge(noise=0.05), pvp.make_pairwise_judge(noise=0.0)
    a, b = random_images(30, seed=2), random_images(30, seed=3)
    p_ab, _ = judge([PROMPT] * 30, a, b)
    p_ba, _ = judge([PROMPT] * 30, b, a)
    assert [x + y for x, y in zip(p_ab, p_ba)] == [1.0] * 30
    assert judge([PROMPT], [a[0]], [a[0]])[0] == [0.5]
    q_gap = [pvp.opinion(PROMPT, x) - pvp.opinion(PROMPT, y) for x, y in zip(a, b)]
    assert exact([PROMPT] * 30, a, b)[0] == [float(g > 0) for g in q_gap]
    assert p_ab != exact([PROMPT] * 30, a, b)[0]  # with noise 0.05 some close pairs flip


def test_pairwise_noise_is_fresh_for_every_pair_but_fixed_for_a_pair():
    x, y, z = random_images(3, seed=4)
    ex_y, _ = pvp.comparison_noise(PROMPT, x, y)
    ex_z, _ = pvp.comparison_noise(PROMPT, x, z)
    assert ex_y != ex_z
    assert pvp.comparison_noise(PROMPT, y, x) == pvp.comparison_noise(PROMPT, x, y)[::-1]


def test_smooth_is_a_trailing_moving_average():
    assert pvp.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2) == pytest.approx([1.0, 2.0, 4.0, 6.0])


def test_entry_point_two_steps_writes_the_plot_and_summary(tmp_path):
    plot = tmp_path / "plot.png"
    summary = pvp.main(["--seeds", "1", "--steps", "2", "--jobs", "1", "--smooth", "2",
                        "--out", str(tmp_path / "runs"), "--plot", str(plot)])
    assert set(summary["rewards"]) == {"pairwise", "pointwise"}
    assert json.loads((tmp_path / "runs" / "summary.json").read_text())["rewards"].keys() == summary["rewards"].keys()
    with Image.open(plot) as im:
        assert im.width == 1200 and im.height > 600
    for reward in ("pairwise", "pointwise"):
        rows = (tmp_path / "runs" / f"{reward}-seed0" / "metrics.jsonl").read_text().splitlines()
        logged = set(json.loads(rows[0]))
        assert len(rows) == 2 and {"toy_opinion", "toy_flaw", "toy_flipped", "colour_distance"} <= logged
    pointwise_std = summary["rewards"]["pointwise"]["train_reward_group_std_last2"]["mean"]
    pairwise_std = summary["rewards"]["pairwise"]["train_reward_group_std_last2"]["mean"]
    assert pointwise_std < 0.01 < pairwise_std  # the narrow band vs win rates spread over [0, 1]


def test_flipped_share_is_zero_without_noise_and_about_half_with_overwhelming_noise():
    images, prompts = random_images(16, seed=5), [PROMPT] * 16
    assert pvp.make_pointwise_scorer(noise=0.0, group_size=8)(prompts, images)[1]["toy_flipped"] == 0
    assert pvp.make_pairwise_judge(noise=0.0)(prompts[:8], images[:8], images[8:])[1]["toy_flipped"] == 0
    noisy = pvp.make_pointwise_scorer(noise=100.0, band=(-1e9, 1e9), group_size=8)(prompts, images)[1]
    assert 0.2 < noisy["toy_flipped"] < 0.8
