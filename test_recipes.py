"""The official recipes (CodeGoat24/Pref-GRPO at 0bd1a34 and 3e787f6): rationorm and GDPO against numbers computed by
hand from the official formulas, the CLIP reward against open_clip's computation on tiny random weights, the qwen3vl
judge request at a real HTTP server, the global --accum, LoRA initialisation and the zero-advantage update."""

import copy
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pref_grpo as pg
from conftest import JSONHandler, LocalServer

ROOT = Path(__file__).resolve().parent
PROTOCOLS = ROOT.parent / "shared" / "judge-protocols"
TINY = ["--model", "tiny", "--prompts", "pref_grpo:TINY_PROMPTS", "--resolution", "32", "--sample-steps", "4",
        "--eval-seeds", "0"]


def fresh(*flags, lr=1e-2):
    args = pg.parse_args([*TINY, *flags])
    pipe = pg.load_pipeline("tiny", "cpu")
    params = pg.trainable_parameters(pipe, args)
    return args, pipe, params, torch.optim.AdamW(params, lr=lr)


# ---------------------------------------------------------------------------------------------------------------------
# rationorm (fastvideo/train_flux.py at 3e787f6, the `rationorm` branch of train_one_step)
# ---------------------------------------------------------------------------------------------------------------------
def test_rationorm_by_hand():
    lp, old = torch.tensor([-1.0, -2.0]), torch.tensor([-1.3, -2.0])
    mean, old_mean = torch.tensor([[1.0, 2.0], [0.5, 0.5]]), torch.tensor([[0.0, 2.0], [0.5, 0.5]])
    std_t, dt = torch.tensor([0.5, 2.0]), torch.tensor([-0.04, -0.01])
    # row 0: noise std s = 0.5 sqrt(0.04) = 0.1; mean gap^2 = (1 + 0) / 2 = 0.5, / (2 s^2) = 25;
    #        log r = (-1 + 1.3 + 25) x 0.1 = 2.53; the loss term is divided by |dt| = 0.04
    # row 1: s = 2 sqrt(0.01) = 0.2; no gap: log r = 0; divided by 0.01
    log_r, scale = pg.rationorm(lp, old, mean, old_mean, std_t, dt)
    assert torch.allclose(log_r, torch.tensor([2.53, 0.0])) and torch.allclose(scale, torch.tensor([25.0, 100.0]))
    # the clipped loss on that ratio: A = 1: max(-e^2.53, -(1 + 1e-4)) = -1.0001, / 0.04; A = -2: 2 x 1 / 0.01
    loss, _ = pg.grpo_loss(log_r, torch.zeros(2), torch.tensor([1.0, -2.0]) * scale, 1e-4)
    assert loss.item() == pytest.approx((-1.0001 / 0.04 + 2 / 0.01) / 2, rel=1e-5)


def test_rationorm_log_ratio_is_the_sampled_noise_times_the_policys_shift():
    """With the next latent drawn from the old step, prev = old_mean + s eps, the official normalised log-ratio is
    mean(eps (mean - old_mean)): the old log-prob's noise term cancels against the added gap."""
    torch.manual_seed(0)
    x, v_old, v_new, eps = (torch.randn(3, 4, 5) for _ in range(4))
    sigma, nxt = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.5, 0.25])
    _, _, old_mean, std_t = pg.sde_step(v_old, x, sigma, nxt, 0.7, 0.96)
    prev = old_mean + (std_t.flatten() * (sigma - nxt).sqrt()).view(3, 1, 1) * eps
    old_lp = pg.sde_step(v_old, x, sigma, nxt, 0.7, 0.96, prev=prev)[1]
    _, new_lp, new_mean, _ = pg.sde_step(v_new, x, sigma, nxt, 0.7, 0.96, prev=prev)
    log_r, scale = pg.rationorm(new_lp, old_lp, new_mean, old_mean, std_t, nxt - sigma)
    assert torch.allclose(log_r, (eps * (new_mean - old_mean)).mean(dim=(1, 2)), atol=1e-4)
    assert torch.allclose(scale, 1 / (sigma - nxt))


