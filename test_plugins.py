"""Your own reward, metrics, prompts, preset and model plug into pref_grpo.py by name (`module:function`), with the
file copied alone into a folder of yours; the method file knows nothing of the demo; its loop reads on one screen."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pref_grpo as pg
from conftest import one_line_error

ROOT = Path(__file__).resolve().parent
FAST = ["--resolution", "32", "--sample-steps", "3", "--group-size", "3", "--prompts-per-step", "2",
        "--eval-seeds", "0", "--max-sequence-length", "16"]

MY_REWARDS = '''
import json, os, signal
from PIL import ImageStat

def brightness(image):
    return sum(ImageStat.Stat(image.convert("RGB")).mean) / 765

def log(kind, n):
    with open(os.environ["CALLS"], "a") as f:
        f.write(json.dumps({"kind": kind, "n": n}) + "\\n")

def prefer(prompts, images_a, images_b):  # the brighter image wins
    log("judge", len(prompts))
    return [0.5 if brightness(a) == brightness(b) else float(brightness(a) > brightness(b))
            for a, b in zip(images_a, images_b)]

def score(prompts, images):  # pointwise: brightness, and a number of my own to log each round
    log("scorer", len(prompts))
    return [brightness(im) for im in images], {"my_mean_brightness": sum(map(brightness, images)) / len(images)}

def grade(prompts, images):  # held-out metrics: one dict per image
    return [{"bright": float(brightness(im) > 0.5), "brightness": brightness(im)} for im in images]

def one_short(prompts, images_a, images_b):
    return [1.0] * (len(prompts) - 1)

def out_of_range(prompts, images_a, images_b):
    return [2.0] * len(prompts)

def silent(prompts, images_a, images_b):
    return [None] * len(prompts)

def swallows_ctrl_c(prompts, images_a, images_b):  # a Ctrl-C lands in code that drops it (a finalizer, say)
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        pass
    return prefer(prompts, images_a, images_b)

PROMPTS = ["a lamp", "a candle", "the sun"]

def build():  # a model builder: returns what --model would take
    return "tiny"

RECIPE = dict(model="my_rewards:build", prompts="my_rewards:PROMPTS", judge_fn="my_rewards:prefer", resolution=32,
              sample_steps=3, group_size=3, prompts_per_step=2, eval_seeds=0, max_sequence_length=16, train_steps=2)
NOT_A_RECIPE = dict(learning_rate=1.0)
'''


@pytest.fixture
def alone(tmp_path):
    """An empty folder of a user's holding pref_grpo.py alone and a module of their own rewards."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(ROOT / "pref_grpo.py", folder / "pref_grpo.py")
    (folder / "my_rewards.py").write_text(MY_REWARDS)
    return folder


def run(folder, *flags, timeout=600):
    env = {**__import__("os").environ, "CALLS": str(folder / "calls.jsonl")}
    return subprocess.run([sys.executable, "pref_grpo.py", *flags], cwd=folder, capture_output=True, text=True,
                          env=env, timeout=timeout)



def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_copied_alone_it_trains_with_a_judge_of_your_own(alone):
    r = run(alone, "--model", "tiny", "--judge-fn", "my_rewards:prefer", "--train-steps", "3", "--output-dir", "run")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = metrics(alone / "run")
    assert [m["step"] for m in lines] == [1, 2, 3] and all(m["judge_failed"] == 0 for m in lines)
    calls = [json.loads(line) for line in (alone / "calls.jsonl").read_text().splitlines()]
    # the tiny preset: 4 groups of 8 a round, balanced order: 28 pairs a group, all in one call per round
    assert [c["n"] for c in calls if c["kind"] == "judge"][:3] == [4 * 28] * 3
    assert "judge my_rewards:prefer (pairwise, balanced order)" in r.stdout
    assert json.loads((alone / "run" / "args.json").read_text())["judge_fn"] == "my_rewards:prefer"


@pytest.mark.parametrize("spec, needles", [
    ("my_rewards:nope", ["--judge-fn my_rewards:nope", "has no 'nope'"]),
    ("not_my_module:prefer", ["--judge-fn not_my_module:prefer", "no module 'not_my_module'"]),
    ("my_rewards", ["--judge-fn", "expected module:name"]),
    ("my_rewards:PROMPTS", ["--judge-fn my_rewards:PROMPTS is not a function"]),
    ("my_rewards:one_short", ["--judge-fn my_rewards:one_short returned", "values for"]),
    ("my_rewards:out_of_range", ["--judge-fn my_rewards:out_of_range", "in [0, 1], got 2.0"]),
])
def test_a_judge_function_that_is_missing_or_wrong_is_one_line_naming_the_flag(alone, spec, needles):
    r = run(alone, "--model", "tiny", "--judge-fn", spec, "--train-steps", "1", *FAST, "--output-dir", "run")
    one_line_error(r, *needles)


