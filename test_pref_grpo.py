"""Tests for pref_grpo.py: exact math against hand-computed values, invariants, and end-to-end runs on the tiny model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pref_grpo as pg

SHARED = Path(__file__).resolve().parent.parent / "shared" / "unigenbench-data"


# ---------------------------------------------------------------------------------------------------------------------
# Section 1: the SDE step and the sampler
# ---------------------------------------------------------------------------------------------------------------------
def test_sde_step_mean_std_and_log_prob_by_hand():
    x, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    prev = torch.tensor([[0.8, 2.0]])
    out, lp, mean, std = pg.sde_step(v, x, 0.5, 0.25, 0.7, 0.9, prev=prev)
    # std_t = 0.7 * sqrt(0.5 / 0.5) = 0.7; dt = -0.25
    # mean = x (1 + 0.49 * -0.25 / 1) + v (1 + 0.49 * 0.5 / 1) * -0.25 = 0.8775 x - 0.31125 v
    assert torch.allclose(mean, torch.tensor([[0.721875, 2.06625]]), atol=1e-6)
    assert std == pytest.approx(0.35)  # 0.7 * sqrt(0.25)
    d = [0.8 - 0.721875, 2.0 - 2.06625]
    expected = sum(-(e * e) / (2 * 0.35**2) - math.log(0.35) - 0.5 * math.log(2 * math.pi) for e in d) / 2
    assert lp.item() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(out, prev)


def test_sde_step_caps_sigma_one_at_first_sigma_below_one():
    x, v = torch.zeros(1, 3), torch.ones(1, 3)
    _, _, _, std = pg.sde_step(v, x, 1.0, 0.9, 0.5, 0.9)
    assert std == pytest.approx(0.5 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.1))


def test_sde_step_log_prob_matches_torch_normal_and_noise_has_the_stated_std():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 64, 16, generator=g), torch.randn(4, 64, 16, generator=g)
    nxt, lp, mean, std = pg.sde_step(v, x, 0.7, 0.6, 1.0, 0.95, generator=g)
    ref = torch.distributions.Normal(mean, std).log_prob(nxt).mean(dim=(1, 2))
    assert torch.allclose(lp, ref, atol=1e-5)
    assert ((nxt - mean) / std).std().item() == pytest.approx(1.0, abs=0.03)


def test_eta_zero_is_the_deterministic_euler_step():
    x, v = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    a, lp, _, std = pg.sde_step(v, x, 0.6, 0.4, 0.0, 0.9, generator=torch.Generator().manual_seed(1))
    assert std == 0 and torch.allclose(a, x + v * (0.4 - 0.6), atol=1e-7) and torch.equal(lp, torch.zeros(2))


def test_sde_step_runs_in_float32_for_bf16_inputs():
    x, v = torch.randn(2, 4, dtype=torch.bfloat16), torch.randn(2, 4, dtype=torch.bfloat16)
    nxt, lp, _, _ = pg.sde_step(v, x, 0.5, 0.4, 0.7, 0.9, generator=torch.Generator().manual_seed(0))
    assert nxt.dtype == torch.float32 and lp.dtype == torch.float32


@pytest.fixture(scope="module")
def pipe():
    return pg.load_pipeline("tiny", "cpu")


def test_sigma_schedule_is_fluxs_time_shift(pipe):
    seq_len = 256  # resolution 64 on the tiny model: (64 / 2 / 2)^2 tokens
    sig = pg.sigma_schedule(pipe, 4, seq_len)
    mu = 0.5 + (1.15 - 0.5) * (seq_len - 256) / (4096 - 256)  # calculate_shift: linear in the sequence length
    expected = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) for s in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    assert torch.allclose(sig, torch.tensor(expected), atol=1e-6)
    fixed = pg.sigma_schedule(pipe, 4, seq_len, shift=3.0)
    assert torch.allclose(fixed[:4], torch.tensor([3 * s / (1 + 2 * s) for s in (1.0, 0.75, 0.5, 0.25)]), atol=1e-6)


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


def test_step_plan_window_and_fraction():
    mask, trained = pg.step_plan(10, 4, 0.5, torch.Generator().manual_seed(3))
    window = [i for i, m in enumerate(mask) if m]
    assert len(window) == 4 and window == list(range(window[0], window[0] + 4))
    assert len(trained) == 2 and set(trained) <= set(window)
    mask, trained = pg.step_plan(10, 0, 0.6, torch.Generator().manual_seed(3))
    assert all(mask) and len(trained) == 6 and trained == sorted(set(trained))


def test_sde_window_rollout_is_deterministic_outside_the_window(pipe):
    args = pg.parse_args(["--sample-steps", "6", "--sde-window", "2", "--resolution", "32"])
    batch = pg.sample_batch(pipe, ["a red apple"], 0, args, torch.device("cpu"))
    lp = batch["log_probs"]
    window = [i for i in range(6) if lp[0, i] != 0]
    assert len(window) == 2 and set(batch["trained"]) <= set(window)
    # with the same initial noise, trajectories of a group agree exactly until the first SDE step
    first = window[0]
    assert torch.equal(batch["latents"][0, first], batch["latents"][1, first])
    assert not torch.equal(batch["latents"][0, first + 1], batch["latents"][1, first + 1])


# ---------------------------------------------------------------------------------------------------------------------
# Sections 2-5: judging pairs, win rates, advantages, loss
# ---------------------------------------------------------------------------------------------------------------------
def test_win_rates_by_hand_and_sum_to_half_the_group():
    pref = torch.full((1, 3, 3), 0.5)
    for i, j, p in [(0, 1, 1.0), (0, 2, 0.5), (1, 2, 0.0)]:  # 0 beats 1, 0 ties 2, 2 beats 1
        pref[0, i, j], pref[0, j, i] = p, 1 - p
    assert torch.allclose(pg.win_rates(pref), torch.tensor([[0.75, 0.0, 0.75]]))
    soft = torch.rand(5, 6, 6)
    soft = torch.triu(soft, 1) + torch.tril(1 - soft.transpose(1, 2), -1)
    assert torch.allclose(pg.win_rates(soft).sum(1), torch.full((5,), 3.0))


def test_judge_groups_pairs_never_cross_groups_and_failures_are_ties():
    seen = []

    def judge(prompts, a, b):
        seen.extend(zip(prompts, a, b))
        # image "value" = its red channel; a failed judgment for the pair (0, 1) of every group
        return [None if (x.getpixel((0, 0))[0] % 10, y.getpixel((0, 0))[0] % 10) == (0, 1) else
                float(x.getpixel((0, 0))[0] > y.getpixel((0, 0))[0]) for _, x, y in zip(prompts, a, b)], {"extra": 1}

    G, prompts = 4, ["p0", "p1"]
    images = [Image.new("RGB", (2, 2), (10 * g + i, 0, 0)) for g in range(2) for i in range(G)]
    pref, info = pg.judge_groups(judge, prompts, images, G)
    assert len(seen) == 2 * G * (G - 1) // 2 and info["judge_pairs"] == 12 and info["judge_failed"] == 2
    assert info["extra"] == 1
    for prompt, a, b in seen:  # each pair is judged with its own group's prompt
        g = int(prompt[1])
        assert a.getpixel((0, 0))[0] // 10 == g and b.getpixel((0, 0))[0] // 10 == g
    assert pref[0, 0, 1] == 0.5 and pref[0, 1, 0] == 0.5 and pref[0, 3, 0] == 1.0 and pref[0, 0, 3] == 0.0
    # group 1: the (0, 1) pair failed (a tie), otherwise the larger value wins
    assert torch.allclose(pg.win_rates(pref)[1], torch.tensor([1 / 6, 1 / 6, 2 / 3, 1.0]))


def test_win_rates_of_judged_group_by_hand():
    def judge(prompts, a, b):
        return [float(x.getpixel((0, 0))[0] > y.getpixel((0, 0))[0]) for x, y in zip(a, b)], {}

    images = [Image.new("RGB", (1, 1), (v, 0, 0)) for v in (30, 10, 20)]
    pref, _ = pg.judge_groups(judge, ["p"], images, 3)
    assert torch.allclose(pg.win_rates(pref), torch.tensor([[1.0, 0.0, 0.5]]))


def test_group_advantages_by_hand_clamp_and_zero_std_groups():
    adv = pg.group_advantages(torch.tensor([[0.0, 0.5, 1.0], [0.3, 0.3, 0.3]]))
    s = math.sqrt(1 / 6)  # population std of (0, 0.5, 1)
    assert torch.allclose(adv[0], torch.tensor([-0.5, 0.0, 0.5]) / (s + 1e-4), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(3))
    outlier = torch.zeros(1, 30)
    outlier[0, 0] = 1.0  # z = (1 - 1/30) / sqrt(1/30 * 29/30) = 5.39 -> clamped to 5
    assert pg.group_advantages(outlier)[0, 0].item() == pytest.approx(5.0)
    rand = pg.group_advantages(torch.rand(8, 6), clip=100.0)
    assert torch.allclose(rand.mean(1), torch.zeros(8), atol=1e-6)


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


def test_toy_judge_prefers_the_named_colour():
    red, grey = Image.new("RGB", (4, 4), (250, 10, 10)), Image.new("RGB", (4, 4), (128, 128, 128))
    probs, _ = pg.toy_judge(["a red apple", "a red apple", "an apple", "a red car"], [red, grey, red, red],
                            [grey, red, grey, red])
    assert probs == [1.0, 0.0, None, 0.5]
    assert pg.toy_colour_distance("a blue sky", Image.new("RGB", (2, 2), (0, 0, 255))) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Training: on-policy ratio, one step, zero-std skipping, NaN guard, checkpoints, resume
# ---------------------------------------------------------------------------------------------------------------------
def tiny_args(tmp_path, *extra):
    return pg.parse_args(["--output-dir", str(tmp_path), "--resolution", "32", "--sample-steps", "4",
                          "--prompts-per-step", "2", "--group-size", "3", "--eval-seeds", "0", "--save-every", "2",
                          "--sample-every", "1", *extra])


def test_on_policy_ratio_is_exactly_one(pipe):
    args = pg.parse_args(["--resolution", "32", "--sample-steps", "4", "--group-size", "3"])
    batch = pg.sample_batch(pipe, ["a red apple", "a blue car"], 5, args, torch.device("cpu"))
    sig, lat = batch["sigmas"], batch["latents"]
    for j in range(4):
        v = pg.velocity(pipe, lat[:, j], float(sig[j]), batch["cond"], batch["img_ids"], args.guidance)
        _, lp, _, _ = pg.sde_step(v, lat[:, j], float(sig[j]), float(sig[j + 1]), args.eta, float(sig[1]),
                                  prev=lat[:, j + 1])
        assert torch.equal(torch.exp(lp - batch["log_probs"][:, j]), torch.ones(6))


def lora_state(pipe):
    return {k: v.detach().clone() for k, v in pipe.transformer.named_parameters() if "lora" in k}


def test_one_training_step_changes_weights_and_logs_metrics(tmp_path):
    pg.train(tiny_args(tmp_path, "--train-steps", "1"))
    m = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward_mean", "reward_group_std", "adv_abs_mean", "skipped_groups", "loss", "clip_frac",
                "approx_kl", "grad_norm", "time_sample", "time_decode", "time_judge", "time_train", "images_per_s",
                "peak_mem_gb", "judge_failed", "judge_pairs"):
        assert key in m, key
    assert m["reward_mean"] == pytest.approx(0.5) and m["judge_pairs"] == 6 and m["ratio"] == pytest.approx(1.0)
    assert (tmp_path / "samples" / "step-000001.png").is_file()
    assert (tmp_path / "checkpoints" / "step-000001" / "pytorch_lora_weights.safetensors").is_file()
    assert m["grad_norm"] > 0 and m["skipped_update"] == 0


def test_zero_advantage_groups_get_no_forward_backward(pipe, monkeypatch):
    args = pg.parse_args(["--resolution", "32", "--sample-steps", "4", "--group-size", "3"])
    pipe2 = pg.load_pipeline("tiny", "cpu")
    params = pg.trainable_parameters(pipe2, args)
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = pg.sample_batch(pipe2, ["a red apple", "a blue car"], 0, args, torch.device("cpu"))
    sizes = []
    real = pg.velocity
    monkeypatch.setattr(pg, "velocity", lambda p, x, *a: sizes.append(x.shape[0]) or real(p, x, *a))
    adv = torch.tensor([0.0, 0.0, 0.0, 1.0, -1.5, 0.5])  # first group has no signal
    stats = pg.train_step(pipe2, params, opt, batch, adv, batch["trained"], args)
    assert sizes == [3] * len(batch["trained"]) and stats["skipped_update"] == 0
    sizes.clear()
    before = lora_state(pipe2)
    stats = pg.train_step(pipe2, params, opt, batch, torch.zeros(6), batch["trained"], args)
    assert sizes == [] and stats["skipped_update"] == 1
    assert all(torch.equal(before[k], v) for k, v in lora_state(pipe2).items())


def test_nan_loss_skips_the_update_and_keeps_weights():
    args = pg.parse_args(["--resolution", "32", "--sample-steps", "4", "--group-size", "3"])
    pipe2 = pg.load_pipeline("tiny", "cpu")
    params = pg.trainable_parameters(pipe2, args)
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = pg.sample_batch(pipe2, ["a red apple"], 0, args, torch.device("cpu"))
    before = lora_state(pipe2)
    stats = pg.train_step(pipe2, params, opt, batch, torch.tensor([1.0, float("nan"), -1.0]), batch["trained"], args)
    assert stats["skipped_update"] == 1 and not math.isfinite(stats["loss"])
    assert all(torch.equal(before[k], v) for k, v in lora_state(pipe2).items())
    assert all(p.grad is None for p in params)


def test_lora_checkpoint_loads_into_a_stock_flux_pipeline(tmp_path):
    args = tiny_args(tmp_path, "--train-steps", "2", "--lr", "3e-2")
    pg.train(args)
    trained = pg.load_pipeline("tiny", "cpu")
    opt_args = pg.parse_args([])
    pg.trainable_parameters(trained, opt_args)
    opt = torch.optim.AdamW([p for p in trained.transformer.parameters() if p.requires_grad])
    pg.load_checkpoint(tmp_path / "checkpoints" / "step-000002", trained, opt, opt_args)
    fresh = pg.load_pipeline("tiny", "cpu")
    base = pg.generate_images(fresh, ["a red apple"], [1], steps=4, resolution=32)[0]
    fresh.load_lora_weights(str(tmp_path / "checkpoints" / "step-000002"))  # diffusers' stock loader
    ours = pg.generate_images(trained, ["a red apple"], [1], steps=4, resolution=32)[0]
    stock = pg.generate_images(fresh, ["a red apple"], [1], steps=4, resolution=32)[0]
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(stock, dtype=int)).max() <= 1
    assert np.abs(np.asarray(base, dtype=int) - np.asarray(stock, dtype=int)).max() > 1  # training changed something


def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path):
    pg.train(tiny_args(tmp_path / "full", "--train-steps", "4"))
    pg.train(tiny_args(tmp_path / "cut", "--train-steps", "2"))
    pg.train(tiny_args(tmp_path / "ignored", "--train-steps", "4", "--resume", str(tmp_path / "cut")))
    assert not (tmp_path / "ignored").exists()  # a resumed run writes into its own run directory
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cut" / "checkpoints" / "step-000004" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(path):
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time", "images_per", "peak"))}
                for line in path.read_text().splitlines()]

    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(tmp_path / "cut" / "metrics.jsonl")


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    pg.train(tiny_args(tmp_path, "--train-steps", "2"))
    (tmp_path / "checkpoints" / ".tmp-000004").mkdir()  # what a kill mid-write leaves behind
    (tmp_path / "checkpoints" / "step-000006").mkdir()  # no state.json: not a complete checkpoint
    assert pg.find_checkpoint(str(tmp_path)).name == "step-000002"


def test_each_group_draws_its_own_noise_whatever_the_batch(pipe):
    """Noise is keyed by (seed, step, global group index): process 1 sampling group 2 alone gets the images that one
    process sampling all groups gets, and the same prompt in another group gets other noise."""
    args = pg.parse_args(["--resolution", "32", "--sample-steps", "4", "--group-size", "2"])
    ps = ["a red apple", "a red car", "a red apple"]
    whole = pg.sample_batch(pipe, ps, 3, args, torch.device("cpu"))
    alone = pg.sample_batch(pipe, ps[2:], 3, args, torch.device("cpu"), first_group=2)
    assert torch.allclose(whole["latents"][4:], alone["latents"], atol=1e-5)
    assert whole["trained"] == alone["trained"]  # every process trains the same sampling steps
    assert (whole["latents"][:2, 0] - whole["latents"][4:, 0]).abs().mean() > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# KL to the base model (--kl-beta)
# ---------------------------------------------------------------------------------------------------------------------
def test_gaussian_kl_is_the_closed_form_averaged_over_elements():
    m, mb = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m, 0.3), torch.distributions.Normal(mb, 0.3))
    assert torch.allclose(pg.gaussian_kl(m, mb, 0.3), ref.mean(dim=(1, 2)), atol=1e-6)


def test_kl_to_base_zero_untouched_positive_after_an_update_and_its_gradient_reduces_it():
    args = pg.parse_args(["--resolution", "32", "--sample-steps", "4", "--group-size", "3", "--kl-beta", "1"])
    p = pg.load_pipeline("tiny", "cpu")
    params = pg.trainable_parameters(p, args)
    batch = pg.sample_batch(p, ["a red apple"], 0, args, torch.device("cpu"))
    idx, j = torch.arange(3), batch["trained"][0]

    def kl():
        _, mean, std = pg.transition(p, batch, idx, j, args)
        with torch.no_grad(), pg.adapters_off(p.transformer):
            base_mean = pg.transition(p, batch, idx, j, args)[1]
        return pg.gaussian_kl(mean, base_mean, std).mean()

    assert kl().item() == 0  # LoRA's B starts at zero: the policy is the base model
    stats = pg.train_step(p, params, torch.optim.AdamW(params, lr=1e-2), batch, torch.tensor([1.0, 0.0, -1.0]),
                          batch["trained"], args)
    assert stats["kl"] == 0 and stats["skipped_update"] == 0 and all(q.requires_grad for q in params)
    before = kl()
    assert before.item() > 0
    before.backward()
    with torch.no_grad():  # a small gradient step on the KL alone
        for q in params:
            q -= 1e-2 * q.grad
    assert kl().item() < before.item()


def test_kl_with_full_fine_tuning_is_refused(capsys):
    with pytest.raises(SystemExit):
        pg.parse_args(["--full", "--kl-beta", "0.1"])
    assert "--kl-beta needs LoRA" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# SD3 (tiny-sd3): same loop, its own text encoding, latent layout, timestep scale and CFG
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3():
    return pg.load_pipeline("tiny-sd3", "cpu")


def test_sd3_deterministic_sampler_with_and_without_cfg_equals_the_stock_sd3_pipeline(sd3):
    noise = pg.initial_noise(sd3, 1, 32, torch.Generator().manual_seed(7))
    ours = {}
    for cfg in (1.0, 4.5):
        ours[cfg] = pg.generate_images(sd3, ["a red apple"], [7], steps=4, resolution=32, cfg_scale=cfg)[0]
        stock = sd3(["a red apple"], latents=noise, height=32, width=32, num_inference_steps=4, guidance_scale=cfg,
                    sigmas=list(np.linspace(1.0, 1 / 4, 4)), max_sequence_length=16).images[0]
        assert np.abs(np.asarray(ours[cfg], dtype=int) - np.asarray(stock, dtype=int)).max() <= 1
    assert not np.array_equal(np.asarray(ours[1.0]), np.asarray(ours[4.5]))


def test_sd3_on_policy_ratio_is_exactly_one_with_cfg(sd3):
    args = pg.parse_args(["--model", "tiny-sd3", "--cfg-scale", "4.5", "--resolution", "32", "--sample-steps", "4",
                          "--group-size", "3"])
    batch = pg.sample_batch(sd3, ["a red apple", "a blue car"], 5, args, torch.device("cpu"))
    assert batch["latents"].shape == (6, 5, 4, 16, 16)  # (images, T + 1, C, H, W): SD3 latents stay unpacked
    for j in range(4):
        lp, _, _ = pg.transition(sd3, batch, torch.arange(6), j, args)
        assert torch.equal(torch.exp(lp - batch["log_probs"][:, j]), torch.ones(6))


def test_sd3_training_step_and_its_lora_loads_into_a_stock_sd3_pipeline(tmp_path):
    args = tiny_args(tmp_path, "--model", "tiny-sd3", "--cfg-scale", "4.5", "--train-steps", "1", "--lr", "3e-2")
    pg.train(args)
    m = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert m["ratio"] == pytest.approx(1.0) and m["grad_norm"] > 0 and m["skipped_update"] == 0
    ckpt = tmp_path / "checkpoints" / "step-000001"
    trained = pg.load_pipeline("tiny-sd3", "cpu")
    opt = torch.optim.AdamW(pg.trainable_parameters(trained, args))
    pg.load_checkpoint(ckpt, trained, opt, args)
    fresh = pg.load_pipeline("tiny-sd3", "cpu")
    base = pg.generate_images(fresh, ["a red apple"], [1], steps=4, resolution=32)[0]
    fresh.load_lora_weights(str(ckpt))  # StableDiffusion3Pipeline's stock loader
    ours = pg.generate_images(trained, ["a red apple"], [1], steps=4, resolution=32)[0]
    stock = pg.generate_images(fresh, ["a red apple"], [1], steps=4, resolution=32)[0]
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(stock, dtype=int)).max() <= 1
    assert np.abs(np.asarray(base, dtype=int) - np.asarray(stock, dtype=int)).max() > 1  # training changed something


# ---------------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------------
def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert pg.load_prompts(str(txt)) == ["a cat", "a dog"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a cat", "theme": "x"}\n{"prompt": "a dog"}\n')
    assert pg.load_prompts(str(jl)) == ["a cat", "a dog"]
    if SHARED.is_dir():
        assert len(pg.load_prompts(str(SHARED / "train_prompt.txt"))) == 10_000


@pytest.mark.parametrize("content,message", [("", "has no prompts"), ("\n\n", "has no prompts"),
                                             ('{"prompt": "ok"}\n{"text": "x"}\n', "p.jsonl:2"),
                                             ('{"prompt": "ok"}\nnot json\n', "p.jsonl:2"),
                                             ('{"prompt": ""}\n', "non-empty")])
def test_bad_prompt_files_give_one_line_errors(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit, match=message) as err:
        pg.load_prompts(str(path))
    assert "\n" not in str(err.value)


def test_missing_inputs_give_one_line_errors_on_the_command_line(tmp_path):
    for flags, message in [(["--prompts", str(tmp_path / "nope.txt")], "does not exist"),
                           (["--model", str(tmp_path / "no" / "model")], "does not exist"),
                           (["--group-size", "1"], "at least 2")]:
        r = subprocess.run([sys.executable, "pref_grpo.py", *flags, "--output-dir", str(tmp_path / "run")],
                           capture_output=True, text=True, cwd=Path(__file__).parent, timeout=120)
        assert r.returncode != 0 and message in r.stderr
        assert "Traceback" not in r.stderr and len([l for l in r.stderr.splitlines() if "error" in l]) == 1


def test_pointwise_baseline_scores_groups_and_fills_failures_with_the_group_mean(tmp_path):
    imgs = [Image.new("RGB", (2, 2), c) for c in [(255, 0, 0), (0, 0, 255), (128, 0, 0), (0, 0, 0)]]
    rewards, info = pg.score_groups(pg.toy_scorer, ["a red car", "a car"], imgs, 2)
    d = [0.0, math.sqrt(2)]
    assert torch.allclose(rewards[0], torch.tensor([1 - d[0] / math.sqrt(3), 1 - d[1] / math.sqrt(3)]))
    assert torch.equal(rewards[1], torch.zeros(2)) and info["judge_failed"] == 2  # no colour named: no score
    assert torch.equal(pg.group_advantages(rewards)[1], torch.zeros(2))
    result = pg.train(tiny_args(tmp_path, "--train-steps", "1", "--reward", "pointwise", "--eval-seeds", "1"))
    m = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert m["reward_mean"] != pytest.approx(0.5) and 0 <= result["win_rate_final_vs_initial"] <= 1
