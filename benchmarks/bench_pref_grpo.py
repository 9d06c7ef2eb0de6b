"""Speed and memory of the Pref-GRPO training step, measured as ratios on the tiny random FLUX in one run.

    python benchmarks/bench_pref_grpo.py [--out runs/bench_pref_grpo.json] [--threads 1] [trainer flags]

1. rollouts: all G images of all prompts in one transformer call per step (`rollout`, as training does) vs one image
   at a time (one `rollout` call per image, as the official code loops), images/s from the same noise and prompts;
2. overhead: a full training step (the body of `train`'s loop) vs the sum of its parts timed alone (raw transformer
   forwards of sampling, VAE decode, the judge, raw forward+backward of the trained steps), with the rest attributed;
3. zero-std groups: `train_step` with half the groups' advantages zeroed (skipped) vs the same batch with none zeroed;
4. memory: peak memory increase of one `train_step` with and without gradient checkpointing, each in a fresh process
   (CPU: peak RSS with glibc made to unmap freed tensors at once, see `memory_child`), and the time it costs;
5. `--sde-window` and `--train-fraction`: step time per setting.

Every timing is the median of --repeats rounds; the variants compared with each other run interleaved, round by
round, so that load from other processes hits them alike. Prints a table and writes JSON (--out). 3-4 minutes on
2 CPU cores. Flags it does not know go to the trainer's parser (defaults here: --model tiny, 64 px, 2 prompts x G = 8,
8 sampling steps; the trainer trains a random 60% of each trajectory's transitions, the last one excluded).

On a GPU, `--model flux-random` is FLUX.1-dev's transformer and VAE with random weights (speed does not depend on the
weights; nothing is downloaded). Two calls of about 4-5 minutes each (an estimate):

    python benchmarks/bench_pref_grpo.py --model flux-random --resolution 512 --rollout-resolutions 256,512 \
        --mem-resolution 512 --sample-steps 6 --prompts-per-step 2 --group-size 4 --train-batch-size 2 --repeats 2 \
        --sections rollouts,overhead,skipping --out runs/bench_gpu_a.json
    python benchmarks/bench_pref_grpo.py ...the same... --sections memory,window --out runs/bench_gpu_b.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pref_grpo.py lives in the repo root

import argparse  # noqa: E402
import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import time

import diffusers
import torch

import pref_grpo as pg


# ======================================================================================================================
# Models
# ======================================================================================================================
def flux_random(device, dtype, layers=(19, 38)):
    """FLUX.1-dev's transformer and VAE with random weights (speed does not depend on the weights, and nothing is
    downloaded), and one-layer text encoders with FLUX's embedding widths (T5 4096, CLIP pooled 768) and the tiny
    model's word-level tokenizers; T5 prompts padded to 512 tokens as in FLUX. `layers`: double and single blocks."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab = len(pg.tiny_tokenizer(8))
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # build in the target dtype, on the device: no float32 copy of 12B weights
    try:
        with torch.device(device):
            transformer = FluxTransformer2DModel(num_layers=layers[0], num_single_layers=layers[1],
                                                 guidance_embeds=True)
            vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                                block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16,
                                scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                use_post_quant_conv=False)
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=768, intermediate_size=256,
                                                num_hidden_layers=1, num_attention_heads=12, projection_dim=768,
                                                max_position_embeddings=77, pad_token_id=0, bos_token_id=1,
                                                eos_token_id=1))
            t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=2,
                                         pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    finally:
        torch.set_default_dtype(default)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=pg.tiny_tokenizer(77),
                        text_encoder_2=t5, tokenizer_2=pg.tiny_tokenizer(512), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):  # as load_pipeline leaves them
        module.requires_grad_(False).eval()
    return pipe


def load(model: str, device, flux_layers: str):
    """`flux-random` (above), or anything `load_pipeline` takes: `tiny`, a hub id, a local path."""
    if model != "flux-random":
        return pg.load_pipeline(model, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as load_pipeline picks
    return flux_random(device, dtype, tuple(int(n) for n in flux_layers.split(",")))


# ======================================================================================================================
# Timing helpers
# ======================================================================================================================
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, repeats: int, device) -> dict:
    """Seconds of each function per round, run round-robin `repeats` times (one warm-up round first, not counted).
    A function may return a dict of extra timings, recorded under "<name>.<key>"."""
    times = {}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            extra = fn()
            sync(device)
            if r:
                times.setdefault(name, []).append(time.perf_counter() - start)
                for k, v in (extra or {}).items():
                    times.setdefault(f"{name}.{k}", []).append(v)
    return times


