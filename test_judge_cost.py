"""The judge's order schedule and position-bias metrics, as the trainer runs them: requests recorded at an
OpenAI-compatible server on 127.0.0.1 while `pref_grpo.judge_groups` runs with the judge `pref_grpo.make_judge` builds
from the trainer's flags. Each image of a group is a solid colour, so the server can tell which image came first."""

import base64
import io
import json
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import pref_grpo as pg
from conftest import JSONHandler, LocalServer

PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 255, 255)]  # image i of a group is PALETTE[i]: far apart, so JPEG cannot confuse them


def colour_index(data_url: str) -> int:
    assert data_url.startswith("data:image/jpeg;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    assert image.format == "JPEG"
    mean = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
    return int(np.argmin([np.linalg.norm(mean - np.array(c)) for c in PALETTE]))


class Recorder:
    """A server that records, per request, (caption text, index of image 1, index of image 2, payload) and answers
    with `policy`: "index" (the higher palette index is better: a consistent judge) or "first" (always Image 1)."""

    def __init__(self, policy: str = "index"):
        self.policy, self.requests, self.lock = policy, [], threading.Lock()
        recorder = self

        class Handler(JSONHandler):
            def reply(self, obj):
                self.send_json(200, obj)

            def do_GET(self):
                self.reply({"data": [{"id": "UnifiedReward"}]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = payload["messages"][0]["content"]
                first, second = (colour_index(c["image_url"]["url"]) for c in content[:2])
                with recorder.lock:
                    recorder.requests.append((content[2]["text"], first, second, payload))
                better = 1 if recorder.policy == "first" or first > second else 2
                text = (f"<think>\nImage 1: {first}, Image 2: {second}\n</think>\n"
                        f"<answer>Image {better} is better</answer>")
                self.reply({"choices": [{"message": {"role": "assistant", "content": text}}],
                            "usage": {"completion_tokens": 20}})

        self.local = LocalServer(Handler)
        self.url, self.close = self.local.url, self.local.close


@pytest.fixture
def server():
    servers = []

    def start(policy="index"):
        servers.append(Recorder(policy))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def trainer_judge(url: str, *flags: str):
    args = pg.parse_args(["--judge-url", url, "--judge-model", "UnifiedReward", "--model", "tiny", *flags])
    return args, pg.make_judge(args)


def group_images(groups: int) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), c) for _ in range(groups) for c in PALETTE]


def judge_round(server, policy="index", groups=1, flags=()):
    """One call of judge_groups as train() makes it, with the flags' order; returns (args, pref, info, requests)."""
    s = server(policy)
    args, judge = trainer_judge(s.url, *flags)
    prompts = [f"a caption number {g}" for g in range(groups)]
    pref, info = pg.judge_groups(judge, prompts, group_images(groups), args.group_size, args.judge_order)
    return args, pref, info, s.requests


def test_default_order_a_group_of_8_makes_28_requests_each_image_first_3_or_4_times(server):
    args, pref, info, reqs = judge_round(server)
    assert args.judge_order == "balanced" and args.group_size == 8
    assert len(reqs) == info["judge_requests"] == 28 and info["judge_failed"] == 0
    shown = [(a, b) for _, a, b, _ in reqs]
    assert sorted(tuple(sorted(p)) for p in shown) == [(i, j) for i in range(8) for j in range(i + 1, 8)]  # once each
    firsts = Counter(a for a, _ in shown)
    assert sorted(firsts) == list(range(8)) and set(firsts.values()) == {3, 4}
    assert sorted(firsts.values()) == [3] * 4 + [4] * 4
    # a consistent judge: win rate = rank / (G - 1), whatever the order shown
    assert pg.win_rates(pref)[0].tolist() == pytest.approx([i / 7 for i in range(8)])


def test_first_order_is_the_official_one_and_both_orders_cost_twice(server):
    _, pref_first, info, reqs = judge_round(server, flags=("--judge-order", "first"))
    shown = [(a, b) for _, a, b, _ in reqs]
    assert len(shown) == info["judge_requests"] == 28 and all(a < b for a, b in shown)  # lower index first
    assert Counter(a for a, _ in shown) == {i: 7 - i for i in range(7)}  # image 0 first in all 7, image 7 in none
    _, pref_both, info, reqs = judge_round(server, flags=("--judge-order", "both"))
    shown = [(a, b) for _, a, b, _ in reqs]
    assert len(shown) == info["judge_requests"] == 56
    assert sorted(shown) == [(i, j) for i in range(8) for j in range(8) if i != j]  # every ordered pair once
    assert info["judge_order_disagree"] == 0  # a consistent judge never changes its mind with the order
    for pref in (pref_first, pref_both):
        assert pg.win_rates(pref)[0].tolist() == pytest.approx([i / 7 for i in range(8)])


