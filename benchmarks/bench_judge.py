"""Throughput of the pairwise judge back ends and modes, in pairs per second (both orders, so 2 requests a pair).

    python bench_judge.py [--out runs/bench_judge.json]

* in process, tiny random Qwen2.5-VL: logits mode vs generate mode (forced to GEN_TOKENS new tokens, about the
  length of a real UnifiedReward-Think reasoning), each batched and one pair at a time;
* server: a local OpenAI-compatible stub (own process) that answers after LATENCY_S, with 32 and 8 workers vs one.

The tiny model makes compute nearly free, so the in-process ratios show per-call and per-token overheads; on a
7B model on a GPU the generate/logits gap is larger still (a forward per generated token). Runs in under a minute.
"""

import argparse
import json
import multiprocessing
import os
import platform
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

import mllm

GEN_TOKENS = 200
LATENCY_S = 0.05


def images(n, seed):
    rng = np.random.default_rng(seed)  # smooth noise: PNG sizes closer to real images than flat colors
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).resize((512, 512), Image.BICUBIC)
            for _ in range(n)]


def pairs_per_second(judge, n_pairs, seed=0):
    prompts = [f"a photo of object number {i} on a table" for i in range(n_pairs)]
    a, b = images(n_pairs, seed), images(n_pairs, seed + 1)
    start = time.perf_counter()
    _, info = judge(prompts, a, b)
    return n_pairs / (time.perf_counter() - start), info


def serve_stub(port_queue):
    """Answers every chat request with a fixed verdict after LATENCY_S, like a busy inference server would.
    Runs in its own process, as a real server does, so that it does not compete with the client for the GIL."""
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
            self.reply({"data": [{"id": "UnifiedReward"}]})

        def do_POST(self):
            json.loads(self.rfile.read(int(self.headers["Content-Length"])))  # parse, as a real server must
            time.sleep(LATENCY_S)
            text = "<think>\n...\n</think>\n<answer>Image 1 is better</answer>"
            self.reply({"choices": [{"message": {"role": "assistant", "content": text}}]})

    ThreadingHTTPServer.request_queue_size = 256  # the default listen backlog of 5 drops connections under load
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_queue.put(httpd.server_address[1])
    httpd.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_judge.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; the tiny model gains nothing from more, and on shared cores they thrash")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []

    vlm = mllm.tiny_vlm(0)
    vlm[0].generation_config.min_new_tokens = GEN_TOKENS  # a random model would stop at random: force the length
    pairs_per_second(mllm.make_pairwise_judge("tiny", mode="logits", vlm=vlm), 1)  # warm-up
    for mode, n_pairs in (("logits", 16), ("generate", 8)):
        for batch in (8, 1):
            judge = mllm.make_pairwise_judge("tiny", mode=mode, vlm=vlm, batch_size=batch, max_tokens=GEN_TOKENS)
            pps, _ = pairs_per_second(judge, n_pairs)
            rows.append({"backend": "in-process (tiny)", "mode": mode, "setting": f"batch {batch}",
                         "pairs": n_pairs, "pairs_per_s": pps})

    ctx = multiprocessing.get_context("spawn")
    port_queue = ctx.Queue()
    stub = ctx.Process(target=serve_stub, args=(port_queue,), daemon=True)
    stub.start()
    url = f"http://127.0.0.1:{port_queue.get(timeout=60)}/v1"
    for workers in (32, 8, 1):
        judge = mllm.make_pairwise_judge("UnifiedReward", url, workers=workers)
        pps, info = pairs_per_second(judge, 32)
        assert info["judge_invalid"] == 0
        rows.append({"backend": f"server ({LATENCY_S * 1000:.0f} ms/request)", "mode": "generate",
                     "setting": f"{workers} workers", "pairs": 32, "pairs_per_s": pps})
    small = [(f"[pair {i}]", images(2, i)) for i in range(64)]  # transport alone: tiny images, no resize
    for i, (_, ims) in enumerate(small):
        small[i] = (small[i][0], [im.resize((64, 64)) for im in ims])
    for workers in (8, 1):
        start = time.perf_counter()
        replies, _ = mllm.server_chat(small, url, "UnifiedReward", workers=workers)
        assert all(replies)
        rows.append({"backend": "server, 64px images", "mode": "generate", "setting": f"{workers} workers",
                     "pairs": 32, "pairs_per_s": 32 / (time.perf_counter() - start)})
    stub.terminate()

    def rate(mode, setting, backend=""):
        return next(r["pairs_per_s"] for r in rows
                    if r["mode"] == mode and r["setting"] == setting and r["backend"].startswith(backend))

    ratios = {"logits_vs_generate_batched": rate("logits", "batch 8") / rate("generate", "batch 8"),
              "logits_batched_vs_single": rate("logits", "batch 8") / rate("logits", "batch 1"),
              "generate_batched_vs_single": rate("generate", "batch 8") / rate("generate", "batch 1"),
              "server_8_workers_vs_1": rate("generate", "8 workers") / rate("generate", "1 workers"),
              "server_32_workers_vs_1": rate("generate", "32 workers") / rate("generate", "1 workers"),
              "server_transport_8_workers_vs_1": rate("generate", "8 workers", "server, 64px")
              / rate("generate", "1 workers", "server, 64px")}
    image = images(1, 0)[0]
    start = time.perf_counter()
    for _ in range(10):
        mllm._png_data_url(image)
    png_ms = (time.perf_counter() - start) * 100  # client CPU per image sent, the server path's own cost
    print(f"{'backend':<28}{'mode':<10}{'setting':<12}{'pairs':>6}{'pairs/s':>10}")
    for r in rows:
        print(f"{r['backend']:<28}{r['mode']:<10}{r['setting']:<12}{r['pairs']:>6}{r['pairs_per_s']:>10.2f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.1f}x")
    print(f"PNG + base64 encoding of one 512x512 image: {png_ms:.0f} ms")
    result = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "python": platform.python_version(), "torch": torch.__version__, "gen_tokens": GEN_TOKENS,
              "server_latency_s": LATENCY_S, "png_encode_ms": png_ms, "rows": rows, "ratios": ratios}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