def test_rationorm_training_is_on_policy_first_and_divides_each_term_by_its_dt():
    """On the first (on-policy) update the normalised ratio is 1, so the logged loss is the mean of -A / |dt| over the
    trained (trajectory, transition) terms of nonzero advantage; the step means are stored at sampling time."""
    args, pipe, params, opt = fresh("--group-size", "3", "--accum", "0", "--rationorm")
    batch = pg.sample_batch(pipe, ["a red apple", "a blue car"], 0, args, torch.device("cpu"))
    assert batch["means"].shape == batch["latents"][:, 1:].shape
    assert pg.sample_batch(pipe, ["a red apple"], 0, pg.parse_args(TINY), torch.device("cpu"))["means"] is None
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0, 0.0, -1.5])
    sig, steps = batch["sigmas"], batch["trained"]
    dt = (sig[steps + 1] - sig[steps]).abs()
    expected = torch.cat([-adv[i] / dt[i] for i in range(6) if adv[i] != 0]).mean().item()
    stats = pg.train_step(pipe, params, opt, batch, adv, args)
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-5) and stats["loss"] == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# GDPO (fastvideo/rewards/dispatcher.py compute_weighted_advantages at 3e787f6, apply_gdpo)
# ---------------------------------------------------------------------------------------------------------------------
def test_gdpo_by_hand():
    win = torch.tensor([[1.0, 0.5, 0.0, 0.5], [0.25, 0.75, 0.5, 0.5]])
    clip = torch.tensor([[0.30, 0.32, 0.34, 0.36], [0.2, 0.2, 0.2, 0.2]])
    # group z-scores, Bessel-corrected: win g0 (.5, 0, -.5, 0) / sqrt(1/6); win g1 (-.25, .25, 0, 0) / sqrt(1/24);
    # clip g0 (-.03, -.01, .01, .03) / sqrt(.002/3); clip g1 all equal: 0
    a0 = [0.4 * w / math.sqrt(1 / 6) + 0.6 * c / math.sqrt(0.002 / 3)
          for w, c in zip([0.5, 0, -0.5, 0], [-0.03, -0.01, 0.01, 0.03])]
    a1 = [0.4 * w / math.sqrt(1 / 24) for w in [-0.25, 0.25, 0, 0]]
    assert torch.allclose(pg.group_advantages([win, clip], [0.4, 0.6]), torch.tensor([a0, a1]), atol=1e-4)
    # GDPO: one more z-score over all 8 (Bessel-corrected std, + 1e-8)
    mean = sum(a0 + a1) / 8
    std = math.sqrt(sum((a - mean) ** 2 for a in a0 + a1) / 7)
    expected = torch.tensor([[(a - mean) / (std + 1e-8) for a in a0], [(a - mean) / (std + 1e-8) for a in a1]])
    gdpo = pg.group_advantages([win, clip], [0.4, 0.6], gdpo=True)
    assert torch.allclose(gdpo, expected, atol=1e-4)
    # each group's z-scores sum to 0, so the round's mean is 0 and only the weights' ratio is left: 0.4 : 0.6 = 2 : 3
    assert abs(mean) < 1e-6 and torch.allclose(pg.group_advantages([win, clip], [2.0, 3.0], gdpo=True), gdpo, atol=1e-5)
    assert pg.group_advantages([win * 100, clip], [0.4, 0.6], clip=1.0, gdpo=True).abs().max() == 1.0  # then clamped


def test_gdpo_z_scores_over_the_whole_round_of_all_processes(monkeypatch):
    """Each process holds its own groups; GDPO's mean and std are those of every process's advantages together."""
    torch.manual_seed(0)
    mine, theirs = torch.randn(2, 4), torch.randn(3, 4) * 2 + 1
    whole = pg.round_zscore(torch.cat([mine, theirs]))
    sums = {"n": theirs.numel(), "sum": theirs.sum().item(), "sq": theirs.double().pow(2).sum().item()}
    monkeypatch.setattr(pg, "all_reduce", lambda values, device, op="sum": {k: values[k] + sums[k] for k in values})
    assert torch.allclose(pg.round_zscore(mine), whole[:2], atol=1e-6)
    assert torch.allclose(whole.std(), torch.tensor(1.0)) and abs(whole.mean()) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# The CLIP reward as the official computes it: open_clip's ViT-H-14 config (224 px, GELU) with the DFN5B-378 weights
