"""Tests for pref_grpo.py: exact math against hand-computed values, the judge's exact request at a real HTTP server on
127.0.0.1, hub ids from an offline Hugging Face cache, and end-to-end runs on tiny models."""

import base64
import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pref_grpo as pg
from conftest import (HUB_IDS, JSONHandler, LocalServer, offline_env, one_line_error, read_metrics, snapshot,
                      tiny_vlm)

ROOT = Path(__file__).resolve().parent
PROTOCOLS = ROOT.parent / "shared" / "judge-protocols"
SHARED = ROOT.parent / "shared" / "unigenbench-data"
WHITE, GRAY, RED, BLACK = (250, 250, 250), (128, 128, 128), (200, 30, 30), (5, 5, 5)
MODEL = "UnifiedReward"


def solid(color, size=64):
    return Image.new("RGB", (size, size), color)


def run_cli(*flags, env=None, cwd=ROOT, script=None, timeout=300):
    r = subprocess.run([sys.executable, str(script or ROOT / "pref_grpo.py"), *flags], capture_output=True, text=True,
                       cwd=cwd, env=env, timeout=timeout)
    return r




def tiny_flags(out, *extra):
    return ["--model", "tiny", "--output-dir", str(out), "--resolution", "32", "--sample-steps", "4",
            "--prompts-per-step", "2", "--group-size", "3", "--eval-seeds", "0", "--save-every", "2",
            "--sample-every", "1", "--accum", "0", *extra]


def tiny_args(out, *extra):
    return pg.parse_args(tiny_flags(out, *extra))


# ---------------------------------------------------------------------------------------------------------------------
# Section 1: the SDE step and the sampler
# ---------------------------------------------------------------------------------------------------------------------
def test_sde_step_mean_std_and_log_prob_by_hand():
    x, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    prev = torch.tensor([[0.8, 2.0]])
    out, lp, mean, std_t = pg.sde_step(v, x, 0.5, 0.25, 0.7, 0.9, prev=prev)
    # std_t = 0.7 * sqrt(0.5 / 0.5) = 0.7; dt = -0.25; the noise std is 0.7 * sqrt(0.25) = 0.35
    # mean = x (1 + 0.49 * -0.25 / 1) + v (1 + 0.49 * 0.5 / 1) * -0.25 = 0.8775 x - 0.31125 v
    assert torch.allclose(mean, torch.tensor([[0.721875, 2.06625]]), atol=1e-6)
    assert std_t.item() == pytest.approx(0.7)
    d = [0.8 - 0.721875, 2.0 - 2.06625]
    expected = sum(-(e * e) / (2 * 0.35**2) - math.log(0.35) - 0.5 * math.log(2 * math.pi) for e in d) / 2
    assert lp.item() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(out, prev)


def test_sde_step_caps_sigma_one_at_first_sigma_below_one():
    x, v = torch.zeros(1, 3), torch.ones(1, 3)
    _, _, _, std_t = pg.sde_step(v, x, 1.0, 0.9, 0.5, 0.9)
    assert std_t.item() == pytest.approx(0.5 * math.sqrt(1.0 / (1 - 0.9)))


def test_sde_step_log_prob_matches_torch_normal_and_noise_has_the_stated_std():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 64, 16, generator=g), torch.randn(4, 64, 16, generator=g)
    nxt, lp, mean, std_t = pg.sde_step(v, x, 0.7, 0.6, 1.0, 0.95, generator=g)
    std = std_t.flatten()[0].item() * math.sqrt(0.1)
    ref = torch.distributions.Normal(mean, std).log_prob(nxt).mean(dim=(1, 2))
    assert torch.allclose(lp, ref, atol=1e-5)
    assert ((nxt - mean) / std).std().item() == pytest.approx(1.0, abs=0.03)


def test_sde_step_takes_one_noise_level_per_row():
    g = torch.Generator().manual_seed(0)
    x, v, prev = (torch.randn(3, 5, 4, generator=g) for _ in range(3))
    sig, nxt = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.4, 0.1])
    _, lp, mean, _ = pg.sde_step(v, x, sig, nxt, 0.7, 0.95, prev=prev)
    for r in range(3):
        _, lp_r, mean_r, _ = pg.sde_step(v[r:r + 1], x[r:r + 1], float(sig[r]), float(nxt[r]), 0.7, 0.95,
                                         prev=prev[r:r + 1])
        assert torch.equal(lp[r:r + 1], lp_r) and torch.equal(mean[r:r + 1], mean_r)


def test_eta_zero_is_the_deterministic_euler_step():
    x, v = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    a, lp, _, _ = pg.sde_step(v, x, 0.6, 0.4, 0.0, 0.9, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, x + v * (0.4 - 0.6), atol=1e-7) and torch.equal(lp, torch.zeros(2))


def test_sde_step_runs_in_float32_for_bf16_inputs():
    x, v = torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(2, 4, dtype=torch.bfloat16)
    nxt, lp, _, _ = pg.sde_step(v, x, 0.5, 0.4, 0.7, 0.9, generator=torch.Generator().manual_seed(0))
    assert nxt.dtype == torch.float32 and lp.dtype == torch.float32


@pytest.fixture(scope="module")
def pipe():
    return pg.load_pipeline("tiny", "cpu")


def test_sigma_schedule_is_fluxs_time_shift_or_a_fixed_shift(pipe):
    seq_len = 256  # resolution 64 on the tiny model: (64 / 2 / 2)^2 tokens
    sig = pg.sigma_schedule(pipe, 4, seq_len)
    mu = 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)  # calculate_shift: linear in the sequence length
    expected = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    assert torch.allclose(sig, torch.tensor(expected), atol=1e-6)
    fixed = pg.sigma_schedule(pipe, 25, seq_len, shift=3.0)  # the official schedule: sd3_time_shift(3, linspace)
    t = np.linspace(1, 0, 26)
    assert torch.allclose(fixed, torch.tensor(3 * t / (1 + 2 * t), dtype=torch.float32), atol=1e-6)
    assert fixed[1].item() == pytest.approx(0.98630, abs=1e-5) and fixed[24].item() == pytest.approx(0.1111, abs=1e-4)


def test_deterministic_sampler_equals_the_stock_flux_pipeline(pipe):
    """Our eta=0 rollout is diffusers' own Euler sampler: same noise in, same image out."""
    noise = pg.initial_noise(pipe, 1, 64, torch.Generator().manual_seed(7))
    ours = pg.generate_images(pipe, ["a red apple"], [7], steps=6, resolution=64, max_sequence_length=16)[0]
    stock = pipe(["a red apple"], latents=noise, height=64, width=64, num_inference_steps=6, guidance_scale=3.5,
                 max_sequence_length=16).images[0]
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(stock, dtype=int)).max() <= 1


def test_generate_images_same_seed_same_image_in_any_batch(pipe):
    prompts, seeds = ["a red apple", "a blue car", "a green bird"], [3, 4, 5]
    batched = pg.generate_images(pipe, prompts, seeds, steps=4, resolution=32)
    single = [pg.generate_images(pipe, [p], [s], steps=4, resolution=32)[0] for p, s in zip(prompts, seeds)]
    for a, b in zip(batched, single):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[1]))


