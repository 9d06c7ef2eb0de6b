"""Tests for toy_world.py: the checker against drawn scenes, the judge on hand-made pairs, a pretraining run at a tiny
budget, the cache (hit, miss, damaged), and one RL step of pref_grpo with the toy judge. Never touches the real cache:
every model goes to a temporary folder through PREF_GRPO_CACHE."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import pref_grpo as pg
import toy_world as tw

HERE = Path(__file__).resolve().parent
TINY = tw.Settings(scenes=64, vae_steps=2, flux_steps=2, batch_size=8, vae_batch_size=8)


# ---------------------------------------------------------------------------------------------------------------------
# The world and its checker
# ---------------------------------------------------------------------------------------------------------------------
def picture(*boxes, colour="red"):
    """A hand-made scene: filled rectangles (x0, y0, width, height) of one colour, or (x0, y0, w, h, colour)."""
    image = Image.new("RGB", (32, 32), tw.BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x0, y0, w, h, *c in boxes:
        draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=tw.COLOURS[c[0] if c else colour])
    return image


def test_prompt_sets_are_disjoint_parse_and_share_one_vocabulary():
    n = len(tw.NUMBERS)  # 4 colours x 2 shapes x (anywhere + 4 sides) prompts per count; held out per count: 1 of the
    assert len(tw.all_prompts()) == 40 * n and len(tw.EVAL_PROMPTS) == 7 * n  # 8 placed anywhere, 6 of the 32 sided
    assert not set(tw.TRAIN_PROMPTS) & set(tw.EVAL_PROMPTS)
    assert sorted(tw.TRAIN_PROMPTS + tw.EVAL_PROMPTS) == sorted(tw.all_prompts())
    for p in tw.all_prompts():
        assert tw.prompt_text(tw.parse_prompt(p)) == p
    assert tw.parse_prompt("Two  GREEN bars at the bottom") == tw.Spec("green", "bar", 2, "bottom")
    train_words = {w for p in tw.TRAIN_PROMPTS for w in p.split()}
    assert {w for p in tw.EVAL_PROMPTS for w in p.split()} <= train_words <= set(tw.WORDS)
    # every kind of requirement and every count is held out somewhere
    assert {k for p in tw.EVAL_PROMPTS for k in tw.parse_prompt(p).kinds} == set(tw.KINDS)
    assert {tw.parse_prompt(p).count for p in tw.EVAL_PROMPTS} == set(tw.NUMBERS.values())
    for bad in ["a purple square", "a red squares", "two red square", "a red square on the top", "red square"]:
        with pytest.raises(ValueError):
            tw.parse_prompt(bad)


def test_checker_is_right_on_every_drawn_scene():
    for seed, prompt in enumerate(tw.all_prompts() * 2):
        assert tw.correct(prompt, tw.draw_scene(prompt, seed)), (prompt, seed)


def test_checker_fails_exactly_the_broken_requirement():
    square = picture((2, 10, 10, 10))  # a red square on the left
    assert tw.check("a red square on the left", square) == {"colour": True, "shape": True, "count": True, "side": True}
    assert tw.check("a blue square", square) == {"colour": False, "shape": True, "count": True}
    assert tw.check("a red bar", square) == {"colour": True, "shape": False, "count": True}
    assert tw.check("two red squares", square) == {"colour": True, "shape": True, "count": False}
    assert tw.check("a red square at the bottom", square)["side"] is False
    bars = picture((2, 2, 12, 3), (18, 20, 12, 3))
    assert tw.check("two red bars", bars) == {"colour": True, "shape": True, "count": True}
    assert tw.check("two red bars on the left", bars)["side"] is False  # one of them is on the right
    assert tw.check("a red bar", bars)["count"] is False
    touching = picture((2, 2, 10, 3), (2, 5, 10, 3))  # two bars touching: one 10 x 6 region, read as a square
    assert tw.check("two red bars", touching) == {"colour": True, "shape": False, "count": False}
    speck = picture((2, 10, 10, 10), (25, 25, 2, 2, "blue"))  # a speck is not an object
    assert tw.check("a red square", speck) == {"colour": True, "shape": True, "count": True}
    blank = Image.new("RGB", (32, 32), tw.BACKGROUND)
    assert not any(tw.check("a yellow bar at the top", blank).values())


def test_margin_by_hand():
    # a 12 x 3 bar, centre x 7.5: aspect 4 is one octave past 2 (1), all pixels red (1) and in objects (1), 8 px past
    # the middle (1)
    assert tw.grade_scene("a red bar on the left", picture((2, 5, 12, 3)))[1] == 1.0
    # an 8 x 6 box read as a square: aspect 4/3, log2(2 / (4/3)) = 0.585 octaves below 2; a 2-pixel blue speck:
    # 48 of 50 foreground pixels red and in objects; centre y 12.5 is 3 px above the middle (15.5): 3 / 8
    met, margin = tw.grade_scene("a red square at the top", picture((4, 10, 8, 6), (25, 25, 2, 1, "blue")))
    assert all(met.values())
    assert margin == pytest.approx((48 / 50 + 48 / 50 + math.log2(1.5) + 3 / 8) / 4)
    # two bars: aspects 3 (log2 1.5) and 2 (on the threshold: a bar, margin 0)
    met, margin = tw.grade_scene("two green bars", picture((1, 1, 9, 3), (1, 20, 6, 3), colour="green"))
    assert met == {"colour": True, "shape": True, "count": True}
    assert margin == pytest.approx((1 + 1 + math.log2(1.5) + 0) / 4)
    # nothing drawn: every margin 0
    assert tw.grade_scene("a red bar at the top", Image.new("RGB", (32, 32), tw.BACKGROUND)) == (
        {"colour": False, "shape": False, "count": False, "side": False}, pytest.approx(1 / 4))


def test_accuracy_and_grade_count_each_kind_over_the_prompts_that_require_it():
    prompts = ["a red square on the left", "a red square", "two blue squares"]
    images = [picture((20, 10, 10, 10)), picture((2, 2, 10, 10)), picture((2, 2, 10, 10), colour="blue")]
    acc = tw.accuracy(prompts, images)
    assert acc == {"colour": 1.0, "shape": 1.0, "count": pytest.approx(2 / 3), "side": 0.0, "all": pytest.approx(1 / 3)}
    assert tw.grade(prompts, images) == [
        {"checker_accuracy": 0.0, "checker_accuracy_colour": 1.0, "checker_accuracy_shape": 1.0,
         "checker_accuracy_count": 1.0, "checker_accuracy_side": 0.0},
        {"checker_accuracy": 1.0, "checker_accuracy_colour": 1.0, "checker_accuracy_shape": 1.0,
         "checker_accuracy_count": 1.0},
        {"checker_accuracy": 0.0, "checker_accuracy_colour": 1.0, "checker_accuracy_shape": 1.0,
         "checker_accuracy_count": 0.0}]
    assert next(iter(tw.grade(prompts, images)[0])) == "checker_accuracy"  # the first key frames before_after.png


def test_judge_ranks_by_requirements_then_margin_ties_exactly_and_is_symmetric():
    prompt = "two yellow bars"
    right = picture((2, 2, 12, 3), (2, 20, 12, 3), colour="yellow")        # all met, margin 1
    right_short = picture((2, 2, 6, 3), (2, 20, 12, 3), colour="yellow")   # all met, one bar on the threshold
    moved = picture((10, 4, 12, 3), (3, 25, 12, 3), colour="yellow")       # all met, margin 1: a tie with `right`
    one_wrong = picture((2, 2, 12, 3), colour="yellow")                    # count wrong only
    two_wrong = picture((2, 2, 8, 8), colour="yellow")                     # count and shape wrong
    blank = Image.new("RGB", (32, 32), tw.BACKGROUND)
    a = [right, right, right, one_wrong, blank, right_short, one_wrong]
    b = [one_wrong, right_short, moved, two_wrong, two_wrong, one_wrong, one_wrong.copy()]
    probs, info = tw.judge([prompt] * len(a), a, b)
    assert probs == [1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 0.5]
    reverse, _ = tw.judge([prompt] * len(a), b, a)
    assert [p + q for p, q in zip(probs, reverse)] == [1.0] * len(a)
    assert info["toy_all_correct"] == pytest.approx(3 / 7)  # distinct images: right, right_short, moved of 7


def test_scorer_orders_images_as_the_judge_does():
    prompt = "a red bar on the left"
    images = [picture((2, 5, 12, 3)), picture((2, 5, 6, 3)), picture((20, 5, 12, 3)), picture((2, 5, 8, 8))]
    scores, info = tw.scorer([prompt] * 4, images)
    assert scores[0] == 1.0 and scores[2] < scores[1] < scores[0] and scores[3] < scores[1]
    assert scores[2] == pytest.approx((3 + (1 + 1 + 1 + 0) / 4) / 5)
    assert info == {"toy_all_correct": 0.5, "toy_score": pytest.approx(sum(scores) / 4)}
    probs, _ = tw.judge([prompt] * 6, [images[i] for i in (0, 0, 0, 1, 1, 2)], [images[j] for j in (1, 2, 3, 2, 3, 3)])
    assert scores[2] == scores[3]  # side wrong vs shape wrong, equal margins: an exact tie for both
    assert probs == [0.5 if scores[i] == scores[j] else float(scores[i] > scores[j])
                     for i, j in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))] == [1.0] * 5 + [0.5]


def test_judge_plugs_into_the_trainers_group_judging():
    prompt = "a blue square"
    images = [picture((4, 4, 10, 10), colour="blue"), picture((4, 4, 10, 6), colour="blue"),
              picture((4, 4, 12, 3), colour="red")]
    pref, _ = pg.judge_groups(tw.judge, [prompt], images, 3)
    assert pg.win_rates(pref).tolist() == [[1.0, 0.5, 0.0]]


# ---------------------------------------------------------------------------------------------------------------------
# Pretraining and the cache
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    old = os.environ.get("PREF_GRPO_CACHE")
    os.environ["PREF_GRPO_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("PREF_GRPO_CACHE")
    else:
        os.environ["PREF_GRPO_CACHE"] = old


@pytest.fixture(scope="module")
def tiny_model(cache):
    return tw.pretrained_model(progress=False, settings=TINY)


def test_pretraining_smoke_loads_through_the_trainer_and_generates(tiny_model, cache):
    assert tiny_model.parent == cache and tiny_model.name.startswith("toy-world-")
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # the temporary folder was renamed away
    pipe = pg.load_pipeline(str(tiny_model), "cpu")
    assert type(pipe).__name__ == "FluxPipeline" and pipe.vae_scale_factor == 2
    images = pg.generate_images(pipe, ["a red square", "two blue bars on the left"], [0, 1], steps=2, resolution=32)
    assert [im.size for im in images] == [(32, 32)] * 2
    assert set(tw.accuracy(["a red square"], images[:1])) == {"colour", "shape", "count", "all"}


def test_saved_tokenizer_round_trips(tiny_model):
    pipe = pg.load_pipeline(str(tiny_model), "cpu")
    fresh = tw.toy_tokenizer()
    for prompt in ["two green bars at the bottom", "a yellow square", "a blue square on the left", ""]:
        assert pipe.tokenizer_2(prompt)["input_ids"] == fresh(prompt)["input_ids"]
        assert pipe.tokenizer(prompt)["input_ids"][-1] == 1  # ends with </s>, where CLIP pools
    assert pipe.tokenizer_2.model_max_length == fresh.model_max_length == 16


def test_cache_hit_does_not_retrain_and_a_settings_change_does(tiny_model, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("pretrain called")

    monkeypatch.setattr(tw, "pretrain", no_training)
    assert tw.pretrained_model(progress=False, settings=TINY) == tiny_model
    changed = tw.Settings(**{**TINY.__dict__, "flux_steps": 3})
    assert tw.model_folder(changed) != tiny_model
    with pytest.raises(AssertionError, match="pretrain called"):
        tw.pretrained_model(progress=False, settings=changed)


def test_cache_honours_xdg_when_no_override(monkeypatch, tmp_path):
    monkeypatch.delenv("PREF_GRPO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tw.model_folder(TINY).parent == tmp_path / "pref_grpo"


@pytest.mark.parametrize("damage", ["missing", "corrupt", "no-manifest"])
def test_damaged_cache_is_refused_with_one_line(tiny_model, tmp_path, damage):
    root = tmp_path / "cache"
    folder = root / tiny_model.name
    shutil.copytree(tiny_model, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "corrupt":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        (folder / tw.MANIFEST).unlink()
    code = f"import toy_world as tw; tw.pretrained_model(settings=tw.Settings(**{json.dumps(TINY.__dict__)}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                         env={**os.environ, "PREF_GRPO_CACHE": str(root)}, timeout=120)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(folder) in errors[0] and "delete" in errors[0]


@pytest.mark.parametrize("reward", ["pairwise", "pointwise"])
def test_python_pref_grpo_runs_the_demo_preset_with_the_toy_judge_and_checker(tiny_model, tmp_path, reward):
    # `python pref_grpo.py` as the README gives it (no --model: --preset toy_world:DEMO), with flags that make it short,
    # on the tiny model copied into the cache under the default settings' folder name
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model, cache / tw.model_folder().name)
    short = {"train_steps": 2, "group_size": 3, "prompts_per_step": 2, "sample_steps": 3, "eval_count": 2,
             "eval_seeds": 2, "eval_every": 1}
    run = subprocess.run([sys.executable, "pref_grpo.py", *(x for k, v in short.items() for x in (pg.flag(k), str(v))),
                          "--reward", reward, "--output-dir", str(tmp_path / "run")],
                         cwd=HERE, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PREF_GRPO_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "preset toy_world:DEMO" in run.stdout
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert {k: saved[k] for k in tw.DEMO} == {**tw.DEMO, **short}
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all("toy_all_correct" in m and "eval_checker_accuracy" in m for m in metrics)
    result = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert result["images"] == 4
    for key in ["checker_accuracy", *(f"checker_accuracy_{k}" for k in ("colour", "shape", "count"))]:
        assert 0 <= result[key + "_initial"] <= 1 and 0 <= result[key + "_final"] <= 1
    before = [Image.open(p) for p in sorted((tmp_path / "run" / "eval" / "before").glob("*.png"))]
    prompts = [p for p in tw.EVAL_PROMPTS[:2] for _ in range(2)]
    assert result["checker_accuracy_initial"] == tw.accuracy(prompts, before)["all"]  # the checker's own verdicts
    assert (tmp_path / "run" / "eval" / "before_after.png").exists()


def test_demo_preset_names_only_flags_and_the_worlds_own_functions():
    assert set(tw.DEMO) <= {f.name for f in dataclasses.fields(pg.Args)}
    for key in ("model", "prompts", "eval_prompts", "judge_fn", "scorer_fn", "eval_fn"):
        module, name = tw.DEMO[key].split(":")
        assert module == "toy_world" and hasattr(tw, name)
    assert tw.DEMO["eval_count"] >= len(tw.EVAL_PROMPTS) and len(tw.EVAL_PROMPTS) * tw.DEMO["eval_seeds"] >= 240


# ---------------------------------------------------------------------------------------------------------------------
# UniGenBench offline: toy prompts in its file format, the checker as its judge
# ---------------------------------------------------------------------------------------------------------------------
def test_unigenbench_judge_answers_in_the_official_format(tmp_path):
    import unigenbench as ugb

    prompts = ugb.load_prompts(tw.write_unigenbench_prompts(tmp_path / "p.jsonl"))
    assert len(prompts) == len(tw.EVAL_PROMPTS)
    sided = next(p for p in prompts if "on the left" in p.prompt)
    assert [c for c, _ in sided.checkpoints] == list(tw.CRITERIA.values())
    image = tw.draw_scene(sided.prompt, 0)
    wrong = tw.draw_scene(sided.prompt.replace("left", "right"), 0)
    replies = tw.unigenbench_judge([ugb.judge_prompt(sided)] * 2 + ["hello"], [image, wrong, image])
    assert ugb.parse_reply(replies[0], 4)[0] == [1, 1, 1, 1]
    assert ugb.parse_reply(replies[1], 4)[0] == [1, 1, 1, 0]
    assert "<score>" not in replies[2]


def test_unigenbench_generate_evaluate_report_on_toy_prompts(tiny_model, tmp_path, monkeypatch):
    import unigenbench as ugb

    monkeypatch.chdir(HERE)  # --judge-fn imports toy_world from the working directory
    prompts = tw.write_unigenbench_prompts(tmp_path / "toy.jsonl", tw.EVAL_PROMPTS[:3])
    ugb.main(["generate", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(tmp_path / "base"),
              "--resolution", "32", "--steps", "2", "--n", "2"])
    ugb.main(["evaluate", "--images", str(tmp_path / "base"), "--prompts", str(prompts), "--judge-fn",
              "toy_world:unigenbench_judge", "--n", "2"])
    records = ugb.load_result_records(tmp_path / "base" / "results.jsonl")
    assert len(records) == 6 and all(r["scores"] is not None and r["error"] is None for r in records)
    summary = ugb.report([str(tmp_path / "base" / "results.jsonl")])
    assert (tmp_path / "base" / "report.md").exists() and len(summary) == 1
