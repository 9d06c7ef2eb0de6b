"""A run that cannot learn says so and stops; bad input is one line naming the culprit, checked before any model
loads; nothing a user wrote is deleted; nothing non-finite is saved (pref_grpo.py)."""

import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pref_grpo as pg
from conftest import JSONHandler, LocalServer, one_line_error, read_metrics

ROOT = Path(__file__).resolve().parent
FAST = ["--model", "tiny", "--resolution", "32", "--sample-steps", "3", "--group-size", "3", "--prompts-per-step", "2",
        "--eval-seeds", "0", "--max-sequence-length", "16", "--sample-every", "1", "--accum", "0"]


def run_cli(*flags, cwd=ROOT, env=None, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "pref_grpo.py"), *flags], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)




def tiny_args(out, *extra):
    return pg.parse_args([*FAST, "--output-dir", str(out), *extra])


# ---------------------------------------------------------------------------------------------------------------------
# A judge that gives no verdict stops the run
# ---------------------------------------------------------------------------------------------------------------------
HTML = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"


def bad_judge_server(kind):
    """A server at 127.0.0.1 that lists the model but never gives a verdict, in one of several ways."""

    class Handler(JSONHandler):
        def do_GET(self):
            if kind == "html everywhere":
                return self.send_html()
            self.send_json(200, {"object": "list", "data": [{"id": "UnifiedReward", "object": "model"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            if kind == "hangs":
                time.sleep(30)  # longer than the client waits
                return
            if kind == "500":
                return self.send_json(500, {"error": "overloaded"})
            if kind in ("html", "html everywhere"):
                return self.send_html()
            self.send_json(200, {"choices": [{"message": {"role": "assistant", "content": "I cannot decide."}}]})

        def send_html(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(HTML)))
            self.end_headers()
            self.wfile.write(HTML)

    return LocalServer(Handler)


@pytest.mark.parametrize("kind, reason", [
    ("no verdict", "no verdict in the reply 'I cannot decide.'"),
    ("html", "the reply is not JSON (text/html"),
    ("500", "HTTP 500"),
    ("hangs", "timed out"),
    ("html everywhere", "answered /models with something that is not JSON"),
])
def test_a_judge_server_that_gives_no_verdict_stops_the_run_within_two_minutes(tmp_path, kind, reason):
    srv = bad_judge_server(kind)
    start = time.monotonic()
    try:
        r = run_cli(*FAST, "--train-steps", "5", "--judge-url", srv.url, "--judge-timeout", "2",
                    "--judge-retry-seconds", "5", "--output-dir", str(tmp_path / "run"))
    finally:
        srv.close()
    assert time.monotonic() - start < 120
    line = one_line_error(r, reason)
    if kind != "html everywhere":  # that one fails at start, before any model loads
        assert "judge UnifiedReward at http://127.0.0.1" in line and "no verdict in the first round" in line
        assert "6 of 6 judgments failed" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_judge_that_falls_silent_stops_after_the_rounds_allowed(tmp_path):
    (tmp_path / "fading.py").write_text(
        "import os\n"
        "def judge(prompts, a, b):\n"
        "    path = os.environ['COUNT']\n"
        "    n = int(open(path).read()) if os.path.exists(path) else 0\n"
        "    open(path, 'w').write(str(n + 1))\n"
        "    return [1.0] * len(prompts) if n == 0 else [None] * len(prompts)\n")
    env = {**os.environ, "COUNT": str(tmp_path / "count")}
    r = run_cli(*FAST, "--judge-fn", "fading:judge", "--train-steps", "6", "--judge-dead-rounds", "2",
                "--output-dir", str(tmp_path / "run"), cwd=tmp_path, env=env)
    one_line_error(r, "judge fading:judge: no verdict in 2 rounds in a row")
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]  # round 2 had ties only; round 3 stopped it


# ---------------------------------------------------------------------------------------------------------------------
# Nothing non-finite is saved; nothing a user wrote is deleted
# ---------------------------------------------------------------------------------------------------------------------
def test_a_checkpoint_with_non_finite_weights_is_refused_and_the_older_ones_kept(tmp_path):
    run = tmp_path / "run"
    pg.train(tiny_args(run, "--train-steps", "4", "--save-every", "2"))
    weights = run / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors"
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first][0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"step-000004 holds weights that are not finite.*step-000002") as err:
        pg.train(pg.parse_args(["--resume", str(run), "--train-steps", "6"]))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert len(read_metrics(run)) == 4


def test_a_non_finite_loss_or_weight_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real, rounds = pg.train_step, []

    def nan_in_round_3(pipe, params, optimizer, batch, adv, args):
        rounds.append(1)
        if len(rounds) == 3:
            raise FloatingPointError("non-finite loss")
        return real(pipe, params, optimizer, batch, adv, args)

    monkeypatch.setattr(pg, "train_step", nan_in_round_3)
    with pytest.raises(SystemExit, match="stopped in round 3: non-finite loss; the last good checkpoint is round 2"):
        pg.train(tiny_args(tmp_path / "a", "--train-steps", "6", "--save-every", "2"))
    assert [p.name for p in (tmp_path / "a" / "checkpoints").iterdir()] == ["step-000002"]

    def nan_weight(pipe, params, optimizer, batch, adv, args):  # finite loss and gradient, but a weight went bad
        out = real(pipe, params, optimizer, batch, adv, args)
        with torch.no_grad():
            params[0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(pg, "train_step", nan_weight)
    with pytest.raises(SystemExit, match="stopped in round 2: the trained weights are not finite.*no checkpoint"):
        pg.train(tiny_args(tmp_path / "b", "--train-steps", "6", "--save-every", "2"))
    assert not (tmp_path / "b" / "checkpoints" / "step-000002").exists()


def test_resume_refuses_an_unreadable_metrics_line_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    pg.train(tiny_args(run, "--train-steps", "2", "--save-every", "2"))
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["{\"step\": 1, \"loss\": 0.1, garbled", *lines[1:]]) + "\n")
    before = path.read_bytes()
    with pytest.raises(SystemExit, match=r"metrics.jsonl:1: a line that is not a metrics record") as err:
        pg.train(pg.parse_args(["--resume", str(run), "--train-steps", "3"]))
    assert "\n" not in str(err.value) and path.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any model loads
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, needles", [
    (["--seed", "-1"], ["--seed must be in [0,4294967295]"]),
    (["--resolution", "100000"], ["--resolution must be in [8,8192]"]),
    (["--judge-dead-rounds", "0"], ["--judge-dead-rounds"]),
    (["--judge-retry-seconds", "0"], ["--judge-retry-seconds"]),
    (["--output-dir", "FILE"], ["--output-dir", "cannot write there"]),
    (["--output-dir", "/proc/pref-grpo-run"], ["--output-dir /proc/pref-grpo-run: cannot write there"]),
    (["--prompts", "FOLDER"], ["--prompts", "is a folder, not a file"]),
])
def test_bad_flags_and_paths_are_one_line_before_any_model_loads(tmp_path, flags, needles):
    (tmp_path / "FILE").write_text("a file, not a folder")
    (tmp_path / "FOLDER").mkdir()
    (tmp_path / "p.txt").write_text("a red car\n")
    # A hub id the offline cache does not hold: loading it would fail differently, so the error proves the order.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    r = run_cli("--model", "black-forest-labs/FLUX.1-dev", "--judge-fn", "pref_grpo:colour_judge", "--prompts",
                str(tmp_path / "p.txt"), "--output-dir", str(tmp_path / "run"), *flags, cwd=tmp_path, env=env)
    one_line_error(r, *needles)


