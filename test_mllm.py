"""Tests of mllm.py: a scripted OpenAI-compatible server on 127.0.0.1 (real sockets), a tiny random Qwen2.5-VL."""

import base64
import io
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

import mllm

WHITE, GRAY, RED, BLACK = (250, 250, 250), (128, 128, 128), (200, 30, 30), (5, 5, 5)
MODEL = "UnifiedReward"


def solid(color, size=64):
    return Image.new("RGB", (size, size), color)


def chat_reply(text=None, logprobs=None):
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"object": "chat.completion", "choices": [choice]}


def verdict_text(better):
    return f"<think>\n1. Semantic consistency: ...\nTotal: ...\n</think>\n<answer>Image {better} is better</answer>"


def brighter_wins(caption, first, second, payload):
    """A consistent judge: the brighter image is better, whichever position it is shown in."""
    return chat_reply(verdict_text(1 if sum(first) > sum(second) else 2))


class ScriptedServer:
    """An OpenAI-compatible endpoint whose replies are scripted per (caption, color of the first image).

    `reply(caption, first, second, payload)` answers normal requests; `script[(caption, first)]` is a list of
    faults consumed one per request first: "garbage", "500", "400", "slow", "drop", or a literal reply string.
    The server is hostile on purpose: fault replies echo the Authorization header back."""

    def __init__(self, reply=brighter_wins, models=(MODEL,), required_key=None, slow_s=1.5):
        self.reply, self.models, self.required_key, self.slow_s = reply, list(models), required_key, slow_s
        self.script, self.auth, self.payloads, self.lock = {}, [], [], threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_json(self, code, obj, reason=None):
                body = (obj if isinstance(obj, bytes) else json.dumps(obj).encode())
                self.send_response(code, reason)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                auth = self.headers.get("Authorization", "")
                with server.lock:
                    server.auth.append(auth)
                if server.required_key and auth != f"Bearer {server.required_key}":
                    return self.send_json(401, {"error": f"bad key {auth}"}, reason=f"Unauthorized {auth}")
                self.send_json(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in server.models]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization", "")
                content = payload["messages"][0]["content"]
                text = content[-1]["text"]
                caption = text.rsplit("[", 1)[-1].rstrip("]")
                colors = [decode_color(c["image_url"]["url"]) for c in content if c["type"] == "image_url"]
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
                    self.close_connection = True  # read the request, close without a word
                    return
                if fault == "slow":
                    time.sleep(server.slow_s)
                if isinstance(fault, str) and fault not in ("slow",):
                    return self.send_json(200, chat_reply(fault))
                try:
                    self.send_json(200, server.reply(caption, first, second, payload))
                except OSError:
                    pass  # the client gave up on a slow reply

        ThreadingHTTPServer.request_queue_size = 64  # the default backlog of 5 can drop concurrent connections
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def decode_color(data_url):
    assert data_url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    assert image.size == (mllm.JUDGE_IMAGE_SIZE, mllm.JUDGE_IMAGE_SIZE)
    return image.convert("RGB").getpixel((0, 0))


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
    monkeypatch.setattr(mllm, "RETRY_BACKOFF_S", 0.01)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("reply, expected", [
    (verdict_text(1), 1.0),
    (verdict_text(2), 0.0),
    ("<answer>Image 2 is better</answer>", 0.0),                         # reasoning split off by the server
    ("<think>\nok\n</think>\n<answer>  Image 1 is better\n</answer>\n", 1.0),  # whitespace is not content
    ("<think>x</think><answer>image 1 is better</answer>", None),         # other casing
    ("<think>x</think><answer>IMAGE 2 IS BETTER</answer>", None),
    ("<think>x</think><answer>Image 1 is better.</answer>", None),        # extra text inside
    ("<think>x</think><answer>Image 1 is better, clearly</answer>", None),
    ("<think>x</think><answer>Both images are equally good</answer>", None),
    ("<think>x</think>Image 1 is better", None),                           # answer outside <answer>
    ("<think>x</think><answer>Image 1 is better", None),                  # unclosed tag
    ("<think>x</think>Image 1 is better</answer>", None),
    ("<think>x <answer>Image 1 is better</answer></think>", None),        # answer inside the reasoning
    ("<think>never closed <answer>Image 1 is better</answer>", None),
    ("<think>x</think><answer>Image 1 is better</answer> Image 2 is better", None),  # text after the answer
    ("<think>x</think><answer>Image 1 is better</answer><answer>Image 2 is better</answer>", None),  # both
    ("<think>x</think><answer>Image 1 is better Image 2 is better</answer>", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(reply, expected):
    assert mllm.parse_verdict(reply) == expected


def test_combine_orders():
    probs, disagree, both = mllm._combine_orders([1.0, None, None, 0.3, 0.8], [0.0, 1.0, None, 0.6, 0.7])
    assert probs[:3] == [1.0, 0.0, None]  # one order failed: the other decides; both failed: None
    assert probs[3] == pytest.approx((0.3 + 0.4) / 2) and probs[4] == pytest.approx((0.8 + 0.3) / 2)
    assert (disagree, both) == (1, 3)  # pair 4 prefers A shown first and B shown first


# ------------------------------------------------------------------------------------------------ server back end

PAIRS = [("a white cat", WHITE, BLACK), ("a red fox", RED, GRAY), ("gray sky", GRAY, BLACK), ("night", BLACK, WHITE)]


def expected_brighter(a, b):
    return 1.0 if sum(a) > sum(b) else 0.0


def run_judge(judge, pairs):
    return judge([p for p, _, _ in pairs], [solid(a) for _, a, _ in pairs], [solid(b) for _, _, b in pairs])


def test_server_both_orders_consistent_judge(server):
    srv = server()
    probs, info = run_judge(mllm.make_pairwise_judge(MODEL, srv.url, workers=4), PAIRS)
    assert probs == [expected_brighter(a, b) for _, a, b in PAIRS]
    assert info["judge_pairs"] == 4 and info["judge_requests"] == 8 and len(srv.payloads) == 8
    assert info["judge_failed"] == info["judge_invalid"] == info["judge_retries"] == 0
    assert info["judge_order_disagree"] == 0.0 and info["judge_first_preferred"] == 0.5
    assert all(len(p["messages"][0]["content"]) == 3 for p in srv.payloads)  # two images, then the text
    assert srv.payloads[0]["messages"][0]["content"][2]["type"] == "text"


def test_server_position_bias_cancels(server):
    srv = server(reply=lambda *args: chat_reply(verdict_text(1)))  # always prefers whatever is shown first
    probs, info = run_judge(mllm.make_pairwise_judge(MODEL, srv.url), PAIRS)
    assert probs == [0.5] * 4
    assert info["judge_order_disagree"] == 1.0 and info["judge_first_preferred"] == 1.0
    probs, info = run_judge(mllm.make_pairwise_judge(MODEL, srv.url, both_orders=False), PAIRS)
    assert probs == [1.0] * 4 and info["judge_requests"] == 4  # one order only: the bias goes straight through


def test_server_faults_retries_and_failures(server):
    srv = server(slow_s=1.5)
    pairs = [(f"p{i}", a, b) for i, (a, b) in enumerate(
        [(WHITE, BLACK), (GRAY, BLACK), (BLACK, RED), (RED, WHITE), (WHITE, GRAY),
         (GRAY, RED), (RED, BLACK), (BLACK, GRAY), (WHITE, RED)])]
    srv.script = {
        ("p1", GRAY): ["garbage"],                     # retried once
        ("p2", BLACK): ["500", "500"],                 # retried twice
        ("p3", RED): ["slow"],                         # times out, retried once
        ("p4", WHITE): ["drop"],                       # dropped connection, retried once
        ("p5", GRAY): ["500"] * 4,                     # order (A, B) fails for good (3 retries): (B, A) decides
        ("p6", RED): ["500"] * 4, ("p6", BLACK): ["500"] * 4,  # both orders fail -> None
        ("p7", BLACK): ["400"],                        # rejected: no retry; (B, A) decides
        ("p8", WHITE): ["Image 1 is better"],          # off-format reply: no retry, counted as invalid
    }
    judge = mllm.make_pairwise_judge(MODEL, srv.url, workers=4, timeout=0.5, retries=3)
    start = time.perf_counter()
    probs, info = run_judge(judge, pairs)
    assert time.perf_counter() - start < 20
    assert probs == [None if p == "p6" else expected_brighter(a, b) for p, a, b in pairs]
    assert info["judge_retries"] == 1 + 2 + 1 + 1 + 3 + 3 + 3
    assert info["judge_failed"] == 1 and info["judge_invalid"] == 5
    assert info["judge_order_disagree"] == 0.0
    probs, info = run_judge(judge, pairs)  # the scripts are used up: the server recovered, so does the judge
    assert probs == [expected_brighter(a, b) for _, a, b in pairs] and info["judge_retries"] == 0


def test_server_chat_order_and_stats(server):
    srv = server(reply=lambda caption, *args: chat_reply(f"echo {caption}"))
    srv.script = {("b", None): ["500"] * 3, ("c", None): ["garbage"]}
    requests = [(f"[{t}]", []) for t in "abcd"]
    replies, stats = mllm.server_chat(requests, srv.url, MODEL, workers=3, retries=2, timeout=5)
    assert replies == ["echo a", None, "echo c", "echo d"]
    assert stats == {"requests": 4, "failed": 1, "retries": 2 + 1}
    assert all(p["temperature"] == 0.0 and p["max_tokens"] == 1024 for p in srv.payloads)


def test_server_down_at_start_is_one_clear_error():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(RuntimeError) as err:
        mllm.check_server(url, timeout=2)
    assert url in str(err.value) and "\n" not in str(err.value) and "not reachable" in str(err.value)
    with pytest.raises(RuntimeError, match="not reachable"):
        mllm.make_pairwise_judge(MODEL, url)


def test_server_wrong_model_is_one_clear_error(server):
    srv = server(models=["something-else"])
    with pytest.raises(RuntimeError, match="does not serve model 'UnifiedReward'.*something-else"):
        mllm.make_pairwise_judge(MODEL, srv.url)


def test_api_key_sent_as_bearer_and_never_shown(server, monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("JUDGE_KEY", secret)
    srv = server(required_key=secret)
    probs, _ = run_judge(mllm.make_pairwise_judge(MODEL, srv.url, api_key_env="JUDGE_KEY"), PAIRS[:2])
    assert probs == [expected_brighter(a, b) for _, a, b in PAIRS[:2]]
    assert srv.auth and set(srv.auth) == {f"Bearer {secret}"}  # /models and every chat request

    # Failures whose replies echo the header back: the key must not reach the logs.
    judge = mllm.make_pairwise_judge(MODEL, srv.url, api_key_env="JUDGE_KEY", retries=1)
    for fault in ("500", "garbage"):
        srv.script = {("night", BLACK): [fault] * 2, ("night", WHITE): [fault] * 2}
        with caplog.at_level(logging.WARNING, logger="mllm"):
            probs, info = run_judge(judge, PAIRS[3:])
        assert probs == [None] and info["judge_failed"] == 1
    assert "HTTP 500" in caplog.text and "JSONDecodeError" in caplog.text and secret not in caplog.text

    # A wrong key: one line, names the variable, never its value (the server echoes the key it got).
    monkeypatch.setenv("WRONG_KEY", "sk-wrong-fedcba9876543210")
    with pytest.raises(RuntimeError) as err:
        mllm.check_server(srv.url, api_key_env="WRONG_KEY")
    message = str(err.value)
    assert "401" in message and "$WRONG_KEY" in message and "\n" not in message
    assert "sk-wrong" not in message and secret not in message


def logprob_entries(pairs):
    return [{"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in pairs]


# P(token) after the prefill, scripted by which image is shown first: white is preferred 0.6 vs 0.2 when first,
# and 0.3 vs 0.5 when second, so P_AB = 0.75, P_BA = 0.3 / 0.8 = 0.375 and P = (0.75 + 0.625) / 2 = 0.6875.
DIGIT_PROBS = {WHITE: (0.6, 0.2), BLACK: (0.3, 0.5)}


def logits_reply(trimmed):
    def reply(caption, first, second, payload):
        p1, p2 = DIGIT_PROBS[first]
        step = {"token": "1" if p1 > p2 else "2", "logprob": math.log(max(p1, p2)),
                "top_logprobs": logprob_entries([("1", p1), ("2", p2), ("The", 0.05)])}
        steps = [step]
        if trimmed:  # the server dropped the prefill's trailing space: the model writes it first
            steps = [{"token": " ", "logprob": math.log(0.97),
                      "top_logprobs": logprob_entries([(" ", 0.97), ("1", 0.01), ("s", 0.01)])}, step]
        return chat_reply(steps[0]["token"] + (steps[1]["token"] if trimmed else ""), steps)
    return reply


@pytest.mark.parametrize("trimmed", [False, True])
def test_server_logits_mode(server, trimmed):
    srv = server(reply=logits_reply(trimmed))
    judge = mllm.make_pairwise_judge(MODEL, srv.url, mode="logits")
    probs, info = judge(["a white cat"], [solid(WHITE)], [solid(BLACK)])
    assert probs[0] == pytest.approx((0.75 + 1 - 0.375) / 2, abs=1e-12)
    assert info["judge_order_disagree"] == 0.0  # both orders prefer the white image
    assert info["judge_answer_mass"] == pytest.approx((0.8 + 0.8) / 2)
    for p in srv.payloads:
        assert p["messages"][-1] == {"role": "assistant", "content": mllm.LOGITS_PREFIX}
        assert p["continue_final_message"] is True and p["add_generation_prompt"] is False
        assert p["logprobs"] is True and p["top_logprobs"] >= 2 and p["max_tokens"] <= 2


def test_server_logits_mode_without_logprobs_fails_softly(server):
    srv = server(reply=lambda *args: chat_reply("1"))  # an endpoint that ignores the log-prob request
    probs, info = mllm.make_pairwise_judge(MODEL, srv.url, mode="logits")(["x"], [solid(WHITE)], [solid(BLACK)])
    assert probs == [None] and info["judge_invalid"] == 2 and info["judge_retries"] == 0


# ------------------------------------------------------------------------------------------- in-process back end

@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and on busy shared cores they thrash
    yield mllm.tiny_vlm(seed=0)
    torch.set_num_threads(threads)


LOCAL_PROMPTS = ["a cat", "two dogs playing on a long red sofa in the sun", "x", "a blue house"]
LOCAL_A = [solid(RED), solid(WHITE), solid(GRAY), solid((20, 90, 200))]
LOCAL_B = [solid(BLACK), solid((30, 160, 60)), solid(WHITE), solid(RED)]


def test_local_logits_batching_and_order_symmetry(tiny):
    judge = mllm.make_pairwise_judge("tiny", mode="logits", vlm=tiny, batch_size=8)
    probs, info = judge(LOCAL_PROMPTS, LOCAL_A, LOCAL_B)
    assert all(0.0 < p < 1.0 for p in probs) and info["judge_failed"] == 0
    assert 0.0 < info["judge_answer_mass"] <= 1.0
    one_at_a_time, _ = mllm.make_pairwise_judge("tiny", mode="logits", vlm=tiny, batch_size=1)(
        LOCAL_PROMPTS, LOCAL_A, LOCAL_B)
    assert one_at_a_time == pytest.approx(probs, abs=1e-5)  # left padding changes nothing
    swapped, _ = judge(LOCAL_PROMPTS, LOCAL_B, LOCAL_A)
    assert [p + q for p, q in zip(probs, swapped)] == pytest.approx([1.0] * 4, abs=1e-5)

    single = mllm.make_pairwise_judge("tiny", mode="logits", vlm=tiny, both_orders=False)
    p_ab, _ = single(LOCAL_PROMPTS, LOCAL_A, LOCAL_B)
    p_ba, _ = single(LOCAL_PROMPTS, LOCAL_B, LOCAL_A)
    assert max(abs(x + y - 1) for x, y in zip(p_ab, p_ba)) > 1e-3  # one order alone is position-biased ...
    assert probs == pytest.approx([(x + 1 - y) / 2 for x, y in zip(p_ab, p_ba)], abs=1e-5)  # ... the average not
    assert len(set(round(p, 4) for p in p_ab)) > 1  # the answer depends on the inputs


def test_local_generate_batched_equals_single(tiny):
    requests = [(f"Describe pair {i}: {p}", [a, b])
                for i, (p, a, b) in enumerate(zip(LOCAL_PROMPTS, LOCAL_A, LOCAL_B))]
    requests.append(("No image at all, just text.", []))
    batched = mllm.local_chat(tiny, requests, max_tokens=6, batch_size=3)  # the 2nd batch mixes in a text-only one
    single = mllm.local_chat(tiny, requests, max_tokens=6, batch_size=1)
    assert batched == single and all(isinstance(r, str) and r for r in batched)
    # A random model cannot produce the verdict format: every judgment fails, nothing raises.
    probs, info = mllm.make_pairwise_judge("tiny", mode="generate", vlm=tiny, max_tokens=6)(
        LOCAL_PROMPTS[:2], LOCAL_A[:2], LOCAL_B[:2])
    assert probs == [None, None] and info["judge_failed"] == 2 and info["judge_invalid"] == 4


def test_load_local_vlm_roundtrip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    loaded = mllm.load_local_vlm(str(tmp_path), device="cpu")
    assert loaded[1].tokenizer.padding_side == "left"
    args = (LOCAL_PROMPTS[:2], LOCAL_A[:2], LOCAL_B[:2])
    expected, _ = mllm.make_pairwise_judge("tiny", mode="logits", vlm=tiny)(*args)
    got, _ = mllm.make_pairwise_judge(str(tmp_path), mode="logits", device="cpu")(*args)
    assert got == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------------- the trainer's view

def test_training_against_a_flaky_judge_server_goes_on_and_counts_failures(tmp_path):
    """pref_grpo.py trains through the real HTTP judge; a server that answers garbage for some pairs costs ties, not
    the run."""
    import pref_grpo as pg

    calls = []

    def flaky_redder_wins(caption, first, second, payload):
        calls.append(1)
        if len(calls) % 5 == 0:
            return chat_reply("I cannot decide.")  # off-format: a failed judgment
        redness = [c[0] - (c[1] + c[2]) / 2 for c in (first, second)]
        return chat_reply(verdict_text(1 if redness[0] >= redness[1] else 2))

    srv = ScriptedServer(reply=flaky_redder_wins)
    try:
        args = pg.parse_args(["--output-dir", str(tmp_path), "--resolution", "16", "--sample-steps", "2",
                              "--prompts-per-step", "1", "--group-size", "3", "--train-steps", "2", "--eval-seeds", "0",
                              "--judge-url", srv.url, "--judge-model", MODEL, "--judge-workers", "4",
                              "--judge-timeout", "5", "--judge-retries", "1"])
        pg.train(args)
    finally:
        srv.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and len(calls) == 2 * 3 * 2  # 3 pairs per group, both orders, 2 steps
    assert sum(m["judge_invalid"] for m in lines) == len(calls) // 5
    assert all(m["judge_pairs"] == 3 and m["reward_mean"] == pytest.approx(0.5) for m in lines)
    assert (tmp_path / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors").is_file()


def test_trainer_with_a_dead_judge_server_stops_at_start_with_one_line(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "pref_grpo.py", "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model",
                        MODEL, "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).parent, env={**os.environ, "OPENAI_API_KEY": "sk-secret-123"})
    assert r.returncode != 0 and "not reachable" in r.stderr and "Traceback" not in r.stderr
    assert "sk-secret-123" not in r.stderr + r.stdout
    assert len([line for line in r.stderr.splitlines() if line.startswith("error")]) == 1
