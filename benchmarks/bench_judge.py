"""The judge's cost: which image is shown first (simulated error and price of each --judge-order), and the server
path's throughput in pairs and tokens per second.

    python benchmarks/bench_judge.py          # both parts: about 1-2 minutes on 2 CPU cores; JSON in runs/

1. order (simulation, no model): a judge with known image qualities, a position bias b for the image shown first and
   noise, judged through the trainer's own `judge_groups` / `pair_schedule` / `win_rates` / `group_advantages`, for
   each --judge-order. Per mode: requests per group, the share of verdicts won by the first-shown image
   (`judge_first_preferred`), and the error of the win rates and advantages against the noise-free, bias-free ones:
   RMSE over all images, and the spread (std over the G positions) of the per-position mean error, i.e. the part of
   the error that the schedule ties to an image's index. Two judges:
     hard (UnifiedReward-Think): a verdict, P(first wins) = clip(sigmoid(s (q_first - q_second)) + b, 0, 1);
     soft (a --judge-fn that returns probabilities): P(first better) = sigmoid(s (q_first - q_second) + b + noise
       N(0, 1)), b in logits.
   The reference is the bias-free judge's expectation sigmoid(s (q_i - q_j)) (noise-free, bias-free win rates).
2. throughput: a local OpenAI-compatible server on 127.0.0.1 (its own process) answers every request after a fixed
   latency with a fixed-length reply and reports `usage.completion_tokens`; the trainer's judge
   (`make_judge(parse_args([... --judge-url ...]))` + `judge_groups`) sends groups of G images at the trainer's
   resolution, in every order. Pairs/s and tokens/s here are the client's ceiling
   (JPEG encoding, JSON, HTTP on this machine's cores), not a judge GPU's speed: see docs/judge.md for sizing.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pref_grpo.py lives in the repo root

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import pref_grpo as pg  # noqa: E402

ORDERS = ("first", "balanced", "both")
BIASES = {"hard": (0.0, 0.05, 0.1, 0.2), "soft": (0.0, 0.2, 0.4, 0.8)}  # soft: in logits (0.4 ~ +0.1 at p = 0.5)


# ======================================================================================================================
# 1. Order modes: a simulated judge through the trainer's own code
# ======================================================================================================================
def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def simulated_judge(kind: str, bias: float, sharpness: float, noise: float, rng: np.random.Generator):
    """judge(prompts, firsts, seconds) -> (P(first better), info) as the trainer calls it; the "images" are numbers,
    their qualities. `hard`: a 0/1 verdict drawn with P(first) = clip(sigmoid(s dq) + bias, 0, 1) (a reasoning judge);
    `soft`: sigmoid(s dq + bias + noise N(0, 1)) (a judge function that returns probabilities)."""
    def judge(prompts, firsts, seconds):
        dq = sharpness * (np.asarray(firsts, dtype=float) - np.asarray(seconds, dtype=float))
        if kind == "hard":
            p = (rng.random(len(dq)) < np.clip(sigmoid(dq) + bias, 0, 1)).astype(float)
        else:
            p = sigmoid(dq + bias + noise * rng.standard_normal(len(dq)))
        return p.tolist(), {}
    return judge


def position_error(est: torch.Tensor, ref: torch.Tensor) -> dict:
    """RMSE over all (group, position) entries, and the std over positions of the mean error at each position."""
    err = (est - ref).double()
    offsets = err.mean(0)
    return {"rmse": err.pow(2).mean().sqrt().item(), "offset_spread": offsets.std(correction=0).item(),
            "offset_max": offsets.abs().max().item(),
            "offset_noise": (err.std(0) / math.sqrt(err.shape[0])).mean().item()}  # the spread's noise floor


def simulate(groups: int = 1000, G: int = 8, kinds=("hard", "soft"), biases: dict | None = None,
             sharpness: float = 2.0, noise: float = 1.0, seed: int = 0, chunk: int = 500) -> list[dict]:
    """Every (judge kind, bias, order) on the same image qualities q ~ N(0, 1) (groups x G); rows of metrics."""
    biases = biases or BIASES
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((groups, G))
    ref_pref = torch.from_numpy(sigmoid(sharpness * (q[:, :, None] - q[:, None, :]))).float()
    ref_w = pg.win_rates(ref_pref)
    ref_adv = pg.group_advantages([ref_w], [1.0])
    rows = []
    for kind in kinds:
        for b in biases[kind]:
            for order in ORDERS:
                stream = [seed, ("hard", "soft").index(kind), round(b * 1000), ORDERS.index(order)]
                judge = simulated_judge(kind, b, sharpness, noise, np.random.default_rng(stream))
                prefs, first, disagree = [], [], []
                for s in range(0, groups, chunk):  # judge_groups takes any number of groups; chunks bound memory
                    n = min(chunk, groups - s)
                    pref, info = pg.judge_groups(judge, [""] * n, q[s:s + n].ravel().tolist(), G, order)
                    prefs.append(pref)
                    first.append(info["judge_first_preferred"] * n)
                    disagree.append(info.get("judge_order_disagree", float("nan")) * n)
                w = pg.win_rates(torch.cat(prefs))
                adv = pg.group_advantages([w], [1.0])
                rows.append({"judge": kind, "bias": b, "order": order,
                             "requests_per_group": len(pg.pair_schedule(G, order)),
                             "first_preferred": sum(first) / groups, "order_disagree": sum(disagree) / groups,
                             **{f"win_{k}": v for k, v in position_error(w, ref_w).items()},
                             **{f"adv_{k}": v for k, v in position_error(adv, ref_adv).items()}})
    return rows


def order_table(rows: list[dict]) -> list[str]:
    lines = []
    for kind in dict.fromkeys(r["judge"] for r in rows):
        unit = "probability" if kind == "hard" else "logit"
        lines += ["", f"{kind} judge ({'0/1 verdicts' if kind == 'hard' else 'probabilities'}), "
                      f"bias b in {unit}",
                  "    b  order     req/group  first_pref  disagree   win RMSE  win spread    adv RMSE  adv spread"]
        for r in rows:
            if r["judge"] == kind:
                dis = "" if math.isnan(r["order_disagree"]) else f"{r['order_disagree']:.3f}"
                lines.append(f"{r['bias']:>5}  {r['order']:<9} {r['requests_per_group']:>9}  "
                             f"{r['first_preferred']:>10.3f}  {dis:>8}  {r['win_rmse']:>9.4f}  "
                             f"{r['win_offset_spread']:>10.4f}  {r['adv_rmse']:>10.4f}  "
                             f"{r['adv_offset_spread']:>10.4f}")
    return lines


# ======================================================================================================================
# 2. Throughput of the server path against a fixed-latency stub
# ======================================================================================================================
def serve_stub(port_queue, latency: float, reply_tokens: int):
    """An OpenAI-compatible server: every chat request is answered after `latency` seconds with a reply of
    `reply_tokens` tokens, and `usage.completion_tokens` says so.
    GET /stats: requests and completion tokens served so far. Its own process, as a real server is, so that it does
    not take the client's GIL."""
    lock, stats = threading.Lock(), {"requests": 0, "completion_tokens": 0}
    filler = " ".join(["x"] * max(reply_tokens - 12, 0))  # about one token per word; the count is what usage reports

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.endswith("/stats"):
                with lock:
                    self.reply(dict(stats))
            else:
                self.reply({"data": [{"id": "UnifiedReward"}]})

        def do_POST(self):
            json.loads(self.rfile.read(int(self.headers["Content-Length"])))  # parse, as a server must
            time.sleep(latency)
            with lock:
                stats["requests"] += 1
                stats["completion_tokens"] += reply_tokens
            text = f"<think>\n{filler}\n</think>\n<answer>Image 1 is better</answer>"
            self.reply({"choices": [{"message": {"role": "assistant", "content": text}}],
                        "usage": {"completion_tokens": reply_tokens}})

    ThreadingHTTPServer.request_queue_size = 512  # the default listen backlog of 5 drops connections under load
    ThreadingHTTPServer.daemon_threads = True
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever()