def test_step_plan_trains_a_fresh_subset_per_trajectory_never_the_last_transition():
    gens = [torch.Generator().manual_seed(g) for g in range(2)]
    mask, trained = pg.step_plan(25, 0, 0.6, gens, 8, torch.Generator().manual_seed(0))
    assert all(mask) and trained.shape == (16, 14)  # official: int(0.6 x 24) = 14 of the 24 non-final transitions
    assert int(trained.max()) <= 23 and all(len(set(row.tolist())) == 14 for row in trained)
    assert len({tuple(sorted(row.tolist())) for row in trained}) == 16  # every trajectory its own subset
    mask, trained = pg.step_plan(10, 4, 0.5, gens[:1], 3, torch.Generator().manual_seed(3))
    window = [i for i, m in enumerate(mask) if m]
    assert len(window) == 4 and window == list(range(window[0], window[0] + 4))
    assert set(trained.flatten().tolist()) <= set(window) - {9}
    assert trained.shape[1] == max(1, int(0.5 * len(set(window) - {9})))


def test_rollout_keeps_the_last_steps_x0_prediction_for_judging(pipe):
    args = pg.parse_args(["--model", "tiny", "--sample-steps", "4", "--resolution", "32", "--group-size", "2"])
    batch = pg.sample_batch(pipe, ["a red apple"], 0, args, torch.device("cpu"))
    sig, lat = batch["sigmas"], batch["latents"]
    v = pg.velocity(pipe, lat[:, 3], float(sig[3]), batch["cond"], batch["img_ids"], args.guidance)
    assert torch.allclose(batch["x0"], lat[:, 3] - float(sig[3]) * v, atol=1e-6)
    assert (batch["x0"] - lat[:, 4]).abs().mean() > 1e-3  # the last SDE sample still carries that step's noise


def test_sde_window_rollout_is_deterministic_outside_the_window(pipe):
    args = pg.parse_args(["--model", "tiny", "--sample-steps", "6", "--sde-window", "2", "--resolution", "32"])
    batch = pg.sample_batch(pipe, ["a red apple"], 0, args, torch.device("cpu"))
    lp = batch["log_probs"]
    window = [i for i in range(6) if lp[0, i] != 0]
    assert len(window) == 2 and set(batch["trained"].flatten().tolist()) <= set(window)
    first = window[0]  # with the same initial noise, a group's trajectories agree until the first SDE step
    assert torch.equal(batch["latents"][0, first], batch["latents"][1, first])
    assert not torch.equal(batch["latents"][0, first + 1], batch["latents"][1, first + 1])


def test_each_group_draws_its_own_noise_and_steps_whatever_the_batch(pipe):
    """Keyed by (seed, step, global group index): process 1 sampling group 2 alone gets what one process sampling all
    groups gets, and the same prompt in another group gets other noise."""
    args = pg.parse_args(["--model", "tiny", "--resolution", "32", "--sample-steps", "4", "--group-size", "2"])
    ps = ["a red apple", "a red car", "a red apple"]
    whole = pg.sample_batch(pipe, ps, 3, args, torch.device("cpu"))
    alone = pg.sample_batch(pipe, ps[2:], 3, args, torch.device("cpu"), first_group=2)
    assert torch.allclose(whole["latents"][4:], alone["latents"], atol=1e-5)
    assert torch.equal(whole["trained"][4:], alone["trained"])
    assert (whole["latents"][:2, 0] - whole["latents"][4:, 0]).abs().mean() > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Section 2: the judge's prompt, pair schedule and verdicts
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not PROTOCOLS.is_dir(), reason="needs ../shared/judge-protocols")
def test_unifiedreward_think_prompt_is_the_trained_one_byte_for_byte():
    assert pg.UNIFIEDREWARD_THINK_PROMPT == (PROTOCOLS / "unifiedreward_think_pairwise.txt").read_text()
    example = (PROTOCOLS / "unifiedreward_think_pairwise_example.txt").read_text()
    assert pg.judge_text("a red apple on a wooden table") == example
    assert pg.judge_text("a {weird} caption").endswith("[a {weird} caption]")


def verdict_text(better):
    return f"<think>\n1. Semantic consistency: ...\nTotal: ...\n</think>\n<answer>Image {better} is better</answer>"


@pytest.mark.parametrize("reply, expected", [
    (verdict_text(1), 1.0), (verdict_text(2), 0.0),
    ("<answer>Image 2 is better</answer>", 0.0),
    ("<think>x</think><answer>  Image 1 is better.\n</answer>", 1.0),       # the official check is `in`
    ("<think>x</think><answer>Image 1 is better, clearly</answer>", 1.0),
    ("<think>x</think><answer>Image 1 is better Image 2 is better</answer>", 1.0),  # official: image 1 is checked first
    ("<think>x</think><answer>image 1 is better</answer>", None),           # other casing: a tie, as officially
    ("<think>x</think><answer>Both are equally good</answer>", None),
    ("<think>x</think>Image 1 is better", None),                             # no answer tag
    ("<think>x</think><answer>Image 1 is better", None),                    # unclosed
    ("<answer>Image 2 is better</answer><answer>Image 1 is better</answer>", 0.0),  # the first answer counts
    ("", None), (None, None),
])
def test_parse_verdict_reads_replies_as_the_official_trainer(reply, expected):
    assert pg.parse_verdict(reply) == expected