def test_each_request_is_unifiedreward_thinks_own_prompt_after_the_two_images(server):
    args, _, _, reqs = judge_round(server)
    text, _, _, payload = reqs[0]
    assert text == pg.judge_text("a caption number 0")
    assert [c["type"] for c in payload["messages"][0]["content"]] == ["image_url", "image_url", "text"]
    assert payload["model"] == "UnifiedReward" and payload["max_tokens"] == args.judge_max_tokens == 2048


@pytest.mark.parametrize("order", ["first", "balanced", "both"])
def test_a_judge_that_always_picks_image_1_shows_as_first_preferred_1_in_every_order(server, order):
    _, pref, info, reqs = judge_round(server, "first", flags=("--judge-order", order))
    assert info["judge_first_preferred"] == 1.0
    w = pg.win_rates(pref)[0]
    if order == "both":
        assert info["judge_order_disagree"] == 1.0 and w.tolist() == pytest.approx([0.5] * 8)  # fully cancelled
    else:  # each pair once: an image wins exactly the comparisons where it is shown first
        firsts = Counter(a for _, a, _, _ in reqs)
        assert w.tolist() == pytest.approx([firsts[i] / 7 for i in range(8)])
        assert "judge_order_disagree" not in info  # measured only with both orders


def biased_judge(bias: float, seed: int = 0):
    """Hard verdicts, P(first wins) = clip(sigmoid(q_first - q_second) + bias, 0, 1); the images are qualities."""
    rng = np.random.default_rng(seed)

    def judge(prompts, firsts, seconds):
        p = 1 / (1 + np.exp(-(np.array(firsts) - np.array(seconds))))
        return (rng.random(len(p)) < np.clip(p + bias, 0, 1)).astype(float).tolist(), {}

    return judge


@pytest.mark.parametrize("order", ["first", "balanced", "both"])
@pytest.mark.parametrize("bias", [0.0, 0.1, 0.2])
def test_judge_first_preferred_reflects_the_bias_in_every_order(order, bias):
    groups = 300
    q = np.random.default_rng(1).standard_normal(groups * 8).tolist()
    _, info = pg.judge_groups(biased_judge(bias), [""] * groups, q, 8, order)
    # images of a group are exchangeable, so 0.5 + bias, less what clipping at 1 takes off (small for bias <= 0.2)
    assert info["judge_first_preferred"] == pytest.approx(0.5 + bias, abs=0.03)
    assert ("judge_order_disagree" in info) == (order == "both")


def test_judge_order_disagree_is_right_for_several_groups_in_one_call():
    def consistent(prompts, firsts, seconds):
        return [float(a > b) for a, b in zip(firsts, seconds)], {}

    _, info = pg.judge_groups(consistent, ["", ""], list(range(8)) * 2, 8, "both")
    assert info["judge_order_disagree"] == 0.0


def test_the_order_simulation_of_a_balanced_schedule_matches_its_arithmetic():
    """A hard judge with bias b: `first` shifts image i's win rate by about b (G - 1 - 2i) / (G - 1), `balanced` by
    +-b / (G - 1), `both` by 0 (exact numbers of the expected preferences, no sampling)."""
    G, b = 8, 0.1
    q = torch.zeros(G)  # equal qualities: P(first) = 0.5 + b exactly
    for order, expect in (("first", [b * (G - 1 - 2 * i) / (G - 1) for i in range(G)]),
                          ("balanced", [b * (2 * c - (G - 1)) / (G - 1) for c in
                                        [sum(a == i for a, _ in pg.pair_schedule(G, "balanced")) for i in range(G)]]),
                          ("both", [0.0] * G)):
        def expected(prompts, firsts, seconds):
            return [0.5 + b] * len(firsts), {}

        pref, _ = pg.judge_groups(expected, [""], q.tolist(), G, order)
        assert (pg.win_rates(pref)[0] - 0.5).tolist() == pytest.approx(expect, abs=1e-6)


def test_trainer_says_at_start_that_order_disagreement_needs_both_orders(tmp_path, capsys):
    for order in ("balanced", "both"):
        args = pg.parse_args(["--model", "tiny", "--train-steps", "1", "--eval-seeds", "0", "--prompts-per-step", "1",
                              "--group-size", "4", "--resolution", "16", "--sample-steps", "2", "--judge-order", order,
                              "--output-dir", str(tmp_path / order), "--device", "cpu"])
        pg.train(args)
        out = capsys.readouterr().out
        metrics = json.loads((tmp_path / order / "metrics.jsonl").read_text().splitlines()[0])
        assert metrics["judge_requests"] == (12 if order == "both" else 6)
        assert "judge_first_preferred" in metrics
        assert ("judge_order_disagree is measured only with --judge-order both" in out) == (order != "both")
        assert ("judge_order_disagree" in metrics) == (order == "both")