def test_scorer_and_held_out_metrics_of_your_own(alone):
    r = run(alone, "--model", "tiny", "--reward", "pointwise", "--scorer-fn", "my_rewards:score", "--eval-fn",
            "my_rewards:grade", "--train-steps", "2", "--eval-every", "1", "--eval-count", "2", "--eval-seeds", "2",
            "--output-dir", "run")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = metrics(alone / "run")
    assert all(0 < m["my_mean_brightness"] < 1 and "eval_bright" in m and "eval_brightness" in m for m in lines)
    result = json.loads((alone / "run" / "eval" / "eval.json").read_text())
    assert result["images"] == 4
    assert {"bright_initial", "bright_final", "brightness_initial", "brightness_final"} <= set(result)
    assert (alone / "run" / "eval" / "before_after.png").exists()
    r = run(alone, "--model", "tiny", "--reward", "pointwise", "--train-steps", "1", "--output-dir", "run2",
            "--scorer-fn", "")
    one_line_error(r, "--reward pointwise needs --scorer-fn")


def test_a_preset_prompts_and_model_builder_of_your_own(alone):
    r = run(alone, "--preset", "my_rewards:RECIPE", "--output-dir", "run")
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((alone / "run" / "args.json").read_text())
    assert saved["model"] == "my_rewards:build" and saved["prompts"] == "my_rewards:PROMPTS"
    assert [m["step"] for m in metrics(alone / "run")] == [1, 2]
    one_line_error(run(alone, "--preset", "my_rewards:NOT_A_RECIPE"), "--preset my_rewards:NOT_A_RECIPE",
                   "unknown: learning_rate")
    one_line_error(run(alone, "--preset", "nope"), "--preset must be one of", "module:NAME")


def test_the_demo_is_named_not_imported_and_copied_alone_says_what_it_needs(alone):
    assert pg.parse_args([]).preset == pg.DEMO_PRESET == "toy_world:DEMO"
    assert pg.parse_args(["--model", "tiny"]).preset == "tiny" and pg.parse_args(["--model", "x/y"]).preset is None
    one_line_error(run(alone, "--output-dir", "run"), "toy_world.py")


def test_a_judge_that_never_gives_a_verdict_stops_the_run_in_its_first_round(alone):
    r = run(alone, "--model", "tiny", "--judge-fn", "my_rewards:silent", "--train-steps", "5", *FAST,
            "--output-dir", "run")
    one_line_error(r, "judge my_rewards:silent", "no verdict in the first round", "6 of 6 judgments failed",
                   "gave no verdict")  # 2 groups of 3: 3 pairs each
    assert not (alone / "run" / "metrics.jsonl").exists()


def test_a_ctrl_c_that_a_library_swallows_still_stops_the_run_at_the_end_of_the_round(alone):
    r = run(alone, "--model", "tiny", "--judge-fn", "my_rewards:swallows_ctrl_c", "--train-steps", "5",
            "--save-every", "5", *FAST, "--output-dir", "run")
    assert r.returncode == 130 and "Traceback" not in r.stderr and "--resume run" in r.stderr
    assert len(metrics(alone / "run")) == 1 and pg.find_checkpoint(str(alone / "run")).name == "step-000001"


def repo_imports() -> dict[str, set[str]]:
    """module -> the repository's modules it imports (anywhere in the file: top level or inside functions)."""
    files = {p.stem: p for p in [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]}
    graph = {}
    for name, path in files.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        graph[name] = names & set(files) - {name}
    return graph


def test_no_file_imports_a_file_that_imports_it_back():
    graph = repo_imports()
    assert graph["pref_grpo"] == set(), graph["pref_grpo"]  # the demo is named in a string, never imported
    for start in graph:  # depth-first: no path leads back to where it began
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                assert nxt != start, " -> ".join(path + [nxt])
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))


def function_lengths() -> dict[str, int]:
    tree = ast.parse((ROOT / "pref_grpo.py").read_text())
    return {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_the_loop_reads_on_one_screen_and_no_function_is_long():
    lengths = function_lengths()
    assert lengths["train"] <= 60, lengths["train"]
    assert max(lengths.values()) <= 80, max(lengths.items(), key=lambda kv: kv[1])
    body = (ROOT / "pref_grpo.py").read_text().split("def train(", 1)[1].split("\ndef ", 1)[0]
    order = [body.index(s) for s in ("sample_batch(", "judge_round(", "group_advantages(", "train_step(",
                                     "round_metrics(", "evaluate_now(", "log_round(", "save_checkpoint(")]
    assert order == sorted(order)  # sample, judge, advantages, update, log, evaluate, save: the paper's order


def test_help_prints_each_default_once_and_lists_the_presets():
    out = subprocess.run([sys.executable, "pref_grpo.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**__import__("os").environ, "COLUMNS": "200"}).stdout
    entries = out.split("\nLaunch:")[0].split("\n  --")[1:]
    assert len(entries) >= len(pg.RANGES)
    for entry in entries:
        assert entry.count("default") <= 1, entry
    for name in pg.PRESETS:
        assert f"\n{name}: " in out
    assert "--preset toy_world:DEMO" in out
