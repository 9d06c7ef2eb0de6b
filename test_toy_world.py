"""Tests for toy_world.py: the checker against drawn scenes, the judge on hand-made pairs, a pretraining run at a tiny
budget, the cache (hit, miss, damaged), and one RL step of pref_grpo with the toy judge. Never touches the real cache:
every model goes to a temporary folder through PREF_GRPO_CACHE."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import pref_grpo as pg
import toy_world as tw

HERE = Path(__file__).resolve().parent
TINY = tw.Settings(scenes=64, vae_steps=2, flux_steps=2, batch_size=8, vae_batch_size=8)


# ---------------------------------------------------------------------------------------------------------------------
# The world and its checker
# ---------------------------------------------------------------------------------------------------------------------
def test_prompt_sets_are_disjoint_parse_and_share_one_vocabulary():
    assert not set(tw.TRAIN_PROMPTS) & set(tw.EVAL_PROMPTS)
    assert sorted(tw.TRAIN_PROMPTS + tw.EVAL_PROMPTS) == sorted(tw.all_prompts())
    for p in tw.all_prompts():
        assert tw.prompt_text(tw.parse_prompt(p)) == p
    train_words = {w for p in tw.TRAIN_PROMPTS for w in p.split()}
    assert {w for p in tw.EVAL_PROMPTS for w in p.split()} <= train_words <= set(tw.WORDS)
    # every kind of requirement is held out somewhere
    assert {k for p in tw.EVAL_PROMPTS for k in tw.parse_prompt(p).kinds} == set(tw.KINDS)
    with pytest.raises(ValueError):
        tw.parse_prompt("a purple circle")


def test_checker_is_right_on_drawn_scenes():
    prompts = tw.all_prompts()
    results = [tw.correct(p, tw.draw_scene(p, seed)) for seed in range(300) for p in [prompts[seed % len(prompts)]]]
    assert sum(results) / len(results) >= 0.97


def test_checker_fails_exactly_the_broken_requirement():
    circle = tw.draw_scene("a red circle on the left", 3)
    assert tw.check("a blue circle", circle) == {"colour": False, "shape": True, "count": True}
    assert tw.check("a red square", circle) == {"colour": True, "shape": False, "count": True}
    assert tw.check("two red circles", circle) == {"colour": True, "shape": True, "count": False}
    assert tw.check("a red circle on the right", circle)["side"] is False
    pair = tw.draw_scene("a red circle and a green square", 5)
    assert tw.check("a red square and a green circle", pair)["shape"] is False  # shapes bound to their colours
    assert tw.correct("a green square and a red circle", pair)
    blank = Image.new("RGB", (32, 32), tw.BACKGROUND)
    assert not any(tw.check("a yellow triangle on the left", blank).values())


def test_accuracy_counts_each_kind_over_the_prompts_that_require_it():
    prompts = ["a red circle on the left", "a red circle", "two blue squares"]
    images = [tw.draw_scene("a red circle on the right", 0), tw.draw_scene("a red circle", 1),
              tw.draw_scene("a blue square", 2)]
    acc = tw.accuracy(prompts, images)
    assert acc == {"colour": 1.0, "shape": 1.0, "count": pytest.approx(2 / 3), "side": 0.0, "all": pytest.approx(1 / 3)}


def test_judge_prefers_the_image_meeting_more_requirements_ties_equal_and_is_symmetric():
    prompt = "two yellow triangles"
    right = tw.draw_scene(prompt, 0)
    one_wrong = tw.draw_scene("a yellow triangle", 1)  # count wrong only
    two_wrong = tw.draw_scene("a yellow square", 2)    # count and shape wrong
    other_right = tw.draw_scene(prompt, 7)
    blank = Image.new("RGB", (32, 32), tw.BACKGROUND)
    a = [right, one_wrong, right, right, blank, one_wrong]
    b = [one_wrong, two_wrong, other_right, right, two_wrong, one_wrong.copy()]
    probs, info = tw.judge([prompt] * len(a), a, b)
    assert probs == [1.0, 1.0, 0.5, 0.5, 0.0, 0.5]
    reverse, _ = tw.judge([prompt] * len(a), b, a)
    assert [p + q for p, q in zip(probs, reverse)] == [1.0] * len(a)
    assert all(isinstance(v, (int, float)) for v in info.values())


def test_scorer_is_the_share_of_requirements_met():
    images = [tw.draw_scene("a red circle on the left", 0), tw.draw_scene("a red circle", 1)]
    scores, info = tw.scorer(["a red circle on the left", "a blue circle"], images)
    assert scores == [1.0, pytest.approx(2 / 3)] and info == {"toy_all_correct": 0.5}


def test_judge_plugs_into_the_trainers_group_judging():
    prompt = "a blue square"
    images = [tw.draw_scene(prompt, 0), tw.draw_scene("a blue circle", 1), tw.draw_scene("a red circle", 2)]
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
    images = pg.generate_images(pipe, ["a red circle", "two blue squares"], [0, 1], steps=2, resolution=32)
    assert [im.size for im in images] == [(32, 32)] * 2
    assert set(tw.accuracy(["a red circle"], images[:1])) == {"colour", "shape", "count", "all"}


def test_saved_tokenizer_round_trips(tiny_model):
    pipe = pg.load_pipeline(str(tiny_model), "cpu")
    fresh = tw.toy_tokenizer()
    for prompt in ["a red circle and a green square", "two yellow triangles", "a blue square on the left", ""]:
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


def test_one_rl_step_of_the_trainer_with_the_toy_judge(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(tw.TRAIN_PROMPTS) + "\n")
    argv = tw.demo_argv(tiny_model, prompts, train_steps=1, group_size=2, prompts_per_step=1, sample_steps=2,
                        eval_seeds=0)
    args = pg.parse_args(argv + ["--output-dir", str(tmp_path / "run")])
    assert args.resolution == 32 and args.lr == tw.DEMO["lr"] and args.eta == tw.DEMO["eta"]
    pg.train(args, judge=tw.judge)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and "toy_all_correct" in metrics[0]


# ---------------------------------------------------------------------------------------------------------------------
# UniGenBench offline: toy prompts in its file format, the checker as its judge
# ---------------------------------------------------------------------------------------------------------------------
def test_unigenbench_judge_answers_in_the_official_format(tmp_path):
    import unigenbench as ugb

    prompts = ugb.load_prompts(tw.write_unigenbench_prompts(tmp_path / "p.jsonl"))
    assert len(prompts) == len(tw.EVAL_PROMPTS)
    sided = next(p for p in prompts if "on the" in p.prompt)
    assert [c for c, _ in sided.checkpoints] == list(tw.CRITERIA.values())
    image = tw.draw_scene(sided.prompt, 0)
    wrong = tw.draw_scene(sided.prompt.replace("left", "right") if "left" in sided.prompt else
                          sided.prompt.replace("right", "left"), 0)
    (reply, error, _), (reply2, _, _) = tw.unigenbench_judge([(ugb.judge_prompt(sided), image),
                                                              (ugb.judge_prompt(sided), wrong)])
    assert error is None and ugb.parse_reply(reply, 4)[0] == [1, 1, 1, 1]
    assert ugb.parse_reply(reply2, 4)[0] == [1, 1, 1, 0]


def test_unigenbench_generate_evaluate_report_on_toy_prompts(tiny_model, tmp_path):
    import unigenbench as ugb

    prompts = tw.write_unigenbench_prompts(tmp_path / "toy.jsonl", tw.EVAL_PROMPTS[:3])
    ugb.main(["generate", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(tmp_path / "base"),
              "--resolution", "32", "--steps", "2", "--n", "2"])
    ugb.main(["evaluate", "--images", str(tmp_path / "base"), "--prompts", str(prompts), "--judge-local", "toy",
              "--n", "2"])
    records = ugb.load_result_records(tmp_path / "base" / "results.jsonl")
    assert len(records) == 6 and all(r["scores"] is not None and r["error"] is None for r in records)
    summary = ugb.report([str(tmp_path / "base" / "results.jsonl")])
    assert (tmp_path / "base" / "report.md").exists() and len(summary) == 1