def medians(times: dict) -> dict:
    return {k: statistics.median(v) for k, v in times.items()}


# ======================================================================================================================
# The step as training runs it, and its parts run alone
# ======================================================================================================================
def full_step(pipe, params, optimizer, prompts, step, args, device) -> dict:
    """The body of `train`'s loop (sample, decode, judge, win rates, advantages, train_step) without logging/saving."""
    sync(device)
    t0 = time.perf_counter()
    batch = pg.sample_batch(pipe, prompts, step, args, device)
    images = pg.decode(pipe, batch["x0"], args.resolution)
    pref, _ = pg.judge_groups(pg.colour_judge, prompts, images, args.group_size, args.judge_order)
    adv = pg.group_advantages([pg.win_rates(pref)], [args.pref_weight], args.adv_clip).flatten()
    pg.train_step(pipe, params, optimizer, batch, adv, args)
    sync(device)
    return {"seconds": time.perf_counter() - t0,
            "skipped_groups": int((adv.view(-1, args.group_size) == 0).all(1).sum())}


def transformer_forward(pipe, x, timestep, guidance, cond, img_ids):
    """The transformer alone, with every input tensor prepared beforehand (what `velocity` wraps)."""
    with torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
        return pipe.transformer(hidden_states=x, timestep=timestep, guidance=guidance,
                                pooled_projections=cond["pooled"], encoder_hidden_states=cond["embeds"],
                                txt_ids=cond["text_ids"], img_ids=img_ids, return_dict=False)[0]