# ---------------------------------------------------------------------------------------------------------------------
# open_clip needs torchvision, which does not install beside the CPU torch here; these are independent
# implementations of what open_clip 3.2 runs: its resize_pos_embed (model.py, called by factory.load_checkpoint), its
# inference transform (transform.py image_transform, resize_mode "shortest", OpenAI mean and std) and its CLIP forward
# with nn.GELU (ViT-H-14's config has no quick_gelu), on the checkpoint's tensors.
OPENAI_MEAN, OPENAI_STD = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258,
                                                                                             0.27577711])


def open_clip_resize_pos_embed(pos, grid):
    tok, img = pos[:1], pos[1:]
    old = int(math.sqrt(len(img)))
    img = img.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([tok, img.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)[0]])


def open_clip_preprocess(image, size):
    """torchvision Resize(size) (the short side, PIL bicubic), CenterCrop(size) (offsets rounded), ToTensor,
    Normalize."""
    w, h = image.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.convert("RGB").resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    x = torch.from_numpy(np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255)
    return (x.permute(2, 0, 1) - OPENAI_MEAN[:, None, None]) / OPENAI_STD[:, None, None]


def open_clip_blocks(x, sd, tower, layers, heads, causal):
    """Pre-norm residual blocks: x + attn(ln_1(x)), then x + c_proj(GELU(c_fc(ln_2(x))))."""
    n, d = x.shape[1:]
    mask = torch.full((n, n), float("-inf")).triu(1) if causal else None
    for i in range(layers):
        g = {k.split(f"layers.{i}.")[1]: v for k, v in sd.items() if k.startswith(f"{tower}.encoder.layers.{i}.")}
        h = F.layer_norm(x, (d,), g["layer_norm1.weight"], g["layer_norm1.bias"])
        q, k, v = (F.linear(h, g[f"self_attn.{t}_proj.weight"], g[f"self_attn.{t}_proj.bias"])
                   .unflatten(-1, (heads, -1)).transpose(1, 2) for t in "qkv")
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        x = x + F.linear(a, g["self_attn.out_proj.weight"], g["self_attn.out_proj.bias"])
        h = F.layer_norm(x, (d,), g["layer_norm2.weight"], g["layer_norm2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, g["mlp.fc1.weight"], g["mlp.fc1.bias"])), g["mlp.fc2.weight"],
                         g["mlp.fc2.bias"])
    return x


def open_clip_score(sd, config, ids, image, size):
    """F.normalize(encode_image(preprocess(image))) @ F.normalize(encode_text(ids)), as the official reward."""
    vc, tc, ln = config.vision_config, config.text_config, lambda x, n: F.layer_norm(x, x.shape[-1:], sd[n + ".weight"],
                                                                                    sd[n + ".bias"])
    x = F.conv2d(open_clip_preprocess(image, size)[None], sd["vision_model.embeddings.patch_embedding.weight"],
                 stride=vc.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([sd["vision_model.embeddings.class_embedding"][None, None], x], 1) + open_clip_resize_pos_embed(
        sd["vision_model.embeddings.position_embedding.weight"], size // vc.patch_size)
    x = open_clip_blocks(ln(x, "vision_model.pre_layrnorm"), sd, "vision_model", vc.num_hidden_layers,
                         vc.num_attention_heads, causal=False)
    img = F.linear(ln(x[:, 0], "vision_model.post_layernorm"), sd["visual_projection.weight"])
    t = sd["text_model.embeddings.token_embedding.weight"][ids] + sd["text_model.embeddings.position_embedding.weight"][
        :len(ids)]
    t = open_clip_blocks(t[None], sd, "text_model", tc.num_hidden_layers, tc.num_attention_heads, causal=True)
    eot = ids.index(tc.eos_token_id)  # open_clip pools at argmax(ids): the end-of-text token, its vocabulary's largest
    txt = F.linear(ln(t[0, eot], "text_model.final_layer_norm"), sd["text_projection.weight"])
    return F.cosine_similarity(img, txt[None]).item()


def test_clip_score_equals_the_official_computation_on_tiny_weights():
    trained = pg.load_clip("tiny", "cpu", as_trained=True)  # as trained: 378 px, QuickGELU, a 27 x 27 grid
    sd, config = {k: v.detach() for k, v in trained[0].state_dict().items()}, trained[0].config
    assert config.vision_config.hidden_act == "quick_gelu" and config.vision_config.image_size == 378
    official = pg.load_clip("tiny", "cpu")  # the same weights at 224 px (a 16 x 16 grid), GELU
    assert official[0].config.vision_config.hidden_act == official[0].config.text_config.hidden_act == "gelu"
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (720, 720), (40, 48), (64, 32)]  # square as generated; crops of an even margin
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    prompts = ["a red apple", "a blue car on the house", "the green bird", "a yellow boat with a flower"]
    ours = pg.clip_scores(official, prompts, images)
    expected = [open_clip_score(sd, config, trained[1](p)["input_ids"], im, 224) for p, im in zip(prompts, images)]
    assert torch.allclose(ours, torch.tensor(expected), atol=2e-5), (ours, expected)
    assert (pg.clip_scores(trained, prompts, images) - ours).abs().max() > 1e-3  # not the model as trained
    pos = official[0].vision_model.embeddings.position_embedding.weight
    assert torch.equal(pos[0], sd["vision_model.embeddings.position_embedding.weight"][0]) and pos.shape[0] == 16**2 + 1


# ---------------------------------------------------------------------------------------------------------------------
# The judge: UnifiedReward-Think-qwen3vl-8b's prompt byte for byte, under --preset pref-grpo-flux-head
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not PROTOCOLS.is_dir(), reason="needs ../shared/judge-protocols")
def test_qwen3vl_prompt_is_the_official_one_byte_for_byte():
    template = (PROTOCOLS / "unifiedreward_think_qwen3vl_pairwise.txt").read_text(encoding="utf-8")
    assert pg.UNIFIEDREWARD_THINK_QWEN3VL_PROMPT == template
    example = (PROTOCOLS / "unifiedreward_think_qwen3vl_pairwise_example.txt").read_text(encoding="utf-8")
    assert pg.judge_text("a red apple on a wooden table", "unifiedreward-think-qwen3vl") == example
    assert pg.judge_text("a red apple on a wooden table") == (PROTOCOLS / "unifiedreward_think_pairwise_example.txt"
                                                              ).read_text(encoding="utf-8")  # the default: qwen-7b's


class RecordingJudge:
    """An OpenAI-compatible server that records each request and prefers the image shown first."""

    def __init__(self):
        self.payloads, lock = [], threading.Lock()
        server = self

        class Handler(JSONHandler):
            def do_GET(self):
                self.send_json(200, {"object": "list", "data": [{"id": "UnifiedReward", "object": "model"}]})

            def do_POST(self):
                with lock:
                    server.payloads.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_json(200, {"choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "<think>\nTotal score: ...\n</think>\n"
                                                    "<answer>Image 1 is better</answer>"}}]})

        self.local = LocalServer(Handler)