def start_stub(latency: float, reply_tokens: int):
    ctx = multiprocessing.get_context("spawn")
    port_queue = ctx.Queue()
    stub = ctx.Process(target=serve_stub, args=(port_queue, latency, reply_tokens), daemon=True)
    stub.start()
    return stub, f"http://127.0.0.1:{port_queue.get(timeout=60)}/v1"


def stub_stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/stats", timeout=30) as resp:
        return json.loads(resp.read())


def test_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Smooth random images (JPEG sizes closer to real ones than noise or flat colours)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
            for _ in range(n)]


def throughput(url: str, groups: int, G: int, size: int, workers: int, orders=ORDERS) -> list[dict]:
    """Each order: `groups` groups of G images judged in one judge_groups call by the trainer's judge."""
    prompts = [f"a photo of object number {g} on a table" for g in range(groups)]
    images = test_images(groups * G, size)
    judge = pg.make_judge(pg.parse_args(["--model", "tiny", "--judge-url", url, "--judge-model", "UnifiedReward",
                                         "--judge-workers", str(workers)]))
    rows = []
    for order in orders:
        before = stub_stats(url)
        start = time.perf_counter()
        _, info = pg.judge_groups(judge, prompts, images, G, order)
        seconds = time.perf_counter() - start
        after = stub_stats(url)
        requests = after["requests"] - before["requests"]
        tokens = after["completion_tokens"] - before["completion_tokens"]
        assert requests == info["judge_requests"] and info["judge_failed"] == 0, info
        rows.append({"order": order, "workers": workers, "image_px": size, "groups": groups, "requests": requests,
                     "completion_tokens": tokens, "seconds": seconds, "pairs_per_s": requests / seconds,
                     "tokens_per_s": tokens / seconds, "groups_per_s": groups / seconds})
    return rows