def parts(pipe, params, optimizer, prompts, args, device) -> dict:
    """Functions that each run one part of the step alone, on inputs prepared here once."""
    batch = pg.sample_batch(pipe, prompts, 0, args, device)
    n, steps, trained = batch["latents"].shape[0], args.sample_steps, batch["trained"]
    x = batch["latents"].to(pipe.transformer.dtype)
    cond, img_ids, sigmas = batch["cond"], batch["img_ids"], batch["sigmas"]
    timesteps = [torch.full((n,), float(s), device=device) for s in sigmas[:-1]]
    sigma_rows = sigmas.to(device)
    guidance = torch.full((n,), args.guidance, device=device) if pipe.transformer.config.guidance_embeds else None
    side = args.resolution // pipe.vae_scale_factor
    z = torch.randn(n, pipe.vae.config.latent_channels, side, side, device=device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        decoded = pipe.vae.decode(z).sample
    images = pg.decode(pipe, batch["x0"], args.resolution)
    G = args.group_size
    pairs = [(g * G + a, g * G + b, prompts[g]) for g in range(len(prompts))
             for a, b in pg.pair_schedule(G, args.judge_order)]
    pair_prompts = [p for _, _, p in pairs]
    images_a, images_b = [images[a] for a, _, _ in pairs], [images[b] for _, b, _ in pairs]

    @torch.no_grad()
    def sample_forwards():
        for i in range(steps):
            transformer_forward(pipe, x[:, i], timesteps[i], guidance, cond, img_ids)

    @torch.no_grad()
    def vae_decode():
        pipe.vae.decode(z)

    def judge():
        pg.colour_judge(pair_prompts, images_a, images_b)

    # train_step's updates: chunks of --accum trajectories, each cut into micro-batches of --train-batch-size; every
    # trajectory trains its own k steps (batch["trained"] is (n, k)), the j-th of them in the j-th pass
    updates = [c.split(args.train_batch_size or len(c)) for c in torch.arange(n).split(args.accum or n)]

    def train_forward_backward():
        optimizer_s = 0.0
        for micro in updates:
            pipe.transformer.train()
            for j in range(trained.shape[1]):
                for idx in micro:
                    t = trained[idx, j]
                    out = transformer_forward(pipe, x[idx, t], sigma_rows[t], None if guidance is None else
                                              guidance[idx], pg.select(cond, idx), img_ids)
                    out.float().square().mean().backward()
            pipe.transformer.eval()
            # Timed apart, inside this round: the optimizer update on the gradients just made, then cleared.
            sync(device)
            start = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            optimizer_s += time.perf_counter() - start
        return {"optimizer": optimizer_s}

    def encode_prompts():
        pg.encode_prompts(pipe, prompts, args.max_sequence_length)

    def to_pil():
        pipe.image_processor.postprocess(decoded, output_type="pil")

    return {"sample_forwards": sample_forwards, "vae_decode": vae_decode, "judge": judge,
            "train_forward_backward": train_forward_backward, "encode_prompts": encode_prompts, "to_pil": to_pil}


# ======================================================================================================================
# The five measurements
# ======================================================================================================================
def bench_rollouts(pipe, args, resolution, repeats, device) -> dict:
    """Images/s of one batched rollout over all images vs one rollout call per image, same noise and conditioning."""
    args = dataclasses.replace(args, resolution=resolution)
    prompts = pg.TINY_PROMPTS[:args.prompts_per_step]
    n = len(prompts) * args.group_size
    seq_len, img_ids = pg.latent_geometry(pipe, resolution)
    sigmas = pg.sigma_schedule(pipe, args.sample_steps, seq_len, args.shift)
    sde_mask = [True] * args.sample_steps
    cond = pg.select(pg.encode_prompts(pipe, prompts, args.max_sequence_length), torch.arange(n) // args.group_size)
    noise = pg.initial_noise(pipe, n, resolution, torch.Generator(device).manual_seed(0))
    gen = torch.Generator(device).manual_seed(1)

    def batched():
        pg.rollout(pipe, cond, noise, sigmas, sde_mask, args.eta, args.guidance, img_ids, gen)

    def one_at_a_time():
        for k in range(n):
            pg.rollout(pipe, pg.select(cond, [k]), noise[k:k + 1], sigmas, sde_mask, args.eta, args.guidance, img_ids,
                       gen)

    t = medians(interleaved({"batched": batched, "one_at_a_time": one_at_a_time}, repeats, device))
    return {"resolution": resolution, "seq_len": seq_len, "images": n, "steps": args.sample_steps,
            "batched_images_per_s": n / t["batched"], "one_at_a_time_images_per_s": n / t["one_at_a_time"],
            "speedup": t["one_at_a_time"] / t["batched"]}


def bench_overhead(pipe, params, optimizer, args, repeats, device) -> dict:
    """Full step vs the sum of its core parts; the difference is split into the glue parts measured alone."""
    prompts = pg.TINY_PROMPTS[:args.prompts_per_step]
    fns = parts(pipe, params, optimizer, prompts, args, device)
    skipped = []

    def step():
        out = full_step(pipe, params, optimizer, prompts, 0, args, device)
        skipped.append(out["skipped_groups"])

    times = interleaved({"full_step": step, **fns}, repeats, device)
    times["optimizer"] = times.pop("train_forward_backward.optimizer")
    core = ["sample_forwards", "vae_decode", "judge", "train_forward_backward"]
    glue = ["encode_prompts", "optimizer", "to_pil"]
    # Paired per round (the parts ran right after that round's step), so load changes between rounds cancel.
    rounds = [{k: v[r] for k, v in times.items()} for r in range(repeats)]
    core_sum = [sum(t[k] for k in core) for t in rounds]
    overhead = [t["full_step"] - c for t, c in zip(rounds, core_sum)]
    unattributed = [o - sum(t[k] for k in glue) for t, o in zip(rounds, overhead)]
    # Load from other processes only ever adds time, so the fastest rounds are a second, steadier estimate.
    fastest_core = sum(min(times[k]) for k in core)
    return {"seconds": medians(times), "rounds": times, "core_sum": statistics.median(core_sum),
            "overhead_s": statistics.median(overhead), "overhead_s_range": [min(overhead), max(overhead)],
            "overhead_pct": 100 * statistics.median([o / c for o, c in zip(overhead, core_sum)]),
            "overhead_fastest_pct": 100 * (min(times["full_step"]) - fastest_core) / fastest_core,
            "overhead_unattributed_s": statistics.median(unattributed), "skipped_groups_seen": max(skipped)}


def bench_skipping(pipe, params, optimizer, args, repeats, device) -> dict:
    """train_step on one batch: every group trained vs the first half of the groups zero-advantage (skipped); the full
    step runs in the same rounds, for the share of it that the skipped groups' training would have cost."""
    prompts = pg.TINY_PROMPTS[:args.prompts_per_step]
    batch = pg.sample_batch(pipe, prompts, 0, args, device)
    rewards = torch.rand(len(prompts), args.group_size, generator=torch.Generator().manual_seed(0))
    adv_all = pg.group_advantages([rewards], [1.0], args.adv_clip).flatten()
    adv_half = adv_all.clone()
    adv_half[:len(prompts) // 2 * args.group_size] = 0

    def none_zeroed():
        pg.train_step(pipe, params, optimizer, batch, adv_all, args)

    def half_zeroed():
        pg.train_step(pipe, params, optimizer, batch, adv_half, args)

    def step():
        full_step(pipe, params, optimizer, prompts, 0, args, device)

    t = medians(interleaved({"none_zeroed": none_zeroed, "half_zeroed": half_zeroed, "full_step": step}, repeats,
                            device))
    saved = t["none_zeroed"] - t["half_zeroed"]
    return {"groups": len(prompts), "zeroed_groups": len(prompts) // 2, "seconds": t,
            "saved_of_train_step_pct": 100 * saved / t["none_zeroed"],
            "saved_of_full_step_pct": 100 * saved / t["full_step"]}


def bench_window(pipe, params, optimizer, args, repeats, device, settings) -> list[dict]:
    """Full step time per (--sde-window, --train-fraction)."""
    prompts = pg.TINY_PROMPTS[:args.prompts_per_step]
    variants = {f"{w},{f}": dataclasses.replace(args, sde_window=w, train_fraction=f) for w, f in settings}

    def step(a):
        def run():
            full_step(pipe, params, optimizer, prompts, 0, a, device)
        return run

    t = medians(interleaved({key: step(a) for key, a in variants.items()}, repeats, device))
    base = t[next(iter(variants))]
    rows = []
    for key, a in variants.items():
        _, trained = pg.step_plan(a.sample_steps, a.sde_window, a.train_fraction, [torch.Generator().manual_seed(0)],
                                  a.group_size, torch.Generator().manual_seed(0))
        rows.append({"sde_window": a.sde_window, "train_fraction": a.train_fraction,
                     "trained_steps": trained.shape[1],
                     "step_s": t[key], "vs_first": t[key] / base})
    return rows


MMAP_THRESHOLD = 1 << 16


def memory_child(args, flux_layers, checkpointing, threads, queue):
    """In a fresh process: one warm-up train_step, then the peak memory increase of the next one.

    CPU: the parent starts this process with MALLOC_MMAP_THRESHOLD_ set, so glibc serves every allocation of 64 KiB
    or more (every tensor that matters) with its own mmap and unmaps it when freed. Without it glibc raises the
    threshold as tensors are freed and keeps freed heap mapped, and the peak RSS then measures the allocator's history
    more than the step (about twice the live bytes here). The peak-RSS counter (VmHWM) is reset through
    /proc/self/clear_refs just before the step, so the increase is what train_step itself holds at its peak.
    CUDA: torch's peak allocated bytes over the step."""
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    pipe = load(args.model, device, flux_layers)
    params = pg.trainable_parameters(pipe, args)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    prompts = pg.TINY_PROMPTS[:args.prompts_per_step]
    batch = pg.sample_batch(pipe, prompts, 0, args, device)
    adv = pg.group_advantages([torch.rand(len(prompts), args.group_size, generator=torch.Generator().manual_seed(0))],
                              [1.0], args.adv_clip).flatten()
    pg.train_step(pipe, params, optimizer, batch, adv, args)  # warm-up: optimizer state exists now

    def status(key):  # kB
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter to the current RSS
        base = status("VmRSS") * 1024
    stats = pg.train_step(pipe, params, optimizer, batch, adv, args)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status("VmHWM") * 1024
    queue.put({"checkpointing": checkpointing, "base_mib": base / 2**20, "peak_increase_mib": (peak - base) / 2**20,
               "grad_norm": stats["grad_norm"]})


def bench_memory(pipe, params, optimizer, args, repeats, device, threads, flux_layers) -> list[dict]:
    """Peak memory of train_step with checkpointing off and on (one fresh process each), and its time (this process,
    interleaved; the children's allocator setting would slow them)."""
    ctx = multiprocessing.get_context("spawn")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU's free memory to the children
    rows = []
    for checkpointing in (False, True):
        queue = ctx.Queue()
        child = ctx.Process(target=memory_child, args=(args, flux_layers, checkpointing, threads, queue))
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by the child's C library at start
        try:
            child.start()
        finally:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        rows.append(queue.get(timeout=900))
        child.join()

    prompts = pg.TINY_PROMPTS[:args.prompts_per_step]
    batch = pg.sample_batch(pipe, prompts, 0, args, device)
    adv = pg.group_advantages([torch.rand(len(prompts), args.group_size, generator=torch.Generator().manual_seed(0))],
                              [1.0], args.adv_clip).flatten()

    def step(checkpointing):
        def run():
            if checkpointing:
                pipe.transformer.enable_gradient_checkpointing()
            else:
                pipe.transformer.disable_gradient_checkpointing()
            pg.train_step(pipe, params, optimizer, batch, adv, args)
        return run

    was_on = pipe.transformer.is_gradient_checkpointing
    try:
        t = medians(interleaved({False: step(False), True: step(True)}, repeats, device))
    finally:
        if was_on:
            pipe.transformer.enable_gradient_checkpointing()
        else:
            pipe.transformer.disable_gradient_checkpointing()
    for row in rows:
        row["train_step_s"] = t[row["checkpointing"]]
    return rows


# ======================================================================================================================
# Main
# ======================================================================================================================
SECTIONS = ["rollouts", "overhead", "skipping", "memory", "window"]


def table(r: dict) -> list[str]:
    """The printed report, from the result dict (sections that did not run are left out)."""
    a, bench = r["args"], r["bench"]
    lines = [f"model {a['model']} + LoRA r{a['lora_rank']} | {a['prompts_per_step']} prompts x G={a['group_size']} "
             f"= {a['prompts_per_step'] * a['group_size']} images | {a['sample_steps']} steps | {a['resolution']} px "
             f"({r['seq_len']} tokens) | {r['device']}, {r['torch_threads']} thread(s)",
             f"medians of {bench['repeats']} rounds ({2 * bench['repeats']} in 2, {max(2, bench['repeats'] - 2)} in 5, "
             f"{max(2, bench['repeats'] - 3)} for the times in 4)"]
    if "rollouts" in r:
        lines += ["", "1. rollouts                         batched img/s   one-at-a-time img/s   speedup"]
        for x in r["rollouts"]:
            lines.append(f"   {x['resolution']:>4} px ({x['seq_len']:>5} tokens, {x['images']} img)   "
                         f"{x['batched_images_per_s']:>10.1f}   {x['one_at_a_time_images_per_s']:>19.1f}   "
                         f"{x['speedup']:>6.1f}x")
    if "overhead" in r:
        o = r["overhead"]
        s = o["seconds"]
        lines += ["", f"2. full step {s['full_step']:.3f} s vs core parts alone {o['core_sum']:.3f} s: "
                      f"overhead {o['overhead_s']:.3f} s = {o['overhead_pct']:.0f}% of the parts",
                  "   (overhead per round: {:.3f} .. {:.3f} s; fastest step vs fastest parts: {:.0f}%)".format(
                      *o["overhead_s_range"], o["overhead_fastest_pct"])]
        for k, label in [("sample_forwards", f"transformer forwards, sampling ({a['sample_steps']})"),
                         ("vae_decode", "VAE decode"), ("judge", "colour judge"),
                         ("train_forward_backward", "forward+backward, trained steps"),
                         ("encode_prompts", "  overhead: text encoders (encode_prompts)"),
                         ("optimizer", "  overhead: grad clip + AdamW step"),
                         ("to_pil", "  overhead: tensor -> PIL (decode)"),
                         ("rest", "  overhead: the rest (sde_step, log-probs, ...)")]:
            v = o["overhead_unattributed_s"] if k == "rest" else s[k]
            lines.append(f"   {label:<47}{v:>7.3f} s  {100 * v / s['full_step']:>4.0f}% of step")
    if "skipping" in r:
        k = r["skipping"]
        lines += ["", f"3. zero-std groups: train_step {k['seconds']['none_zeroed']:.3f} s with {k['groups']} groups "
                      f"trained, {k['seconds']['half_zeroed']:.3f} s with {k['zeroed_groups']} skipped: saves "
                      f"{k['saved_of_train_step_pct']:.0f}% of train_step, {k['saved_of_full_step_pct']:.0f}% of the "
                      f"step"]
        if "overhead" in r:
            lines.append(f"   (zero-std groups in the real steps of 2, most in one step: "
                         f"{r['overhead']['skipped_groups_seen']} of {k['groups']})")
    if "memory" in r:
        off, on = r["memory"]
        lines += ["", f"4. memory, one train_step at {bench['mem_resolution']} px ({r['mem_seq_len']} tokens), fresh "
                      f"process each, {'peak allocated' if r['device'] == 'cuda' else 'peak RSS'} increase:"]
        for m in r["memory"]:
            lines.append(f"   checkpointing {'on ' if m['checkpointing'] else 'off'}  "
                         f"peak +{m['peak_increase_mib']:>7.0f} MiB  train_step {m['train_step_s']:.2f} s")
        lines.append(f"   checkpointing: {on['peak_increase_mib'] / off['peak_increase_mib']:.2f}x the memory, "
                     f"{on['train_step_s'] / off['train_step_s']:.2f}x the time")
    if "window" in r:
        lines += ["", "5. --sde-window  --train-fraction  trained steps   step s   vs first"]
        for w in r["window"]:
            lines.append(f"   {w['sde_window']:>12}  {w['train_fraction']:>16}  {w['trained_steps']:>13}  "
                         f"{w['step_s']:>7.3f}   {w['vs_first']:>7.2f}x")
    lines.append(f"\nload average {r['load_average'][0]:.1f} at start, {r['load_average'][1]:.1f} at end; "
                 f"{r['seconds']:.0f} s in all")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], allow_abbrev=False,
        epilog="Any other flag is a trainer flag (pref_grpo.py --help): --model, --device, --resolution, --group-size, "
               "--prompts-per-step, --sample-steps, --train-batch-size, ...")
    parser.add_argument("--out", default="runs/bench_pref_grpo.json")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps timings steady on cores shared with other processes")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="a comma-separated subset of the default")
    parser.add_argument("--rollout-resolutions", default="16,64", help="px, comma-separated, for measurement 1")
    parser.add_argument("--mem-resolution", type=int, default=128, help="px, for measurement 4")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per timing (the median is reported)")
    parser.add_argument("--flux-layers", default="19,38", help="flux-random's double,single blocks (FLUX.1-dev: 19,38)")
    bench, rest = parser.parse_known_args(argv)
    sections = bench.sections.split(",")
    if set(sections) - set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(set(sections) - set(SECTIONS))}")
    # The benchmark's defaults first, so that the trainer flags given on the command line win.
    args = pg.parse_args(["--model", "tiny", "--resolution", "64", "--prompts-per-step", "2", "--group-size", "8",
                          "--sample-steps", "8",
                          *rest])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args = dataclasses.replace(args, device=str(device))
    torch.set_num_threads(bench.threads)
    result = {"date": time.strftime("%Y-%m-%d"), "cpu_cores": os.cpu_count(), "torch_threads": bench.threads,
              "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "bench": vars(bench), "args": dataclasses.asdict(args)}
    load_start, started = os.getloadavg()[0], time.perf_counter()

    pipe = load(args.model, device, bench.flux_layers)
    params = pg.trainable_parameters(pipe, args)  # LoRA, as training samples and trains with it
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.grad_checkpointing if args.grad_checkpointing is not None else device.type == "cuda":  # as train() does
        pipe.transformer.enable_gradient_checkpointing()
    result["seq_len"] = pg.latent_geometry(pipe, args.resolution)[0]
    result["mem_seq_len"] = pg.latent_geometry(pipe, bench.mem_resolution)[0]
    R, T = bench.repeats, args.sample_steps

    if "rollouts" in sections:
        result["rollouts"] = [bench_rollouts(pipe, args, int(res), R, device)
                              for res in bench.rollout_resolutions.split(",")]
    if "overhead" in sections:
        result["overhead"] = bench_overhead(pipe, params, optimizer, args, 2 * R, device)  # a difference: noisier
    if "skipping" in sections:
        result["skipping"] = bench_skipping(pipe, params, optimizer, args, R, device)
    if "memory" in sections:
        mem_args = dataclasses.replace(args, resolution=bench.mem_resolution)
        result["memory"] = bench_memory(pipe, params, optimizer, mem_args, max(2, R - 3), device, bench.threads,
                                        bench.flux_layers)
    if "window" in sections:
        result["window"] = bench_window(pipe, params, optimizer, args, max(2, R - 2), device,
                                        [(0, 1.0), (0, 0.6), (0, 0.3), (T // 2, 1.0), (T // 2, 0.6), (T // 4, 1.0)])

    result["load_average"], result["seconds"] = [load_start, os.getloadavg()[0]], time.perf_counter() - started
    result["table"] = table(result)
    print("\n".join(result["table"]))
    os.makedirs(os.path.dirname(bench.out) or ".", exist_ok=True)
    with open(bench.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {bench.out}")
    return result


if __name__ == "__main__":
    main()