@pytest.mark.parametrize("part", ["vae", "transformer", "tokenizer"])
def test_a_model_folder_missing_a_component_names_it(tmp_path, part):
    folder = tmp_path / "model"
    pg.tiny_pipeline().save_pretrained(folder)
    (folder / part).rename(tmp_path / "moved")
    (tmp_path / "p.txt").write_text("a red car\n")
    r = run_cli("--model", str(folder), "--judge-fn", "pref_grpo:colour_judge", "--prompts", str(tmp_path / "p.txt"),
                "--output-dir", str(tmp_path / "run"))
    one_line_error(r, f"names a '{part}' component, but {part}/ is missing")


def test_prompt_files_are_read_by_their_content_not_their_name(tmp_path):
    files = {"upper.JSONL": '{"prompt": "a red car"}\r\n\r\n{"prompt": "a blue bird"}\r\n',
             "list.json": '["a red car", {"prompt": "a blue bird"}]',
             "bom.txt": "\ufeffa red car\r\na blue bird\r\n",
             "lines.json": '{"prompt": "a red car"}\n{"prompt": "a blue bird"}\n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert pg.load_prompts(str(tmp_path / name)) == ["a red car", "a blue bird"], name
    (tmp_path / "bad.JSONL").write_text('{"prompt": "a red car"}\n{"prompt": \n')
    with pytest.raises(SystemExit, match=r"bad.JSONL:2: not valid JSON"):
        pg.load_prompts(str(tmp_path / "bad.JSONL"))
    (tmp_path / "weird.jsonl").write_text('{"caption": "a red car"}\n')
    with pytest.raises(SystemExit, match=r"weird.jsonl:1: expected a non-empty prompt"):
        pg.load_prompts(str(tmp_path / "weird.jsonl"))


# ---------------------------------------------------------------------------------------------------------------------
# The README's tables tell the truth
# ---------------------------------------------------------------------------------------------------------------------
def readme_table(heading: str) -> list[list[str]]:
    """The backticked names in the first column of each row of the README table under `heading`."""
    text = (ROOT / "README.md").read_text().split(heading, 1)[1].split("\n\n", 2)[1]
    return [re.findall(r"`([^`]+)`", line.split("|")[1]) for line in text.splitlines() if line.startswith("| `")]


def test_the_readme_tells_the_truth_about_what_a_run_saves_and_logs(tmp_path):
    class Handler(JSONHandler):
        def do_GET(self):
            self.send_json(200, {"object": "list", "data": [{"id": "UnifiedReward", "object": "model"}]})

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_json(200, {"choices": [{"message": {"content": "<answer>Image 1 is better</answer>"}}]})

    srv, run = LocalServer(Handler), tmp_path / "run"
    try:  # every optional metric on: CLIP, KL, both orders, held-out evaluation; then a resume that changes a flag
        r = run_cli(*FAST, "--train-steps", "2", "--judge-url", srv.url, "--judge-order", "both", "--clip-model",
                    "tiny", "--clip-weight", "1", "--kl-beta", "0.1", "--eval-every", "1", "--eval-seeds", "1",
                    "--eval-count", "2", "--save-every", "1", "--output-dir", str(run))
        assert r.returncode == 0, r.stderr[-3000:]
        r = run_cli("--resume", str(run), "--train-steps", "3", "--sample-every", "2")
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        srv.close()
    for (name, *more) in readme_table("### What a run saves"):
        for path in (name, *more):
            assert list(run.glob(path.rstrip("/"))), path
    documented = {name for row in readme_table("### Metrics") for name in row}
    produced = {key for line in (run / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    patterns = {name.split("<")[0] for name in documented if "<" in name}
    assert {k for k in produced if k not in documented and not k.startswith(tuple(patterns))} == set()
    assert {k for k in documented if "<" not in k} - produced == set()
    saved = json.loads((run / "args.json").read_text())
    assert set(saved) == set(pg.Args.__dataclass_fields__)
    assert saved["device"] == "cpu" and saved["grad_checkpointing"] is False and saved["judge_url"] == srv.url
    assert json.loads((run / "resumes.jsonl").read_text())["changed"]["sample_every"] == [1, 2]