@pytest.mark.skipif(not PROTOCOLS.is_dir(), reason="needs ../shared/judge-protocols")
def test_head_preset_sends_the_qwen3vl_prompt_with_4096_tokens_and_trains_with_rationorm_and_gdpo(tmp_path):
    srv = RecordingJudge()
    try:
        r = subprocess.run([sys.executable, str(ROOT / "pref_grpo.py"), "--preset", "pref-grpo-flux-head", *TINY,
                            "--clip-model", "tiny", "--judge-url", srv.local.url, "--group-size", "3",
                            "--prompts-per-step", "2", "--accum", "3", "--train-steps", "1",
                            "--max-sequence-length", "16", "--output-dir", str(tmp_path / "run")],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    finally:
        srv.local.close()
    assert r.returncode == 0, r.stderr[-3000:]
    template = (PROTOCOLS / "unifiedreward_think_qwen3vl_pairwise.txt").read_text(encoding="utf-8")
    assert len(srv.payloads) == 2 * 3  # 2 groups x 3 pairs, each once (lower index first)
    for p in srv.payloads:
        assert set(p) == {"model", "messages", "max_tokens"} and p["max_tokens"] == 4096
        content = p["messages"][0]["content"]
        assert [c["type"] for c in content] == ["image_url", "image_url", "text"]
        assert content[2]["text"] in {template.replace("{prompt}", c) for c in pg.TINY_PROMPTS}
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # image 0 always first, so it always wins: win rates (1, .5, 0) in both groups; GDPO makes the round's std 1
    assert m["reward_mean"] == 0.5 and m["judge_failed"] == 0 and m["updates"] == 2 and math.isfinite(m["loss"])
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["rationorm"] and args["gdpo"] and args["judge_prompt"] == "unifiedreward-think-qwen3vl"
    assert "2 update(s) a round over 3 trajectories each" in r.stdout


# ---------------------------------------------------------------------------------------------------------------------
# --accum is global; LoRA initialisation; the zero-advantage update
# ---------------------------------------------------------------------------------------------------------------------
def test_accum_is_trajectories_per_update_over_all_processes(tmp_path, monkeypatch):
    assert pg.accumulation(256, 64, 8) == (4, "2 update(s) a round over 256 trajectories each (4 per process)")
    assert pg.accumulation(256, 1, 512)[0] == 256 and pg.accumulation(0, 2, 6)[0] == 6
    assert pg.accumulation(4, 1, 6)[1].endswith(", the last over 2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"^error: --accum \(3\) .* multiple of 2$"):
        pg.train(pg.parse_args([*TINY, "--prompts-per-step", "2", "--accum", "3", "--output-dir", str(tmp_path)]))


def test_update_j_takes_the_j_th_slice_of_every_group(monkeypatch):
    """As the official on 64 GPUs (one group each): the first update sees each group's first half, the second the
    rest, whatever the number of processes."""
    args, pipe, params, opt = fresh("--group-size", "4", "--accum", "4")
    batch = pg.sample_batch(pipe, ["a red apple", "a blue car"], 0, args, torch.device("cpu"))
    seen, real = [], pg.transition
    monkeypatch.setattr(pg, "transition", lambda p, b, i, *a: seen.append(sorted(i.tolist())) or real(p, b, i, *a))
    stats = pg.train_step(pipe, params, opt, batch, torch.tensor([1.0, -1.0, 0.5, -0.5] * 2), args)
    k = batch["trained"].shape[1]
    assert stats["updates"] == 2 and seen == [[0, 1, 4, 5]] * k + [[2, 3, 6, 7]] * k


def test_lora_starts_as_officially_kaiming_uniform_a_and_zero_b():
    args, pipe, params, opt = fresh("--lora-rank", "16")
    lora = dict(pipe.transformer.named_parameters())
    a = [v for k, v in lora.items() if "lora_A" in k]
    assert a and all(not v.any() for k, v in lora.items() if "lora_B" in k)
    for w in a:  # peft's init_lora_weights=True: kaiming_uniform_(a=sqrt(5)), bound 1 / sqrt(fan_in)
        bound = 1 / math.sqrt(w.shape[1])
        assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)


def test_an_update_of_zero_advantages_steps_adamw_with_a_zero_gradient():
    args, pipe, params, opt = fresh("--group-size", "3", "--accum", "0")
    batch = pg.sample_batch(pipe, ["a red apple"], 0, args, torch.device("cpu"))
    pg.train_step(pipe, params, opt, batch, torch.tensor([1.0, 0.0, -1.0]), args)  # momentum to carry on
    ref = [q.detach().clone().requires_grad_() for q in params]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: loading shares the moment tensors
    for q in ref:
        q.grad = torch.zeros_like(q)
    ref_opt.step()
    before = [q.detach().clone() for q in params]
    stats = pg.train_step(pipe, params, opt, batch, torch.zeros(3), args)
    assert stats["updates"] == 1 and all(torch.equal(a, b) for a, b in zip(params, ref))
    assert not all(torch.equal(a, b) for a, b in zip(params, before))  # momentum and weight decay moved them
