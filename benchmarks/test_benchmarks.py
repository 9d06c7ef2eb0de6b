"""Smoke tests of the benchmarks at a tiny size (each well under a minute), and the order simulation's verdict."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import bench_judge
import bench_pref_grpo

ROOT = Path(__file__).resolve().parent.parent


def test_order_simulation_balanced_costs_the_official_price_and_cancels_most_of_its_position_offsets():
    rows = bench_judge.simulate(groups=300, kinds=("hard", "soft"), biases={"hard": (0.0, 0.2), "soft": (0.0, 0.8)})
    by = {(r["judge"], r["bias"], r["order"]): r for r in rows}
    assert {o: by["hard", 0.2, o]["requests_per_group"] for o in bench_judge.ORDERS} == \
        {"first": 28, "balanced": 28, "both": 56}
    for kind, b in (("hard", 0.2), ("soft", 0.8)):
        first, balanced, both = (by[kind, b, o] for o in bench_judge.ORDERS)
        for key in ("win_offset_spread", "adv_offset_spread"):
            assert balanced[key] < 0.5 * first[key]  # arithmetic: 1 / sqrt(21) = 0.22 of first's spread
            assert both[key] <= balanced[key] + 3 * balanced[key.replace("spread", "noise")]
        assert balanced["win_rmse"] < first["win_rmse"] and both["win_rmse"] < balanced["win_rmse"]
        assert first["first_preferred"] > 0.55 and not math.isnan(both["order_disagree"])
        assert math.isnan(first["order_disagree"]) and math.isnan(balanced["order_disagree"])
    for o in bench_judge.ORDERS:  # no bias: no order has an offset above the noise floor, first_preferred 0.5
        r = by["hard", 0.0, o]
        assert r["first_preferred"] == pytest.approx(0.5, abs=0.02)
        assert r["win_offset_spread"] < 4 * r["win_offset_noise"]


def test_bench_judge_tiny_run_counts_requests_and_tokens(tmp_path):
    out = tmp_path / "judge.json"
    result = bench_judge.main(["--groups", "20", "--latency", "0.01", "--reply-tokens", "40", "--server-groups", "1",
                               "--image-size", "64", "--workers", "4", "--out", str(out)])
    assert json.loads(out.read_text())["table"] == result["table"]
    rows = {r["order"]: r for r in result["throughput"]}
    assert len(rows) == 3
    for order, r in rows.items():
        assert r["requests"] == (56 if order == "both" else 28)
        assert r["completion_tokens"] == r["requests"] * 40
        assert r["pairs_per_s"] > 0 and r["tokens_per_s"] > 0
    assert len(result["order"]) == 3 * (len(bench_judge.BIASES["hard"]) + len(bench_judge.BIASES["soft"]))


def test_bench_pref_grpo_tiny_run_has_every_section_but_memory(tmp_path):
    out = tmp_path / "bench.json"
    bench_pref_grpo.main(["--sections", "rollouts,overhead,skipping,window", "--repeats", "1", "--resolution", "16",
                          "--rollout-resolutions", "16", "--sample-steps", "3", "--group-size", "4",
                          "--out", str(out)])
    r = json.loads(out.read_text())
    assert {"rollouts", "overhead", "skipping", "window"} <= set(r) and "memory" not in r
    assert r["rollouts"][0]["images"] == 8 and r["overhead"]["seconds"]["full_step"] > 0
    assert [w["trained_steps"] for w in r["window"]][:3] == [2, 1, 1]  # 3 steps: 2 trainable (the last never is)
    assert any(line.startswith("5. --sde-window") for line in r["table"])


def test_bench_pref_grpo_memory_section_runs_in_fresh_processes(tmp_path):
    out = tmp_path / "mem.json"
    bench_pref_grpo.main(["--sections", "memory", "--repeats", "1", "--resolution", "16", "--mem-resolution", "16",
                          "--sample-steps", "2", "--group-size", "2", "--prompts-per-step", "1", "--out", str(out)])
    off, on = json.loads(out.read_text())["memory"]
    assert (off["checkpointing"], on["checkpointing"]) == (False, True)
    assert off["grad_norm"] == pytest.approx(on["grad_norm"], rel=1e-4)  # the same step, with and without


def test_bench_pref_grpo_takes_a_hub_id_as_a_user_types_it(hub_cache, tmp_path):
    """`--model black-forest-labs/FLUX.1-dev` through the command line, from an offline cache holding a tiny model."""
    from conftest import HUB_IDS, offline_env

    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_pref_grpo.py", "--model", HUB_IDS["flux"], "--sections",
                        "rollouts", "--repeats", "1", "--resolution", "16", "--rollout-resolutions", "16",
                        "--sample-steps", "2", "--group-size", "2", "--max-sequence-length", "16", "--out", str(out)],
                       cwd=ROOT, env=offline_env(hub_cache), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["args"]["model"] == HUB_IDS["flux"] and result["rollouts"][0]["images"] == 4
