"""Tests for benchmarks/pointwise_vs_pairwise.py: the number it adds to the toy rewards, and one tiny run of its entry
point on a tiny pretrained toy model."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

import pointwise_vs_pairwise as pvp
import pref_grpo as pg
import toy_world as tw


def bars(*widths, colour="red") -> Image.Image:
    """Bars 3 px high, one above the other, of these widths (width 0: nothing drawn in that slot)."""
    image = Image.new("RGB", (32, 32), tw.BACKGROUND)
    draw = ImageDraw.Draw(image)
    for k, w in enumerate(widths):
        if w:
            draw.rectangle((2, 2 + 8 * k, 2 + w - 1, 4 + 8 * k), fill=tw.COLOURS[colour])
    return image


def test_tied_groups_counts_groups_whose_images_meet_as_many_requirements():
    graded = [({"a": True, "b": False}, 0.2), ({"a": False, "b": True}, 0.9),  # 1 and 1: tied
              ({"a": True, "b": True}, 0.5), ({"a": False, "b": True}, 0.5)]  # 2 and 1
    assert pvp.tied_groups(graded, 2) == 0.5
    assert pvp.tied_groups(graded, 4) == 0.0


@pytest.mark.parametrize("reward", ["pairwise", "pointwise"])
def test_tracked_rewards_are_the_worlds_own_plus_tied_groups(reward):
    prompt, G = "two red bars", 3
    tied = [bars(12, 12), bars(12, 8), bars(12, 6)]     # all meet every requirement: tied, margins differ
    mixed = [bars(12, 12), bars(12), bars(12, 0, 12, 12)]  # 4, 3 (count), 3 (count) requirements met
    images, prompts = tied + mixed, [prompt, prompt]
    fn = pvp.tracked(reward, G)
    if reward == "pairwise":
        pref, info = pg.judge_groups(fn, prompts, images, G)
        own, _ = pg.judge_groups(tw.judge, prompts, images, G)
        assert (pref == own).all()
    else:
        scores, info = pg.score_groups(fn, prompts, images, G)
        assert scores.flatten().tolist() == pytest.approx(tw.scorer([prompt] * 6, images)[0])  # float32 there
    assert info["toy_tied_groups"] == 0.5
    assert info["toy_all_correct"] == pytest.approx(4 / 6)


def test_smooth_is_a_trailing_moving_average():
    assert pvp.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2) == pytest.approx([1.0, 2.0, 4.0, 6.0])


def test_entry_point_writes_the_plot_and_summary(tmp_path, monkeypatch):
    # the tiny toy model (seconds of pretraining), in a cache under the default settings' folder name
    monkeypatch.setenv("PREF_GRPO_CACHE", str(tmp_path / "tiny"))
    tiny = tw.pretrained_model(progress=False, settings=tw.Settings(scenes=64, vae_steps=2, flux_steps=2,
                                                                     batch_size=8, vae_batch_size=8))
    shutil.copytree(tiny, tmp_path / "cache" / tw.model_folder().name)
    monkeypatch.setenv("PREF_GRPO_CACHE", str(tmp_path / "cache"))
    # the demo's module:name plug-ins import from the repository root
    monkeypatch.chdir(pvp.Path(pvp.__file__).resolve().parent.parent)
    plot = tmp_path / "plot.png"
    summary = pvp.main(["--seeds", "1", "--smooth", "2", "--eval-every", "1", "--out", str(tmp_path / "runs"),
                        "--plot", str(plot), "--train-steps", "2", "--group-size", "3", "--sample-steps", "3",
                        "--eval-seeds", "1"])
    assert set(summary["rewards"]) == {"pairwise", "pointwise"}
    assert json.loads((tmp_path / "runs" / "summary.json").read_text())["rewards"].keys() == summary["rewards"].keys()
    with Image.open(plot) as im:
        assert im.width == 1200 and im.height > 600
    for reward in ("pairwise", "pointwise"):
        run = tmp_path / "runs" / f"{reward}-seed0"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all({"toy_all_correct", "toy_score", "toy_tied_groups",
                                       "eval_checker_accuracy"} <= set(r) for r in rows)
        assert json.loads((run / "args.json").read_text())["reward"] == reward
        result = json.loads((run / "eval" / "eval.json").read_text())
        assert summary["rewards"][reward]["checker_accuracy_final"]["seeds"] == [result["checker_accuracy_final"]]