def test_pair_schedules():
    first, balanced, both = (pg.pair_schedule(8, o) for o in ("first", "balanced", "both"))
    assert len(first) == len(balanced) == 28 and len(both) == 56
    assert first == [(i, j) for i in range(8) for j in range(i + 1, 8)]  # the official order
    assert {frozenset(p) for p in balanced} == {frozenset(p) for p in first}  # every pair once
    shown_first = [sum(a == k for a, _ in balanced) for k in range(8)]
    assert all(c in (3, 4) for c in shown_first) and [sum(a == k for a, _ in first) for k in (0, 7)] == [7, 0]
    assert both[28:] == [(j, i) for i, j in first]
    for G in range(2, 13):
        counts = [sum(a == k for a, _ in pg.pair_schedule(G, "balanced")) for k in range(G)]
        assert all((G - 1) // 2 <= c <= G // 2 for c in counts), G


def value(im):
    return im.getpixel((0, 0))[0]


def test_judge_groups_pairs_never_cross_groups_and_failures_are_ties():
    seen = []

    def judge(prompts, a, b):
        seen.extend(zip(prompts, a, b))
        # image "value" = its red channel; the pair {0, 1} of every group fails
        return [None if {value(x) % 10, value(y) % 10} == {0, 1} else float(value(x) > value(y))
                for x, y in zip(a, b)], {"extra": 1}

    G, prompts = 4, ["p0", "p1"]
    images = [Image.new("RGB", (2, 2), (10 * g + i, 0, 0)) for g in range(2) for i in range(G)]
    pref, info = pg.judge_groups(judge, prompts, images, G, "first")
    assert len(seen) == 12 and info["judge_requests"] == 12 and info["judge_failed"] == 2 and info["extra"] == 1
    for prompt, a, b in seen:  # each pair is judged with its own group's prompt
        assert value(a) // 10 == int(prompt[1]) == value(b) // 10
    assert pref[0, 0, 1] == 0.5 and pref[0, 1, 0] == 0.5 and pref[0, 3, 0] == 1.0 and pref[0, 0, 3] == 0.0
    assert torch.allclose(pg.win_rates(pref)[1], torch.tensor([1 / 6, 1 / 6, 2 / 3, 1.0]))
    for order in ("balanced", "both"):  # a consistent judge: the same preferences in every order mode
        pref2, info2 = pg.judge_groups(judge, prompts, images, G, order)
        assert torch.equal(pref2, pref)
    assert info2["judge_requests"] == 24 and info2["judge_order_disagree"] == 0.0


def test_position_bias_goes_straight_through_first_and_cancels_on_average_in_balanced():
    def first_wins(prompts, a, b):  # a judge that always prefers whatever is shown first
        return [1.0] * len(a), {}

    images = [solid((i, 0, 0), 2) for i in range(8)]
    wr = {o: pg.win_rates(pg.judge_groups(first_wins, ["p"], images, 8, o)[0])[0]
          for o in ("first", "balanced", "both")}
    assert torch.allclose(wr["first"], torch.tensor([7 - k for k in range(8)]) / 7.0)  # image 0 wins all, 7 none
    assert all(min(abs(w - 3 / 7), abs(w - 4 / 7)) < 1e-6 for w in wr["balanced"].tolist())  # offset <= 1/14
    assert torch.allclose(wr["both"], torch.full((8,), 0.5))
    _, info = pg.judge_groups(first_wins, ["p"], images, 8, "both")
    assert info["judge_first_preferred"] == 1.0 and info["judge_order_disagree"] == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# The judge at a real HTTP server on 127.0.0.1: the exact request, faults, retries, the key
# ---------------------------------------------------------------------------------------------------------------------
def chat_reply(text=None):
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    return {"object": "chat.completion", "choices": [choice], "usage": {"completion_tokens": 5}}


def decode_image(data_url):
    assert data_url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def brighter_wins(caption, first, second, payload):
    return chat_reply(verdict_text(1 if sum(first) > sum(second) else 2))


class ScriptedServer:
    """An OpenAI-compatible endpoint whose replies are scripted per (caption, colour of the image shown first).
    `script[(caption, first)]` lists faults consumed one per request: "garbage", "500", "400", "slow", "drop", or a
    literal reply. Hostile on purpose: fault replies echo the Authorization header back."""

    def __init__(self, reply=brighter_wins, models=(MODEL,), required_key=None, slow_s=1.5):
        self.reply, self.models, self.required_key, self.slow_s = reply, list(models), required_key, slow_s
        self.script, self.auth, self.payloads, self.lock = {}, [], [], threading.Lock()
        server = self

        class Handler(JSONHandler):
            def do_GET(self):
                auth = self.headers.get("Authorization", "")
                with server.lock:
                    server.auth.append(auth)
                if server.required_key and auth != f"Bearer {server.required_key}":
                    return self.send_json(401, {"error": f"bad key {auth}"}, reason=f"Unauthorized {auth}")
                if not self.path.startswith("/v1/"):
                    return self.send_json(404, {"error": "not found"})
                self.send_json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization", "")
                content = payload["messages"][0]["content"]
                caption = content[-1]["text"].rsplit("[", 1)[-1].rstrip("]")
                colors = [decode_image(c["image_url"]["url"]).convert("RGB").getpixel((8, 8))
                          for c in content if c["type"] == "image_url"]
                colors = [min((WHITE, GRAY, RED, BLACK), key=lambda k: sum(abs(a - b) for a, b in zip(k, c)))
                          for c in colors]  # JPEG is lossy: the nearest test colour
                first, second = (colors + [None, None])[:2]
                with server.lock:
                    server.auth.append(auth)
                    server.payloads.append(payload)
                    faults = server.script.get((caption, first), [])
                    fault = faults.pop(0) if faults else None
                if fault == "garbage":
                    return self.send_json(200, f'{{"choices": [oops {auth}'.encode())
                if fault in ("500", "400"):
                    return self.send_json(int(fault), {"error": auth}, reason=f"Failure {auth}")
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault == "slow":
                    time.sleep(server.slow_s)
                if isinstance(fault, str) and fault != "slow":
                    return self.send_json(200, chat_reply(fault))
                try:
                    self.send_json(200, server.reply(caption, first, second, payload))
                except OSError:
                    pass  # the client gave up on a slow reply

        self.local = LocalServer(Handler)
        self.url, self.close = self.local.url, self.local.close


@pytest.fixture
def server():
    servers = []

    def start(**kwargs):
        servers.append(ScriptedServer(**kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(pg, "RETRY_BACKOFF_S", 0.01)


def server_judge(url, *flags):
    return pg.make_judge(pg.parse_args(["--model", "tiny", "--judge-url", url, "--judge-model", MODEL,
                                        "--judge-workers", "4", *flags]))


PAIRS = [("a white cat", WHITE, BLACK), ("a red fox", RED, GRAY), ("gray sky", GRAY, BLACK), ("night", BLACK, WHITE)]


def run_judge(judge, pairs, size=64):
    return judge([p for p, _, _ in pairs], [solid(a, size) for _, a, _ in pairs], [solid(b, size) for _, _, b in pairs])


@pytest.mark.skipif(not PROTOCOLS.is_dir(), reason="needs ../shared/judge-protocols")
def test_server_request_is_the_official_layout(server):
    srv = server()
    probs, info = run_judge(server_judge(srv.url), [("a red apple on a wooden table", WHITE, BLACK)], size=96)
    assert probs == [1.0] and info["judge_request_failed"] == 0 and info["judge_attempts"] == 1
    payload = srv.payloads[0]
    assert set(payload) == {"model", "messages", "max_tokens"}  # sampling left to the server, as officially
    assert payload["model"] == MODEL and payload["max_tokens"] == 2048 and len(payload["messages"]) == 1
    content = payload["messages"][0]["content"]
    assert [c["type"] for c in content] == ["image_url", "image_url", "text"]  # image 1, image 2, then the text
    assert content[2]["text"] == (PROTOCOLS / "unifiedreward_think_pairwise_example.txt").read_text()
    first = decode_image(content[0]["image_url"]["url"])
    assert first.format == "JPEG" and first.size == (96, 96)  # at the image's own size
    assert first.convert("RGB").getpixel((8, 8))[0] > 240 and decode_image(content[1]["image_url"]["url"]).convert(
        "RGB").getpixel((8, 8))[0] < 20
    run_judge(server_judge(srv.url, "--judge-image-size", "32"), [("x", WHITE, BLACK)], size=96)
    assert decode_image(srv.payloads[-1]["messages"][0]["content"][0]["image_url"]["url"]).size == (32, 32)


def test_server_faults_retries_and_failures(server):
    srv = server(slow_s=1.5)
    pairs = [(f"p{i}", a, b) for i, (a, b) in enumerate(
        [(WHITE, BLACK), (GRAY, BLACK), (BLACK, RED), (RED, WHITE), (WHITE, GRAY), (GRAY, RED), (RED, BLACK)])]
    srv.script = {
        ("p1", GRAY): ["garbage"],                     # retried once
        ("p2", BLACK): ["500", "500"],                 # retried twice
        ("p3", RED): ["slow"],                         # times out, retried once
        ("p4", WHITE): ["drop"],                       # dropped connection, retried once
        ("p5", GRAY): ["500"] * 4,                     # fails for good (3 retries)
        ("p6", RED): ["400"],                          # rejected: not retried, failed
    }
    judge = server_judge(srv.url, "--judge-timeout", "0.5", "--judge-retries", "3")
    start = time.perf_counter()
    probs, info = run_judge(judge, pairs)
    assert time.perf_counter() - start < 20
    assert probs == [None if p in ("p5", "p6") else float(sum(a) > sum(b)) for p, a, b in pairs]
    assert info["judge_request_failed"] == 2 and info["judge_attempts"] == 7 + 1 + 2 + 1 + 1 + 3
    probs, info = run_judge(judge, pairs)  # the scripts are used up: the server recovered, so does the judge
    assert None not in probs and info["judge_attempts"] == 7


def test_off_format_replies_are_ties_and_counted(server):
    srv = server()
    srv.script = {("night", BLACK): ["I cannot decide."]}
    probs, info = run_judge(server_judge(srv.url), PAIRS)
    assert probs[3] is None and info["judge_unparsed"] == 1 and info["judge_request_failed"] == 0


def test_server_down_wrong_model_and_missing_v1_are_one_line_errors(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(SystemExit, match=f"judge server {url} is not reachable") as err:
        server_judge(url)
    assert "\n" not in str(err.value)
    srv = server(models=["something-else"])
    with pytest.raises(SystemExit, match="does not serve --judge-model 'UnifiedReward'.*something-else"):
        server_judge(srv.url)
    with pytest.raises(SystemExit, match="404.*missing /v1"):
        server_judge(srv.url.removesuffix("/v1"))


def test_api_key_sent_as_bearer_and_never_shown(server, monkeypatch, capsys):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("JUDGE_KEY", secret)
    srv = server(required_key=secret)
    judge = server_judge(srv.url, "--judge-api-key-env", "JUDGE_KEY", "--judge-retries", "1")
    probs, _ = run_judge(judge, PAIRS[:2])
    assert probs == [1.0, 0.0] and set(srv.auth) == {f"Bearer {secret}"}  # /models and every chat request
    for fault in ("500", "garbage"):  # failures whose replies echo the header back
        srv.script = {("night", BLACK): [fault] * 2}
        probs, info = run_judge(judge, PAIRS[3:])
        assert probs == [None] and info["judge_request_failed"] == 1
    out = capsys.readouterr()
    assert "HTTP 500" in out.out + out.err and secret not in out.out + out.err
    monkeypatch.setenv("WRONG_KEY", "sk-wrong-fedcba9876543210")
    with pytest.raises(SystemExit) as err:
        server_judge(srv.url, "--judge-api-key-env", "WRONG_KEY")
    assert "401" in str(err.value) and "$WRONG_KEY" in str(err.value) and "sk-wrong" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# The in-process judge (a tiny random Qwen2.5-VL)
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm(seed=0)


def test_local_generate_batched_equals_single(vlm):
    requests = [(f"Describe pair {i}: {p}", [solid(a), solid(b)]) for i, (p, a, b) in enumerate(PAIRS)]
    requests.append(("No image at all, just text.", []))
    batched = pg.local_chat(vlm, requests, max_tokens=6, batch_size=3)
    assert batched == pg.local_chat(vlm, requests, max_tokens=6, batch_size=1) and all(batched)


# ---------------------------------------------------------------------------------------------------------------------
# Sections 3-5: win rates, advantages, loss, the train step
# ---------------------------------------------------------------------------------------------------------------------
def test_win_rates_by_hand_and_sum_to_half_the_group():
    pref = torch.full((1, 3, 3), 0.5)
    for i, j, p in [(0, 1, 1.0), (0, 2, 0.5), (1, 2, 0.0)]:  # 0 beats 1, 0 ties 2, 2 beats 1
        pref[0, i, j], pref[0, j, i] = p, 1 - p
    assert torch.allclose(pg.win_rates(pref), torch.tensor([[0.75, 0.0, 0.75]]))
    soft = torch.rand(5, 6, 6)
    soft = torch.triu(soft, 1) + torch.tril(1 - soft.transpose(1, 2), -1)
    assert torch.allclose(pg.win_rates(soft).sum(1), torch.full((5,), 3.0))


def test_group_zscore_by_hand_with_bessels_correction_and_zero_std_groups():
    z = pg.group_zscore(torch.tensor([[0.0, 0.5, 1.0], [0.3, 0.3, 0.3]]))
    assert torch.allclose(z[0], torch.tensor([-0.5, 0.0, 0.5]) / (0.5 + 1e-8), atol=1e-6)  # sample std of (0, .5, 1)
    assert torch.equal(z[1], torch.zeros(3))
    outlier = torch.zeros(1, 30)
    outlier[0, 0] = 1.0  # z = (1 - 1/30) / sqrt(1/30) = 5.29 -> clamped to 5
    assert pg.group_advantages([outlier], [1.0])[0, 0].item() == pytest.approx(5.0)


def test_clip_score_is_mixed_into_the_advantage_by_hand():
    win = torch.tensor([[1.0, 0.5, 0.0, 0.5]])  # z = (0.5, 0, -0.5, 0) / std, std = sqrt(1/6) (Bessel)
    clip = torch.tensor([[0.30, 0.32, 0.34, 0.36]])  # z = (-0.03, -0.01, 0.01, 0.03) / sqrt(0.02^2 * 5/3)
    z_win = torch.tensor([0.5, 0.0, -0.5, 0.0]) / math.sqrt(1 / 6)
    z_clip = torch.tensor([-0.03, -0.01, 0.01, 0.03]) / math.sqrt(0.0004 * 5 / 3)
    adv = pg.group_advantages([win, clip], [0.7, 1.4])
    assert torch.allclose(adv[0], 0.7 * z_win + 1.4 * z_clip, atol=1e-4)
    assert torch.allclose(pg.group_advantages([win, clip], [0.7, 1.4], clip=1.0)[0], (0.7 * z_win + 1.4 * z_clip)
                          .clamp(-1, 1), atol=1e-4)  # the clamp acts on the sum, as officially


def test_clip_scores_are_cosine_similarities():
    clip = pg.load_clip("tiny", "cpu")
    ims = [solid(RED, 32), solid(WHITE, 32)]
    s = pg.clip_scores(clip, ["a red apple", "a red apple"], ims)
    model, tok, proc = clip
    t = model.get_text_features(**tok(["a red apple"], return_tensors="pt"))
    t = getattr(t, "pooler_output", t)
    i = model.get_image_features(pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"])
    i = getattr(i, "pooler_output", i)
    expected = torch.nn.functional.cosine_similarity(t.expand_as(i), i)
    assert torch.allclose(s, expected, atol=1e-5) and s.abs().max() <= 1


def test_grpo_loss_on_policy_and_clipped_by_hand():
    lp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = pg.grpo_loss(lp, lp.detach(), adv, 1e-4)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    assert torch.allclose(lp.grad, -adv / 3) and stats["ratio"] == 1.0 and stats["clip_frac"] == 0.0
    lp2 = torch.tensor([0.1, 0.1], requires_grad=True)  # ratio e^0.1 = 1.105 > 1 + 0.01
    loss, stats = pg.grpo_loss(lp2, torch.zeros(2), torch.tensor([1.0, -1.0]), 0.01)
    loss.backward()
    # A > 0: max(-1.105, -1.01) = -1.01, clipped (no gradient); A < 0: max(1.105, 1.01) = 1.105, unclipped
    assert loss.item() == pytest.approx((-1.01 + math.exp(0.1)) / 2, abs=1e-6)
    assert lp2.grad[0] == 0 and lp2.grad[1].item() == pytest.approx(math.exp(0.1) / 2, abs=1e-6)
    assert stats["clip_frac"] == 1.0 and stats["approx_kl"] == pytest.approx(0.5 * 0.01)


def test_flow_grpo_kl_is_the_squared_mean_gap_over_two_std_t_squared():
    m, mb, std_t = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.tensor([0.3, 0.5, 0.7]).view(3, 1, 1)
    expected = ((m - mb) ** 2).mean(dim=(1, 2)) / (2 * torch.tensor([0.3, 0.5, 0.7]) ** 2)
    assert torch.allclose(pg.flow_grpo_kl(m, mb, std_t), expected)


def fresh(args, lr=1e-2):
    p = pg.load_pipeline("tiny", "cpu")
    params = pg.trainable_parameters(p, args)
    return p, params, torch.optim.AdamW(params, lr=lr)


def test_on_policy_ratio_is_one_and_later_updates_are_off_policy_with_the_clip_acting(monkeypatch):
    """--accum 4 over 8 trajectories: 2 updates. The first sees the sampling weights (ratio 1 up to float noise);
    the second comes after an update, so its ratios leave 1 and the clip range acts."""
    args = pg.parse_args(["--model", "tiny", "--resolution", "32", "--sample-steps", "4", "--group-size", "4",
                          "--accum", "4", "--lr", "3e-2", "--clip-range", "1e-4"])
    p, params, opt = fresh(args, lr=3e-2)
    batch = pg.sample_batch(p, ["a red apple", "a blue car"], 0, args, torch.device("cpu"))
    seen, real = [], pg.grpo_loss
    monkeypatch.setattr(pg, "grpo_loss", lambda lp, old, *a: seen.append((lp - old).abs().max().item()) or
                        real(lp, old, *a))
    stats = pg.train_step(p, params, opt, batch, torch.tensor([1.0, -1.0, 0.5, -0.5] * 2), args)
    k = batch["trained"].shape[1]
    assert stats["updates"] == 2 and len(seen) == 2 * k
    assert max(seen[:k]) < 1e-5 and min(seen[k:]) > 1e-4  # on-policy first chunk, off-policy second
    assert stats["clip_frac"] > 0 and stats["ratio_dev"] > 1e-4


def test_zero_advantage_trajectories_get_no_forward_backward(monkeypatch):
    args = pg.parse_args(["--model", "tiny", "--resolution", "32", "--sample-steps", "4", "--group-size", "3",
                          "--accum", "0"])
    p, params, opt = fresh(args)
    batch = pg.sample_batch(p, ["a red apple", "a blue car"], 0, args, torch.device("cpu"))
    sizes, real = [], pg.velocity
    monkeypatch.setattr(pg, "velocity", lambda pipe, x, *a: sizes.append(x.shape[0]) or real(pipe, x, *a))
    stats = pg.train_step(p, params, opt, batch, torch.tensor([0.0, 0.0, 0.0, 1.0, -1.5, 0.5]), args)
    assert sizes == [3] * batch["trained"].shape[1] and stats["updates"] == 1
    sizes.clear()
    before = {k: v.clone() for k, v in p.transformer.named_parameters() if v.requires_grad}
    stats = pg.train_step(p, params, opt, batch, torch.zeros(6), args)
    # no forward/backward, but the update still steps, as officially: AdamW's momentum moves the weights
    assert sizes == [] and stats["updates"] == 1 and stats["grad_norm"] == 0
    assert not all(torch.equal(before[k], v) for k, v in p.transformer.named_parameters() if v.requires_grad)


def test_a_non_finite_loss_or_gradient_norm_raises_before_the_step(monkeypatch):
    args = pg.parse_args(["--model", "tiny", "--resolution", "32", "--sample-steps", "4", "--group-size", "3"])
    p, params, opt = fresh(args)
    batch = pg.sample_batch(p, ["a red apple"], 0, args, torch.device("cpu"))
    before = [q.detach().clone() for q in params]
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        pg.train_step(p, params, opt, batch, torch.tensor([1.0, float("nan"), -1.0]), args)
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and all(q.grad is None for q in params)
    assert not opt.state  # never stepped
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
        pg.train_step(p, params, opt, batch, torch.tensor([1.0, 0.5, -1.0]), args)
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and not opt.state


def test_kl_to_base_zero_untouched_positive_after_an_update_and_its_gradient_reduces_it():
    args = pg.parse_args(["--model", "tiny", "--resolution", "32", "--sample-steps", "4", "--group-size", "3",
                          "--kl-beta", "1", "--accum", "0"])
    p, params, opt = fresh(args)
    batch = pg.sample_batch(p, ["a red apple"], 0, args, torch.device("cpu"))
    idx, steps = torch.arange(3), batch["trained"][:, 0]

    def kl():
        _, mean, std_t = pg.transition(p, batch, idx, steps, args)
        return pg.flow_grpo_kl(mean, pg.base_mean(p, batch, idx, steps, args), std_t).mean()

    assert kl().item() == 0  # LoRA's B starts at zero: the policy is the base model
    stats = pg.train_step(p, params, opt, batch, torch.tensor([1.0, 0.0, -1.0]), args)
    assert stats["kl"] == 0 and stats["updates"] == 1
    before = kl()
    assert before.item() > 0
    before.backward()
    with torch.no_grad():
        for q in params:
            q -= 1e-2 * q.grad
    assert kl().item() < before.item()


# ---------------------------------------------------------------------------------------------------------------------
# Training runs: metrics, checkpoints, resume, SD3
# ---------------------------------------------------------------------------------------------------------------------
def test_one_training_round_changes_weights_and_logs_metrics(tmp_path):
    pg.train(tiny_args(tmp_path, "--train-steps", "1"))
    m = read_metrics(tmp_path)[0]
    for key in ("reward_mean", "reward_group_std", "adv_abs_mean", "zero_adv_groups", "loss", "clip_frac",
                "approx_kl", "grad_norm", "updates", "time_sample", "time_judge", "time_train", "images_per_s",
                "peak_mem_gb", "judge_failed", "judge_requests", "judge_first_preferred"):
        assert key in m, key
    assert m["reward_mean"] == pytest.approx(0.5) and m["judge_requests"] == 6 and m["ratio"] == pytest.approx(1.0)
    assert m["updates"] == 1 and m["grad_norm"] > 0
    assert (tmp_path / "samples" / "step-000001.png").is_file()
    assert (tmp_path / "checkpoints" / "step-000001" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((tmp_path / "args.json").read_text())["accum"] == 0


def test_lora_checkpoint_loads_into_a_stock_flux_pipeline(tmp_path):
    args = tiny_args(tmp_path, "--train-steps", "2", "--lr", "3e-2")
    pg.train(args)
    trained, params, opt = fresh(args)
    pg.load_checkpoint(tmp_path / "checkpoints" / "step-000002", trained, opt, args)
    stock = pg.load_pipeline("tiny", "cpu")
    base = pg.generate_images(stock, ["a red apple"], [1], steps=4, resolution=32)[0]
    stock.load_lora_weights(str(tmp_path / "checkpoints" / "step-000002"))  # diffusers' own loader
    ours = pg.generate_images(trained, ["a red apple"], [1], steps=4, resolution=32)[0]
    theirs = pg.generate_images(stock, ["a red apple"], [1], steps=4, resolution=32)[0]
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int)).max() <= 1
    assert np.abs(np.asarray(base, dtype=int) - np.asarray(theirs, dtype=int)).max() > 1


def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path):
    pg.train(tiny_args(tmp_path / "full", "--train-steps", "4", "--accum", "3"))
    pg.train(tiny_args(tmp_path / "cut", "--train-steps", "2", "--accum", "3"))
    pg.train(pg.parse_args(["--train-steps", "4", "--resume", str(tmp_path / "cut")]))  # other flags: args.json
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(run):
        return [{k: v for k, v in m.items() if not k.startswith(("time", "images_per", "peak", "judge_seconds"))}
                for m in read_metrics(run)]

    assert strip(tmp_path / "full") == strip(tmp_path / "cut")
    saved = json.loads((tmp_path / "cut" / "args.json").read_text())
    assert saved["train_steps"] == 2  # args.json keeps the run's first flags; the change is recorded beside it
    change = json.loads((tmp_path / "cut" / "resumes.jsonl").read_text())
    assert change["step"] == 2 and change["changed"]["train_steps"] == [2, 4]


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    pg.train(tiny_args(tmp_path, "--train-steps", "2"))
    (tmp_path / "checkpoints" / ".tmp-000004").mkdir()  # what a kill mid-write leaves behind
    (tmp_path / "checkpoints" / "step-000006").mkdir()  # no state.json: not a complete checkpoint
    assert pg.find_checkpoint(str(tmp_path)).name == "step-000002"


@pytest.fixture(scope="module")
def sd3_folder(hub_cache):
    return str(snapshot(hub_cache, HUB_IDS["sd3"]))  # the tiny random SD3.5 saved there


@pytest.fixture(scope="module")
def sd3(sd3_folder):
    return pg.load_pipeline(sd3_folder, "cpu")


def test_sd3_deterministic_sampler_with_and_without_cfg_equals_the_stock_sd3_pipeline(sd3):
    noise = pg.initial_noise(sd3, 1, 32, torch.Generator().manual_seed(7))
    ours = {}
    for cfg in (1.0, 4.5):
        ours[cfg] = pg.generate_images(sd3, ["a red apple"], [7], steps=4, resolution=32, cfg_scale=cfg,
                                       max_sequence_length=16)[0]
        stock = sd3(["a red apple"], latents=noise, height=32, width=32, num_inference_steps=4, guidance_scale=cfg,
                    sigmas=list(np.linspace(1.0, 1 / 4, 4)), max_sequence_length=16).images[0]
        assert np.abs(np.asarray(ours[cfg], dtype=int) - np.asarray(stock, dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(ours[1.0]), np.asarray(ours[4.5]))


def test_sd3_on_policy_ratio_is_one_with_cfg(sd3, sd3_folder):
    args = pg.parse_args(["--model", sd3_folder, "--cfg-scale", "4.5", "--resolution", "32", "--sample-steps", "4",
                          "--group-size", "3"])
    batch = pg.sample_batch(sd3, ["a red apple", "a blue car"], 5, args, torch.device("cpu"))
    assert batch["latents"].shape == (6, 5, 4, 16, 16)  # (images, T + 1, C, H, W): SD3 latents stay unpacked
    steps = batch["trained"][:, 0]
    lp, _, _ = pg.transition(sd3, batch, torch.arange(6), steps, args)
    assert torch.allclose(torch.exp(lp - batch["log_probs"][torch.arange(6), steps]), torch.ones(6), atol=1e-5)


def test_sd3_training_round_and_its_lora_loads_into_a_stock_sd3_pipeline(tmp_path, sd3_folder):
    args = tiny_args(tmp_path, "--model", sd3_folder, "--preset", "tiny", "--cfg-scale", "4.5", "--train-steps", "1",
                     "--lr", "3e-2")
    pg.train(args)
    m = read_metrics(tmp_path)[0]
    assert m["ratio"] == pytest.approx(1.0) and m["grad_norm"] > 0 and m["updates"] == 1
    ckpt = tmp_path / "checkpoints" / "step-000001"
    trained = pg.load_pipeline(sd3_folder, "cpu")
    pg.load_checkpoint(ckpt, trained, torch.optim.AdamW(pg.trainable_parameters(trained, args)), args)
    stock = pg.load_pipeline(sd3_folder, "cpu")
    stock.load_lora_weights(str(ckpt))  # StableDiffusion3Pipeline's own loader
    ours = pg.generate_images(trained, ["a red apple"], [1], steps=4, resolution=32)[0]
    theirs = pg.generate_images(stock, ["a red apple"], [1], steps=4, resolution=32)[0]
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(theirs, dtype=int)).max() <= 1


def test_pointwise_baseline_scores_groups_and_fills_failures_with_the_group_mean(tmp_path):
    imgs = [solid(c, 2) for c in [(255, 0, 0), (0, 0, 255), (128, 0, 0), (0, 0, 0)]]
    rewards, info = pg.score_groups(pg.colour_scorer, ["a red car", "a car"], imgs, 2)
    d = [0.0, math.sqrt(2)]
    assert torch.allclose(rewards[0], torch.tensor([1 - d[0] / math.sqrt(3), 1 - d[1] / math.sqrt(3)]))
    assert torch.equal(rewards[1], torch.zeros(2)) and info["judge_failed"] == 2  # no colour named: no score
    result = pg.train(tiny_args(tmp_path, "--train-steps", "1", "--reward", "pointwise", "--eval-seeds", "1"))
    assert read_metrics(tmp_path)[0]["reward_mean"] != pytest.approx(0.5)
    assert 0 <= result["win_rate_final_vs_initial"] <= 1


# ---------------------------------------------------------------------------------------------------------------------
# The real path: hub ids from an offline cache, presets, --eval-every, a copied file on its own
# ---------------------------------------------------------------------------------------------------------------------
def test_paper_setup_with_hub_ids_for_model_judge_and_clip(hub_cache, tmp_path):
    """The paper's run as a user types it, with the real hub ids, served from the offline cache: FLUX.1-dev (full
    fine-tuning), the in-process UnifiedReward-Think judge, the DFN5B CLIP model run as the official reward runs it."""
    (tmp_path / "p.txt").write_text("a red apple\na blue car\n")
    r = run_cli("--preset", "pref-grpo-flux", "--prompts", str(tmp_path / "p.txt"), "--judge-model",
                HUB_IDS["judge"], "--judge-max-tokens", "8", "--resolution", "32", "--sample-steps", "3",
                "--group-size", "3", "--prompts-per-step", "2", "--accum", "3", "--train-steps", "2",
                "--eval-every", "1", "--eval-count", "1", "--eval-seeds", "2", "--max-sequence-length", "16",
                "--output-dir", str(tmp_path / "run"), env=offline_env(hub_cache))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "preset pref-grpo-flux (overridden:" in r.stdout and "--resolution" in r.stdout
    assert "model black-forest-labs/FLUX.1-dev" in r.stdout and "full" in r.stdout
    assert "2 update(s) a round over 3 trajectories each (3 per process)" in r.stdout
    m = read_metrics(tmp_path / "run")
    assert [x["step"] for x in m] == [1, 2] and all("clip_score" in x and "eval_win_rate_vs_initial" in x for x in m)
    assert all(x["updates"] == 2 for x in m)
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["clip_model"] == HUB_IDS["clip"] and args["pref_weight"] == 0.7 and args["clip_weight"] == 1.4
    assert args["resolution"] == 32 and args["full"] and args["judge_order"] == "first" and args["accum"] == 3
    result = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert {"win_rate_final_vs_initial", "clip_score_initial", "clip_score_final"} <= set(result)


def test_sd3_hub_id_loads_from_the_offline_cache(hub_cache, tmp_path):
    (tmp_path / "p.txt").write_text("a red car\na blue bird\n")  # colours: the colour judge gives verdicts
    r = run_cli("--model", HUB_IDS["sd3"], "--judge-fn", "pref_grpo:colour_judge", "--prompts", str(tmp_path / "p.txt"),
                "--resolution", "32", "--sample-steps", "3", "--group-size", "2", "--prompts-per-step", "1",
                "--train-steps", "1", "--eval-seeds", "0", "--max-sequence-length", "16", "--lora-rank", "4",
                "--output-dir", str(tmp_path / "run"), env=offline_env(hub_cache))
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_metrics(tmp_path / "run")[0]["step"] == 1


def test_unknown_or_gated_hub_ids_are_one_line_errors_saying_what_to_do(hub_cache, tmp_path):
    for flags, culprit in [(["--model", "black-forest-labs/FLUX.1-nope", "--judge-fn", "pref_grpo:colour_judge"],
                            "--model"),
                           (["--model", "tiny", "--judge-model", "CodeGoat24/nope"], "--judge-model"),
                           (["--model", "tiny", "--clip-model", "apple/nope", "--clip-weight", "1"], "--clip-model")]:
        r = run_cli(*flags, "--prompts", str(ROOT / "prompts.jsonl"), "--output-dir", str(tmp_path / "r"),
                    env=offline_env(hub_cache))
        one_line_error(r, culprit, "nope", "hf download")
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    def hub_failure(kind, text):  # the hub library's own error classes, without a network round trip
        err = kind.__new__(kind)
        Exception.__init__(err, text)
        return err

    gated = pg.hub_error("black-forest-labs/FLUX.1-dev", hub_failure(GatedRepoError, "Cannot access gated repo"),
                         "--model")
    assert "HF_TOKEN" in gated and "hf auth login" in gated and "\n" not in gated
    missing = pg.hub_error("x/y", hub_failure(RepositoryNotFoundError, "Repository Not Found"), "--model")
    assert "no such repository" in missing


def test_presets_set_the_official_values_and_flags_override_them():
    """The official runs by name, each the global recipe (docs/recipe.md has every value's file and line)."""
    paper = dict(model="black-forest-labs/FLUX.1-dev", full=True, shift=3.0, sample_steps=25, resolution=720, eta=0.7,
                 group_size=8, guidance=3.5, lr=1e-5, weight_decay=1e-4, max_grad_norm=1.0, clip_range=1e-4,
                 adv_clip=5.0, train_fraction=0.6, max_sequence_length=512, kl_beta=0.0, cfg_scale=1.0,
                 same_noise=True, sde_window=0, save_every=20, judge_retries=9,
                 prompts_per_step=64, accum=256, train_steps=471,  # 64 x 8 a round, 2 updates, 3 x 157 rounds
                 train_batch_size=1,  # one trajectory per forward, as there (and memory-safe for a 12B model)
                 clip_model="apple/DFN5B-CLIP-ViT-H-14-378", clip_as_trained=False, pref_weight=0.7, clip_weight=1.4,
                 judge_model="UnifiedReward", judge_prompt="unifiedreward-think", judge_max_tokens=2048,
                 judge_order="first", judge_timeout=300.0, rationorm=False, gdpo=False)
    head = {**paper, "pref_weight": 0.4, "clip_weight": 0.6, "rationorm": True, "gdpo": True, "judge_max_tokens": 4096,
            "judge_prompt": "unifiedreward-think-qwen3vl", "judge_timeout": 160.0}
    head_lora = {**head, "full": False, "lora_rank": 64, "lora_alpha": 128.0}
    for name, official in [("pref-grpo-flux", paper), ("pref-grpo-flux-head", head),
                           ("pref-grpo-flux-head-lora", head_lora)]:
        a = pg.parse_args(["--preset", name])
        assert {k: getattr(a, k) for k in official} == official, name
    lora = pg.parse_args(["--preset", "pref-grpo-flux-head-lora", "--lr", "2e-5", "--no-gdpo"])
    assert (lora.lr, lora.gdpo, lora.rationorm) == (2e-5, False, True)
    assert "pref-grpo-flux-lora" not in pg.PRESETS  # no official run has those values alone
    assert pg.parse_args(["--model", "tiny"]).preset == "tiny" and pg.parse_args(["--model", "x/y"]).preset is None


def test_copied_alone_the_script_trains_against_a_judge_server_and_in_process(server, hub_cache, tmp_path):
    alone = tmp_path / "project"
    alone.mkdir()
    shutil.copy(ROOT / "pref_grpo.py", alone)
    srv = server()
    flags = ["--model", "tiny", "--resolution", "32", "--sample-steps", "3", "--group-size", "2",
             "--prompts-per-step", "1", "--train-steps", "1", "--eval-seeds", "0"]
    r = run_cli(*flags, "--judge-url", srv.url, "--judge-model", MODEL, "--output-dir", str(alone / "a"), cwd=alone,
                script=alone / "pref_grpo.py")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(srv.payloads) == 1 and read_metrics(alone / "a")[0]["judge_requests"] == 1
    r = run_cli(*flags, "--judge-model", HUB_IDS["judge"], "--judge-max-tokens", "8", "--output-dir",
                str(alone / "b"), cwd=alone, script=alone / "pref_grpo.py", env=offline_env(hub_cache))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("--output-dir", str(alone / "c"), cwd=alone, script=alone / "pref_grpo.py")  # the demo needs its world
    one_line_error(r, "toy_world.py")


def test_a_plain_run_prints_no_library_warnings_and_help_is_grouped(tmp_path):
    r = run_cli(*tiny_flags(tmp_path, "--train-steps", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    for noise in ("torchvision", "deprecated", "Warning", "warn("):
        assert noise not in r.stderr, r.stderr
    h = run_cli("--help")
    for group in ("model and data:", "sampling:", "judge:", "advantages and loss:", "optimisation:",
                  "logging and checkpoints:"):
        assert group in h.stdout
    assert "{balanced,both,first}" in h.stdout and "(default: 0.7)" in h.stdout


def test_wandb_logs_each_round_when_asked_and_is_never_needed_otherwise(tmp_path):
    stand_in = tmp_path / "site" / "wandb.py"
    stand_in.parent.mkdir()
    stand_in.write_text(
        "import json, os\nLOG = os.environ['WANDB_STAND_IN_LOG']\n"
        "def _rec(*a, **k):\n    open(LOG, 'a').write(json.dumps({'a': [str(x) for x in a], 'k': sorted(k)}) + '\\n')\n"
        "def init(**k): _rec('init', **k)\n"
        "def log(d, step=None): _rec('log', step, **d)\n"
        "def finish(): _rec('finish')\n"
        "class Image:\n    def __init__(self, path): self.path = path\n")
    env = {**os.environ, "PYTHONPATH": str(stand_in.parent), "WANDB_STAND_IN_LOG": str(tmp_path / "calls.jsonl")}
    r = run_cli(*tiny_flags(tmp_path / "run", "--train-steps", "2", "--eval-seeds", "1", "--eval-count", "1",
                            "--wandb-project", "demo"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    logs = [c for c in calls if c["a"][0] == "log"]
    assert calls[0]["a"] == ["init"] and calls[-1]["a"] == ["finish"]
    assert [c["a"][1] for c in logs[:2]] == ["1", "2"] and "reward_mean" in logs[0]["k"] and "samples" in logs[0]["k"]
    assert "before_after" in logs[-1]["k"]
    stand_in.write_text("raise ImportError('No module named wandb')\n")  # as if it were not installed
    r = run_cli(*tiny_flags(tmp_path / "run2", "--wandb-project", "demo"), env=env)
    one_line_error(r, "--wandb-project", "pip install wandb")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the flag or file, and nothing lost
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (["--sample-steps", "0"], "--sample-steps"), (["--prompts-per-step", "-1"], "--prompts-per-step"),
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--save-every", "0"], "--save-every"),
    (["--train-steps", "-5"], "--train-steps"), (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--group-size", "1"], "--group-size"), (["--eta", "0"], "--eta"), (["--train-fraction", "1.5"],
                                                                         "--train-fraction"),
    (["--lora-rank", "0"], "--lora-rank"), (["--reward", "best"], "--reward"), (["--judge-order", "x"],
                                                                                 "--judge-order"),
    (["--preset", "nope"], "--preset"), (["--device", "cuda:7"], "--device"), (["--device", "gpu0"], "--device"),
    (["--sde-window", "8"], "--sde-window"), (["--full", "--kl-beta", "0.1"], "--kl-beta"),
    (["--clip-weight", "1"], "--clip-weight"), (["--group-size", "three"], "--group-size"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(flags, needle, capsys):
    with pytest.raises(SystemExit) as err:
        pg.parse_args(["--model", "tiny", "--sample-steps", "8", *flags])
    message = str(err.value.code)
    assert err.value.code != 0 and message.startswith("error: ") and needle in message and "\n" not in message


def test_bad_inputs_on_the_command_line(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (tmp_path / "empty.txt").write_text("\n\n")
    for flags, needles in [(["--prompts", str(tmp_path / "nope.txt")], ["--prompts", "does not exist"]),
                           (["--prompts", str(tmp_path / "bin.txt")], ["bin.txt", "not a UTF-8 text file"]),
                           (["--prompts", str(tmp_path / "empty.txt")], ["no prompts"]),
                           (["--model", str(tmp_path / "no" / "model")], ["--model", "no such folder"]),
                           (["--resolution", "17"], ["--resolution", "multiple of 4"]),
                           (["--sample-steps", "0"], ["--sample-steps"])]:
        r = run_cli("--model", "tiny", *flags, "--output-dir", str(tmp_path / "run"))
        one_line_error(r, *needles)


def test_an_output_dir_holding_a_run_is_refused_without_resume(tmp_path):
    pg.train(tiny_args(tmp_path, "--train-steps", "1"))
    with pytest.raises(SystemExit, match="already holds a run; continue it with --resume"):
        pg.train(tiny_args(tmp_path, "--train-steps", "2"))
    assert len(read_metrics(tmp_path)) == 1


def test_damaged_or_mismatched_checkpoints_are_one_line_errors(tmp_path):
    pg.train(tiny_args(tmp_path / "run", "--train-steps", "2"))
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    for flags, needle in [(["--lora-rank", "8"], "--lora-rank"), (["--seed", "3"], "--seed"),
                          (["--group-size", "4"], "--group-size"), (["--full"], "--full")]:
        with pytest.raises(SystemExit, match=f"{needle} .* does not fit the checkpoint") as err:
            pg.train(pg.parse_args(["--resume", str(tmp_path / "run"), "--train-steps", "3", *flags]))
        assert "\n" not in str(err.value)
    (ckpt / "pytorch_lora_weights.safetensors").write_bytes(b"truncated")
    with pytest.raises(SystemExit, match="step-000002 cannot be loaded"):
        pg.train(pg.parse_args(["--resume", str(tmp_path / "run"), "--train-steps", "3"]))
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(SystemExit, match="state.json is damaged"):
        pg.train(pg.parse_args(["--resume", str(ckpt), "--train-steps", "3"]))
    assert len(read_metrics(tmp_path / "run")) == 2  # nothing was written by the refused runs


def wait_for(predicate, timeout=240, step=0.2):
    end = time.time() + timeout
    while time.time() < end:
        with contextlib.suppress(ValueError):  # a line being written
            if predicate():
                return True
        time.sleep(step)
    return False


def test_kill_9_then_resume_logs_each_round_exactly_once(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "pref_grpo.py", *tiny_flags(run, "--train-steps", "7", "--sample-every",
                                                                          "9")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:  # killed as soon as an odd round is logged: its checkpoint (every 2 rounds) is not written yet
        assert wait_for(lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) in (3, 5), step=0.005)
    finally:
        proc.kill()
        proc.wait()
    assert len(read_metrics(run)) > int(pg.find_checkpoint(str(run)).name.removeprefix("step-"))
    r = run_cli("--resume", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6, 7]


def test_ctrl_c_saves_the_last_finished_round_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "pref_grpo.py", *tiny_flags(run, "--train-steps", "50", "--save-every",
                                                                          "50")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    done = len(read_metrics(run))
    assert proc.returncode == 130 and "Traceback" not in err and f"--resume {run}" in err
    assert pg.find_checkpoint(str(run)).name == f"step-{done:06d}"


def test_train_gives_a_calling_program_its_own_ctrl_c_handler_back(tmp_path):
    def mine(*_):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, mine)
    try:
        pg.train(tiny_args(tmp_path, "--train-steps", "1"))
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, before)


def test_sampling_in_smaller_batches_gives_the_same_round():
    """--sample-batch-size splits a round into batches of whole groups (memory): every group keeps its own noise, so
    the trajectories, log-probs and rationorm's means are the round's, whatever the batch."""
    flags = ["--model", "tiny", "--resolution", "32", "--sample-steps", "4", "--group-size", "3", "--rationorm"]
    pipe = pg.load_pipeline("tiny", "cpu")
    whole, split = (pg.sample_batch(pipe, ["a red car", "a red boat", "a red bird"], 5, pg.parse_args(flags + extra),
                                    torch.device("cpu")) for extra in ([], ["--sample-batch-size", "4"]))
    for key in ("latents", "log_probs", "x0", "means"):
        assert whole[key].shape == split[key].shape and torch.allclose(whole[key], split[key], atol=1e-5), key
    assert torch.equal(whole["trained"], split["trained"])
