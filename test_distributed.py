"""pref_grpo.py under torchrun on CPU (gloo): 2 processes must give the 1-process run over the same global batch.

Each launch costs two interpreter starts (about 10-30 s on 2 cores), so there are three launches in all.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pref_grpo as pg

ROOT = Path(__file__).resolve().parent
# 2 groups of G = 3 per process (a process holds several groups), micro-batches of 4 (not a multiple of G, nor of the
# 6 trajectories a process holds), and a KL term, so every part of train_step meets the process split.
# --accum 0: one update per round. --accum N is global: N trajectories per update over all processes.
FLAGS = ["--model", "tiny", "--resolution", "32", "--sample-steps", "4", "--prompts-per-step", "4", "--group-size",
         "3", "--train-batch-size", "4", "--eval-seeds", "0", "--save-every", "1", "--sample-every", "1", "--device",
         "cpu", "--accum", "0"]


def torchrun(script, *flags):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def metrics(run):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time", "images_per", "peak"))}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a, b):
    assert len(a) == len(b)
    for ma, mb in zip(a, b):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6), k


# Runs pref_grpo.train under torchrun like `pref_grpo.py` does, and also records, on every rank, its trained weights
# at each checkpoint and which images each judge call paired.
DRIVER = """
import json, os, sys, torch
sys.path.insert(0, {root!r})
import pref_grpo as pg

out, decoded, checks = {out!r}, [], []
decode, save = pg.decode, pg.save_checkpoint
judge = pg.make_judge(pg.parse_args(["--model", "tiny"]))

def recording_decode(*a):
    decoded[:] = decode(*a)
    return decoded

def recording_judge(prompts, a, b):  # each pair: both images from one group, and that group's prompt
    at = {{id(im): k for k, im in enumerate(decoded)}}
    checks.extend([at[id(x)] // 3 == at[id(y)] // 3 and p == groups[at[id(x)] // 3] for p, x, y in zip(prompts, a, b)])
    return judge(prompts, a, b)

def recording_save(run_dir, step, pipe, optimizer, args, rank=0):
    weights = {{k: v.detach() for k, v in pipe.transformer.named_parameters() if v.requires_grad}}
    torch.save(weights, f"{{out}}/rank{{rank}}-step{{step}}.pt")
    return save(run_dir, step, pipe, optimizer, args, rank)

def recording_sample(pipe, prompts, *a):
    groups[:] = prompts
    return sample(pipe, prompts, *a)

groups, sample = [], pg.sample_batch
pg.decode, pg.save_checkpoint, pg.sample_batch = recording_decode, recording_save, recording_sample
pg.train(pg.parse_args(sys.argv[1:]), judge=recording_judge)
rank = int(os.environ["RANK"])  # train() has closed the process group
json.dump({{"pairs": len(checks), "ok": all(checks)}}, open(f"{{out}}/rank{{rank}}-pairs.json", "w"))
"""


def test_two_lora_processes_equal_one_process_over_the_same_global_batch(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER.format(root=str(ROOT), out=str(tmp_path))))
    # (the driver's recording_judge takes G = 3 from FLAGS)
    # --accum 4 of the round's 12 trajectories: 3 updates a round on 1 process (4 each) and on 2 (2 + 2 each), each
    # over the same trajectories (update j: every group's j-th); GDPO's z-score over both processes' advantages.
    flags = [*FLAGS, "--train-steps", "2", "--kl-beta", "0.5", "--lr", "3e-2", "--accum", "4", "--train-batch-size",
             "1", "--gdpo", "--rationorm"]
    r = torchrun(driver, *flags, "--output-dir", str(tmp_path / "two"))
    pg.train(pg.parse_args([*flags, "--output-dir", str(tmp_path / "one")]))

    for rank in (0, 1):  # every process judged 2 groups x 3 pairs, never across groups
        assert json.loads((tmp_path / f"rank{rank}-pairs.json").read_text()) == {"pairs": 2 * 2 * 3, "ok": True}
    for step in (1, 2):
        r0, r1 = (torch.load(tmp_path / f"rank{r}-step{step}.pt") for r in (0, 1))
        assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # replicas stay identical
        one = load_file(tmp_path / "one" / "checkpoints" / f"step-{step:06d}" / "pytorch_lora_weights.safetensors")
        two = load_file(tmp_path / "two" / "checkpoints" / f"step-{step:06d}" / "pytorch_lora_weights.safetensors")
        assert one.keys() == two.keys()
        # Float tolerance for Adam is a share of lr: it divides each gradient by its RMS, so an element whose gradient
        # is a near-cancelling sum (summed in another order on 2 processes) moves by a visibly different amount.
        # Seen here: step 1, 1 element of 34816 off by 5e-5 lr; step 2, 11 elements, at most 8e-4 lr.
        for k in one:
            assert torch.allclose(one[k], two[k], atol=3e-2 * (1e-3 if step == 1 else 1e-2)), (step, k)
    m = metrics(tmp_path / "two")
    assert_same_metrics(metrics(tmp_path / "one"), m)
    assert m[0]["judge_requests"] == 4 * 3 and m[0]["kl"] > 0  # global counts; after round 1's first update: KL > 0
    assert [x["updates"] for x in m] == [3, 3] and "3 update(s) a round over 4 trajectories each (2 per process)" in (
        r.stdout)
    # rank 0 alone writes: one metrics line per step, one grid per step
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["args.json", "checkpoints", "metrics.jsonl",
                                                                     "samples"]
    assert sorted(p.name for p in (tmp_path / "two" / "samples").iterdir()) == ["step-000001.png", "step-000002.png"]


def test_fsdp2_full_fine_tuning_on_two_processes_and_resume(tmp_path):
    """--full under torchrun shards the transformer with FSDP2 (gloo on CPU); the checkpoint is gathered onto rank 0,
    and a resumed 2-process run continues exactly like an uninterrupted 1-process run."""
    flags = [*FLAGS, "--full", "--lr", "1e-3"]
    torchrun("pref_grpo.py", *flags, "--train-steps", "1", "--output-dir", str(tmp_path / "two"))
    r = torchrun("pref_grpo.py", "--train-steps", "2", "--resume", str(tmp_path / "two"))
    assert "FSDP2" in r.stdout
    pg.train(pg.parse_args([*flags, "--train-steps", "2", "--output-dir", str(tmp_path / "one")]))

    for step in (1, 2):
        one, two = (load_file(tmp_path / run / "checkpoints" / f"step-{step:06d}" / "transformer" /
                              "diffusion_pytorch_model.safetensors") for run in ("one", "two"))
        assert one.keys() == two.keys()
        for k in one:
            assert torch.allclose(one[k], two[k], atol=1e-5), (step, k)
    assert_same_metrics(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    from diffusers import FluxTransformer2DModel  # the gathered checkpoint is a plain diffusers model

    model = FluxTransformer2DModel.from_pretrained(tmp_path / "two" / "checkpoints" / "step-000002" / "transformer")
    assert torch.equal(model.state_dict()["proj_out.weight"], two["proj_out.weight"])


def test_prompts_per_step_must_split_into_whole_groups(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="multiple of 2: each process takes whole groups"):
        pg.train(pg.parse_args([*FLAGS, "--prompts-per-step", "3", "--output-dir", str(tmp_path)]))