def encode_ms(size: int, repeats: int = 5) -> float:
    image = test_images(1, size)[0]
    start = time.perf_counter()
    for _ in range(repeats):
        pg.jpeg_data_url(image)
    return (time.perf_counter() - start) / repeats * 1000


def throughput_table(rows: list[dict], latency: float, reply_tokens: int) -> list[str]:
    lines = ["", f"server stub: {latency * 1000:.0f} ms per request, {reply_tokens}-token replies",
             "order     workers  image px  requests  completion tokens  pairs/s  tokens/s  groups/s"]
    for r in rows:
        lines.append(f"{r['order']:<9} {r['workers']:>7}  {r['image_px']:>8}  {r['requests']:>8}  "
                     f"{r['completion_tokens']:>17}  {r['pairs_per_s']:>7.1f}  {r['tokens_per_s']:>8.0f}  "
                     f"{r['groups_per_s']:>8.2f}")
    return lines


# ======================================================================================================================
# Main
# ======================================================================================================================
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="order,throughput", help="a comma-separated subset of order,throughput")
    p.add_argument("--out", default="runs/bench_judge.json")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--groups", type=int, default=1000, help="simulated groups per (judge, bias, order)")
    p.add_argument("--sharpness", type=float, default=2.0,
                   help="simulated judge: s in sigmoid(s (q_a - q_b)), image qualities q ~ N(0, 1)")
    p.add_argument("--noise", type=float, default=1.0, help="soft simulated judge: std of its logit noise")
    p.add_argument("--latency", type=float, default=0.2, help="stub server: seconds per request")
    p.add_argument("--reply-tokens", type=int, default=500, help="stub server: completion tokens per reply")
    p.add_argument("--server-groups", type=int, default=4, help="groups per throughput measurement")
    p.add_argument("--image-size", type=int, default=720, help="px of the judged images (official training: 720)")
    p.add_argument("--workers", default="16,64", help="--judge-workers values (trainer default: 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    cfg = p.parse_args(argv)
    torch.set_num_threads(cfg.threads)
    sections = cfg.sections.split(",")
    result = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, "settings": vars(cfg)}
    started, lines = time.perf_counter(), []
    if "order" in sections:
        result["order"] = simulate(cfg.groups, cfg.group_size, sharpness=cfg.sharpness, noise=cfg.noise)
        lines += [f"1. order modes, simulated: {cfg.groups} groups of G = {cfg.group_size}, qualities q ~ N(0, 1), "
                  f"s = {cfg.sharpness}, soft-judge noise {cfg.noise}; errors against the bias-free, noise-free "
                  "win rates and advantages (spread: std over positions of the mean error per position)",
                  *order_table(result["order"])]
    if "throughput" in sections:
        stub, url = start_stub(cfg.latency, cfg.reply_tokens)
        try:
            rows = []
            for w in (int(x) for x in cfg.workers.split(",")):
                rows += throughput(url, cfg.server_groups, cfg.group_size, cfg.image_size, w)
        finally:
            stub.terminate()
            stub.join()
        result["throughput"] = rows
        result["jpeg_encode_ms"] = {str(s): encode_ms(s) for s in (512, cfg.image_size)}
        lines += ["", f"2. server path throughput (the client's ceiling on {os.cpu_count()} CPU cores)",
                  *throughput_table(rows, cfg.latency, cfg.reply_tokens),
                  "JPEG q95 + base64 per image: " + ", ".join(f"{s} px {ms:.1f} ms"
                                                               for s, ms in result["jpeg_encode_ms"].items())]
    lines.append(f"\nload average {os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.0f} s in all")
    result["table"] = lines
    print("\n".join(lines))
    if cfg.out:
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {cfg.out}")
    return result


if __name__ == "__main__":
    main()
