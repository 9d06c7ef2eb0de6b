"""Pref-GRPO: online RL for flow-matching text-to-image models with a pairwise preference reward (arXiv 2508.20751).

One training round, in the order of this file:
  1. Sample a group of G images per prompt with an SDE version of the flow sampler, keeping each step's log-prob.
  2. Judge pairs of images inside each group with a pairwise preference model (UnifiedReward-Think).
  3. Reward = each image's win rate inside its group (a tie counts half).
  4. Advantage = z-score of the win rates inside the group (optionally plus a z-scored CLIP score), clamped.
  5. Loss = PPO-style clipped ratio on the per-step log-probs of a random subset of each trajectory's steps.

Why pairwise: a pointwise reward model gives the images of a group scores that differ by tiny amounts; z-scoring
blows those gaps up into large "illusory" advantages that the policy learns to exploit. Win rates spread over [0, 1]
and keep their meaning.

Launch:
  python pref_grpo.py                                 # the offline demo (toy_world.py beside this file), CPU, minutes
  python pref_grpo.py --model tiny --train-steps 2    # smoke test: a tiny random FLUX, seconds, this file alone
  python pref_grpo.py --model tiny --judge-fn my_rewards:prefer   # your own judge: any function, module:name
  vllm serve CodeGoat24/UnifiedReward-Think-qwen-7b --served-model-name UnifiedReward --port 8080 \\
      --limit-mm-per-prompt '{"image": 2}'            # the reward model, on GPUs of its own
  torchrun --nproc_per_node 8 pref_grpo.py --preset pref-grpo-flux --prompts train_prompt.txt \\
      --judge-url http://localhost:8080/v1            # the paper's run on FLUX.1-dev (docs/recipe.md)
  python pref_grpo.py --resume runs/RUN               # continue a run from its latest checkpoint
  python pref_grpo.py --help                          # every flag, grouped, with its default
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import http.client
import importlib
import inspect
import io
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

# transformers warns on every start that torchvision is missing (it falls back to the PIL processors used here).
logging.getLogger("transformers.utils.import_utils").addFilter(lambda r: "requires torchvision" not in r.getMessage())


# ======================================================================================================================
# Flags
# ======================================================================================================================
@dataclasses.dataclass
class Args:
    # --- model and data
    model: str | None = None
    """hub id or folder: FLUX.1, SD3, Qwen-Image, Z-Image, FLUX.2 [klein]; tiny: a random FLUX; or module:function"""
    preset: str | None = None
    """a recipe's values under the flags given: a name in PRESETS or module:NAME (a dict); tiny models: tiny"""
    prompts: str | None = None
    """training prompts: a text file (one a line), JSON lines with a "prompt" field, a JSON list, or module:NAME"""
    eval_prompts: str | None = None
    """held-out prompts (same forms); default: the first --eval-count training prompts"""
    output_dir: str | None = None
    """where args.json, metrics.jsonl, samples/, eval/ and checkpoints/ go; default: runs/<date-time>"""
    resume: str | None = None
    """a run folder (continue from its latest checkpoint, with its args.json) or one checkpoint folder"""
    seed: int = 0
    """every random draw is a function of (seed, round, group): a resumed run repeats an uninterrupted one"""
    device: str | None = None
    """cuda, cuda:1, cpu, ... (default: cuda when available)"""

    # --- sampling
    train_steps: int = 300
    """sampling rounds (each: sample, judge, then optimizer updates of --accum trajectories)"""
    prompts_per_step: int = 0
    """prompts per round over all processes (a multiple of their number), a group each; 0: one per process (official)"""
    group_size: int = 8
    """G: images per prompt; rewards and advantages are computed inside each group"""
    sample_batch_size: int = 0
    """images per sampling forward, in whole groups (memory; the images do not change); 0: all of a process's"""
    sample_steps: int = 25
    """denoising steps of the sampler"""
    resolution: int = 720
    """image height and width in pixels (a multiple of the model's latent patch: 16 for FLUX.1-dev)"""
    guidance: float = 3.5
    """FLUX.1-dev's distilled guidance embedding (the other families have none)"""
    cfg_scale: float = 1.0
    """true classifier-free guidance in sampling and training forwards (doubles their batch); 1: off; SD3.5: 4.5"""
    eta: float = 0.7
    """SDE noise level: std_t = eta * sqrt(sigma / (1 - sigma))"""
    shift: float | None = 3.0
    """fixed flow shift of the sigma schedule (official: 3); none: FLUX's resolution-dependent shift"""
    same_noise: bool = True
    """all images of a group start from the same initial noise (the SDE noise alone makes them differ)"""
    sde_window: int = 0
    """> 0: SDE only on a random window of this many steps, Euler elsewhere (MixGRPO); 0: SDE on every step"""
    train_fraction: float = 0.6
    """share of each trajectory's transitions (never the last) trained, drawn per trajectory (official: 14 of 24)"""
    max_sequence_length: int = 512
    """T5 prompt length in tokens"""

    # --- judge
    reward: Literal["pairwise", "pointwise"] = "pairwise"
    """pairwise: win rates (Pref-GRPO); pointwise: a scorer's scores, z-scored as plain GRPO does (the baseline)"""
    judge_fn: str | None = None
    """your own pairwise judge, module:function: (prompts, images_a, images_b) -> P(a better than b) per pair"""
    scorer_fn: str | None = None
    """your own pointwise scorer for --reward pointwise, module:function: (prompts, images) -> a score per image"""
    judge_model: str = "UnifiedReward"
    """the reward server's served model name (with --judge-url), else a Qwen-VL hub id or folder run in this process"""
    judge_url: str | None = None
    """OpenAI-compatible base URL of the reward server, e.g. http://localhost:8080/v1"""
    judge_prompt: Literal["unifiedreward-think", "unifiedreward-think-qwen3vl"] = "unifiedreward-think"
    """the judge's prompt as trained: UnifiedReward-Think-qwen-7b's (paper) or -qwen3vl-8b's (official since 2025-12)"""
    judge_order: Literal["balanced", "both", "first"] = "balanced"
    """shown first: balanced (each image in half its pairs), both (every pair twice), first (lower index; official)"""
    judge_max_tokens: int = 2048
    """the judge's reply length limit in tokens (official: 2048)"""
    judge_image_size: int = 0
    """shrink images to this longer side before judging; 0: their own size (official)"""
    judge_workers: int = 32
    """requests in flight at once to the reward server (32: a group of 8's 28 requests go out in one wave)"""
    judge_timeout: float = 300.0
    """seconds per request before it is retried"""
    judge_retries: int = 10
    """retries per request after the first attempt; a pair that still fails is a tie, counted in judge_failed"""
    judge_retry_seconds: float = 60.0
    """a request stops retrying this many seconds after its first failure (waits double from 1 s, at most 10 s)"""
    judge_dead_rounds: int = 3
    """stop the run after this many rounds in a row without one verdict (the first round of a run: at once)"""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the reward server's API key (never printed)"""
    clip_model: str | None = None
    """CLIP model of the CLIP-score reward (hub id or folder, e.g. apple/DFN5B-CLIP-ViT-H-14-378; `tiny`); none: off"""
    clip_as_trained: bool = False
    """run the CLIP model as trained (DFN5B: 378 px, QuickGELU); default: as the official reward, 224 px and GELU"""
    pref_weight: float = 1.0
    """weight of the z-scored win rates in the advantage"""
    clip_weight: float = 0.0
    """weight of the z-scored CLIP scores in the advantage"""

    # --- advantages and loss
    adv_clip: float = 5.0
    """advantages are clamped to [-adv_clip, adv_clip]"""
    gdpo: bool = False
    """GDPO (official --apply_gdpo): z-score the weighted advantages again over the whole round, all processes'"""
    clip_range: float = 1e-4
    """PPO ratio clip; tiny because the log-probs are averaged over latent elements"""
    kl_beta: float = 0.0
    """weight of Flow-GRPO's KL term to the base model (LoRA switched off); 0 as in Pref-GRPO"""
    rationorm: bool = False
    """the official --rationorm: log-ratio plus the step means' gap, times the step's noise std; loss / |dt|"""

    # --- optimisation
    lr: float = 1e-5
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping"""
    accum: int = 4
    """trajectories per optimizer update over all processes, each accumulating its share (official: 256); 0: all"""
    train_batch_size: int = 0
    """trajectories per training forward/backward (memory); 0: this process's whole share of --accum"""
    full: bool = False
    """full fine-tuning instead of LoRA (under torchrun: sharded with FSDP2)"""
    lora_rank: int = 64
    """LoRA rank"""
    lora_alpha: float = 128.0
    """LoRA alpha"""
    grad_checkpointing: bool | None = None
    """recompute activations in the backward pass; default: on CUDA only (saves memory; on CPU it only costs time)"""

    # --- logging and checkpoints
    save_every: int = 20
    """save a checkpoint every N rounds (and at the end)"""
    keep_checkpoints: int = 2
    """how many of the latest checkpoints to keep"""
    sample_every: int = 20
    """save a grid of the round's samples every N rounds"""
    eval_every: int = 0
    """every N rounds: held-out images, current vs initial policy, by the same judge (and CLIP); 0: only at the end"""
    eval_count: int = 8
    """held-out prompts used ..."""
    eval_seeds: int = 4
    """... times this many held-out seeds, deterministic sampler; 0: no evaluation"""
    eval_fn: str | None = None
    """your own held-out metrics, module:function: (prompts, images) -> a dict of numbers per image (means logged)"""
    wandb_project: str | None = None
    """also log to this Weights & Biases project (pip install wandb); metrics.jsonl stays the record"""


# The official runs by name (CodeGoat24/Pref-GRPO; every value with its file and line in docs/recipe.md), each the
# global recipe on any number of processes: 64 prompts x G = 8 a round, an update every 256 trajectories, 3 epochs of
# the 10,000 training prompts (157 rounds each on 64 GPUs). Flags given on the command line override them.
PAPER_RUN = dict(model="black-forest-labs/FLUX.1-dev", full=True, resolution=720, sample_steps=25, eta=0.7, shift=3.0,
                 group_size=8, guidance=3.5, lr=1e-5, weight_decay=1e-4, max_grad_norm=1.0, clip_range=1e-4,
                 adv_clip=5.0, train_fraction=0.6, prompts_per_step=64, accum=256, train_batch_size=1, train_steps=471,
                 max_sequence_length=512, judge_model="UnifiedReward", judge_max_tokens=2048, judge_order="first",
                 judge_retries=9, clip_model="apple/DFN5B-CLIP-ViT-H-14-378", pref_weight=0.7, clip_weight=1.4,
                 save_every=20, sample_batch_size=8)
HEAD_RUN = {**PAPER_RUN, "pref_weight": 0.4, "clip_weight": 0.6, "rationorm": True, "gdpo": True,
            "judge_prompt": "unifiedreward-think-qwen3vl", "judge_max_tokens": 4096, "judge_timeout": 160.0}
PRESETS = {
    "pref-grpo-flux": PAPER_RUN,  # the paper's run: 0bd1a34 finetune_prefgrpo_flux.sh + train_flux_pref_grpo.py
    "pref-grpo-flux-head": HEAD_RUN,  # 3e787f6 scripts/full_train/ur_think_prefgrpo_flux.sh + _common_finetune.sh
    "pref-grpo-flux-head-lora": {**HEAD_RUN, "full": False, "lora_rank": 64, "lora_alpha": 128.0},  # scripts/lora/...
    # 3e787f6 scripts/full_train/ur_think_prefgrpo_qwenimage.sh and scripts/lora/lora_ur_think_prefgrpo_qwenimage.sh
    "pref-grpo-qwen-image": {**HEAD_RUN, "model": "Qwen/Qwen-Image", "sample_steps": 20},
    "pref-grpo-qwen-image-lora": {**HEAD_RUN, "model": "Qwen/Qwen-Image", "sample_steps": 20, "full": False,
                                  "lr": 1e-4, "lora_rank": 64, "lora_alpha": 128.0},
    # The smoke test on the random tiny models (seconds on a CPU), with the colour judge and prompts of this file.
    "tiny": dict(resolution=32, sample_steps=8, shift=None, group_size=8, prompts_per_step=4, lr=3e-4, accum=8,
                 lora_rank=16, lora_alpha=32.0, max_sequence_length=16, train_steps=120, save_every=40,
                 sample_every=20, eval_every=40, eval_seeds=4, eval_count=15, eta=0.3, prompts="pref_grpo:TINY_PROMPTS",
                 judge_fn="pref_grpo:colour_judge", scorer_fn="pref_grpo:colour_scorer"),
}
# `python pref_grpo.py` without --model, --preset or --resume: the offline demo, a world of shapes that toy_world.py
# (beside this file) draws, judges and pretrains a tiny FLUX on. Named, not imported: this file runs without it.
DEMO_PRESET = "toy_world:DEMO"
RANGES = {name: interval for interval, names in {  # allowed values, checked when the flags are parsed
    "[0,inf)": "prompts_per_step sample_batch_size guidance sde_window judge_image_size judge_retries pref_weight "
               "clip_weight kl_beta weight_decay accum train_batch_size eval_every eval_seeds",
    "[1,inf)": "train_steps max_sequence_length judge_max_tokens judge_workers lora_rank save_every keep_checkpoints "
               "sample_every eval_count cfg_scale judge_dead_rounds",
    "(0,inf)": "shift judge_timeout judge_retry_seconds adv_clip max_grad_norm lora_alpha", "(0,1)": "clip_range lr",
    "[2,inf)": "group_size sample_steps", "[8,8192]": "resolution", "[0,4294967295]": "seed", "(0,10]": "eta",
    "(0,1]": "train_fraction"}.items() for name in names.split()}
# What a resumed run may not change: the checkpoint's weights, optimizer state or random streams depend on them.
FIXED_ON_RESUME = ("model", "full", "lora_rank", "lora_alpha", "seed", "group_size", "prompts_per_step")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_object(spec: str, flag_name: str, hint: str | None = None):
    """`module:name` -> that object, imported from the working directory or the installed packages (`pref_grpo`: this
    file, also when run as a script). How your own judge, scorer, metrics, prompts, preset or model plug in."""
    module, _, name = spec.partition(":")
    if not module or not name.isidentifier():
        sys.exit(f"error: {flag_name} {spec!r}: expected module:name, e.g. my_rewards:prefer")
    if os.getcwd() not in sys.path:
        sys.path.insert(1, os.getcwd())
    try:
        found = sys.modules[__name__] if module in ("pref_grpo", "__main__") else importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name not in (module, module.split(".")[0]):
            raise  # the module was found but lacks a dependency: its own traceback says which
        where = hint or f"no module {module!r} in the working directory or the installed packages"
        sys.exit(f"error: {flag_name} {spec}: {where}")
    if not hasattr(found, name):
        sys.exit(f"error: {flag_name} {spec}: module {module!r} has no {name!r}")
    return getattr(found, name)


def build_parser(suppress: bool = False) -> argparse.ArgumentParser:
    """One --flag per Args field, its docstring as help; `suppress` leaves unset flags out (to tell the typed ones)."""
    presets = "\n".join(textwrap.fill(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), 118,
                                       subsequent_indent="    ") for name, values in PRESETS.items())
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{__doc__.split(chr(10) * 2, 3)[-1]}\nPresets (--preset NAME; flags given override them):\n{presets}\n"
               f"Without --model, --preset or --resume: --preset {DEMO_PRESET}, the offline demo, whose values differ "
               "from the defaults above (see toy_world.py).")
    parser.error = lambda message: sys.exit(f"error: {message}")  # one line, not usage + error
    fields, hints, group = {f.name: f.default for f in dataclasses.fields(Args)}, get_type_hints(Args), parser
    source = inspect.getsource(Args).splitlines()
    for line, doc in zip(source, source[1:]):  # a field's docstring is the line under it
        if m := re.match(r"\s+# --- (.+)", line):
            group = parser.add_argument_group(m[1])
        if not ((m := re.match(r"\s+(\w+): ", line)) and m[1] in fields):
            continue
        hint, default, doc = hints[m[1]], fields[m[1]], doc.strip().strip('"')
        shown = "" if "default" in doc or default is None else f" (default: {default})"  # each default once
        kw = dict(default=argparse.SUPPRESS if suppress else default, help=doc + shown)
        if hint in (bool, bool | None):
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(hint) is Literal:
            kw["choices"] = get_args(hint)
        else:
            base = next(t for t in (int, float, str) if t in (hint, *get_args(hint)))
            optional = type(None) in get_args(hint)  # `none` sets it to None
            kw["type"] = (lambda s, b=base: None if s.lower() == "none" else b(s)) if optional else base
        group.add_argument(flag(m[1]), **kw)
    return parser


def preset_values(name: str, typed: bool) -> dict:
    """A built-in preset, or a dict named module:NAME (the demo's lives in toy_world.py)."""
    if name in PRESETS:
        return PRESETS[name]
    if ":" not in name:
        sys.exit(f"error: --preset must be one of {', '.join(PRESETS)} or module:NAME (got {name!r})")
    hint = None if typed else ("python pref_grpo.py without --model runs the demo, which needs toy_world.py beside "
                               "this file; alone, it trains the model you name (--model), or --model tiny (a test)")
    values = load_object(name, "--preset", hint)
    if not isinstance(values, dict) or (bad := [k for k in values if k not in Args.__dataclass_fields__]):
        sys.exit(f"error: --preset {name}: not a dict of flag values" + (f" (unknown: {bad[0]})" if bad else ""))
    return values


def parse_args(argv: list[str] | None = None) -> Args:
    """Defaults <- preset <- a resumed run's args.json <- the flags given on the command line; then range checks."""
    values, given = (vars(build_parser(suppress).parse_args(argv)) for suppress in (False, True))
    base = {}
    if given.get("resume"):
        saved = Path(given["resume"])
        saved = saved if (saved / "args.json").is_file() else saved.parent.parent  # a checkpoint folder's run
        try:
            base = json.loads((saved / "args.json").read_text())
        except (OSError, ValueError):
            sys.exit(f"error: --resume {given['resume']}: no readable args.json in {saved}")
        base = {k: v for k, v in base.items() if k in values and k != "resume"}
    preset = given.get("preset", base.get("preset"))
    if preset is None and not base:  # tiny models get theirs; no model at all: the demo
        preset = "tiny" if given.get("model") == "tiny" else None if "model" in given else DEMO_PRESET
    preset_set = preset_values(preset, "preset" in given) if preset and not base else {}
    args = Args(**{**values, **preset_set, **base, **given, "preset": preset})
    args.given = sorted(given)  # which flags the user typed (not a field: args.json keeps resolved values only)
    if {"judge_url", "judge_model"} & set(given) and "judge_fn" not in given:
        args.judge_fn = None  # a judge named on the command line replaces the preset's function
    if not args.model:
        sys.exit("error: --model is required with this preset (a pipeline's hub id or folder)")
    for name, interval in RANGES.items():  # "(lo,hi]": open or closed ends
        v, (lo, hi) = getattr(args, name), (float(x) for x in interval[1:-1].split(","))
        if v is not None and not (lo <= v <= hi and (v, interval[0]) != (lo, "(") and (v, interval[-1]) != (hi, ")")):
            sys.exit(f"error: {flag(name)} must be in {interval} (got {v})")
    if args.sde_window >= args.sample_steps:
        sys.exit("error: --sde-window must be below --sample-steps (the last transition is never trained)")
    if args.kl_beta > 0 and args.full:  # a frozen copy of a 12B transformer would cost 24 GB more per GPU
        sys.exit("error: --kl-beta needs LoRA: the base model is the transformer with its adapter switched off, and "
                 "--full has no adapter")
    if args.clip_weight > 0 and not args.clip_model:
        sys.exit("error: --clip-weight needs --clip-model")
    if args.reward == "pointwise" and not args.scorer_fn:
        sys.exit("error: --reward pointwise needs --scorer-fn module:function (a score per image)")
    if args.device:
        try:
            dev = torch.device(args.device)
        except RuntimeError:
            sys.exit(f"error: --device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)")
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            sys.exit(f"error: --device {args.device}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return args


# ======================================================================================================================
# 1. Sampling: the flow ODE turned into an SDE with the same marginals, and each step's Gaussian log-prob
# ======================================================================================================================
def sigma_schedule(pipe, steps: int, image_seq_len: int, shift: float | None = None) -> torch.Tensor:
    """steps + 1 noise levels from 1 to 0 by diffusers' scheduler: a fixed shift (official: 3; no terminal stretch)
    or the model's own (FLUX, Qwen-Image: mu by image size; FLUX.2 [klein]: by image size and step count)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
    scheduler, cfg = pipe.scheduler, pipe.scheduler.config
    if shift is not None:
        scheduler = type(scheduler).from_config(cfg, use_dynamic_shifting=False, shift=shift, shift_terminal=None)
    mu = (None if not scheduler.config.use_dynamic_shifting else compute_empirical_mu(image_seq_len, steps)
          if family(pipe) == "klein" else calculate_shift(image_seq_len, cfg.base_image_seq_len,
                                                          cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu, device="cpu")
    return scheduler.sigmas.float().clone()


def sde_step(v, x, sigma, sigma_next, eta: float, sigma_cap: float, prev=None, generator=None):
    """One Flow-GRPO SDE step x_sigma -> x_sigma_next for a flow-matching velocity v, in float32 (sigma, sigma_next:
    numbers, or one per row when the training pass mixes steps of several trajectories):
      std_t  = eta * sqrt(sigma / (1 - sigma)), its pole at sigma = 1 capped at sigma_cap (the first sigma below 1)
      mean   = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt,  dt = sigma_next - sigma < 0
      x_next = mean + std_t sqrt(-dt) * noise
    Returns (x_next, its log-prob averaged over non-batch elements, mean, std_t per row); given `prev`, scores it
    instead of sampling (training). eta = 0: the deterministic Euler step, log-prob 0. A list of generators (one per
    group) draws the rows in equal blocks: a group's noise ignores the rest."""
    v, x = v.float(), x.float()
    col = (x.shape[0],) + (1,) * (x.ndim - 1)
    sigma, sigma_next = (torch.as_tensor(s, dtype=torch.float64, device=x.device).expand(x.shape[0]).reshape(col)
                         for s in (sigma, sigma_next))
    dt, std_t = sigma_next - sigma, eta * torch.sqrt(sigma / (1 - sigma.clamp(max=sigma_cap)))
    mean = (x * (1 + std_t**2 / (2 * sigma) * dt).float()
            + v * ((1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt).float())
    std = (std_t * torch.sqrt(-dt)).float()
    if prev is None and eta > 0:
        gens = generator if isinstance(generator, list) else [generator]
        rows = (x.shape[0] // len(gens), *x.shape[1:])
        prev = mean + std * torch.cat([torch.randn(rows, generator=g, device=x.device) for g in gens])
    prev = (mean if prev is None else prev).float().detach()
    if eta == 0:
        return prev, torch.zeros(x.shape[0], device=x.device), mean, std_t.float()
    log_prob = -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std_t.float()


@torch.no_grad()
def rollout(pipe, cond: dict, noise, sigmas, sde_mask: list[bool], eta: float, guidance: float, img_ids, generator,
            cfg_scale: float = 1.0, means: list | None = None):
    """Denoise the batch, one transformer call per step: all latents (n, T+1, ...), the transitions' log-probs (n, T;
    0 on Euler steps) and the last x0-prediction x - sigma v (the image to judge: without the last step's noise).
    A list given as `means` collects each step's mean (--rationorm needs them)."""
    x, latents, log_probs = noise.float(), [noise.float()], []
    for i in range(len(sigmas) - 1):
        v = velocity(pipe, x, float(sigmas[i]), cond, img_ids, guidance, cfg_scale)
        x0 = x - float(sigmas[i]) * v.float()
        x, lp, mean, _ = sde_step(v, x, float(sigmas[i]), float(sigmas[i + 1]), eta if sde_mask[i] else 0.0,
                                  float(sigmas[1]), generator=generator)
        if means is not None:
            means.append(mean)
        latents.append(x)
        log_probs.append(lp)
    return torch.stack(latents, 1), torch.stack(log_probs, 1), x0


def step_plan(steps: int, window: int, fraction: float, group_gens: list, G: int, step_gen):
    """The steps that use the SDE (all, or a random window drawn from step_gen) and, per trajectory, a random subset of
    them to train, in random order: (groups x G, k), each group drawing from its generator. The last transition is
    never trained: its target, the final latent, is not what gets judged (the x0-prediction is)."""
    start = int(torch.randint(0, steps - window, (1,), generator=step_gen)) if window else 0
    sde = list(range(start, start + window)) if window else list(range(steps))
    candidates = torch.tensor([s for s in sde if s < steps - 1])
    k = max(1, int(fraction * len(candidates)))
    trained = [candidates[torch.randperm(len(candidates), generator=g)[:k]] for g in group_gens for _ in range(G)]
    return [i in sde for i in range(steps)], torch.stack(trained)


# ======================================================================================================================
# 2. Judging pairs: judge(prompts, firsts, seconds) -> (P(the image shown first is better) or None, info)
# ======================================================================================================================
# UnifiedReward-Think's pairwise prompt, byte for byte as trained (`{prompt}` = the caption; MIT). Source: CodeGoat24/
# UnifiedReward, UnifiedReward-Think/benchmark_evaluation/GenAI-Bench-Image/test_qwen25_cot_genAI_bench_image.py.
UNIFIEDREWARD_THINK_PROMPT = (
    "Given a caption and two images generated based on this caption, please analyze in detail the two provided "
    "images. Evaluate them on various dimensions such as semantic consistency (how closely the image content aligns "
    "with the caption), aesthetics (composition, color usage, artistic expression), authenticity (realism and "
    "attention to detail), and any other factors you deem relevant. For each evaluation dimension, provide a score "
    "between 1-10 for both images (e.g., Image 1: 8/10, Image 2: 6/10) and provide a concise rationale for the score. "
    "Calculate the total score for each image by summing all dimension scores. Use a chain-of-thought process to "
    "detail your reasoning steps, and enclose all your detailed reasoning within <think> and </think> tags. Then, in "
    "the <answer> tag, output exactly one of the following strings: 'Image 1 is better' or 'Image 2 is better' based "
    "on the total scores. No additional text is allowed in the <answer> section.\n\nExample output format:\n<think>\n"
    "1. Semantic consistency: Image 1 (9/10) - ...; Image 2 (7/10) - ...\n2. Aesthetics: Image 2 (8/10) - ...; "
    "Image 1 (8/10) - ...\n3. Authenticity: Image 1 (8/10) - ...; Image 2 (5/10) - ...\n[Additional dimensions if "
    "any]: Image 2 (8/10) - ...; Image 1 (6/10) - ...\nTotal score:\nImage 1: 9+8+8+6=31\nImage 2: 7+8+5+8=28\n"
    "</think>\n<answer>Image 1 is better</answer>\n**Note: In the example above, scores and the final answer are "
    "placeholders meant only to demonstrate the format. Your actual evaluation should be based on the quality of two "
    "given images.**\n\nYour task is provided as follows:\nText Caption: [{prompt}]")
# UnifiedReward-Think-qwen3vl-8b's pairwise prompt, byte for byte as the official trainer sends it since 2025-12
# (CodeGoat24/Pref-GRPO fastvideo/rewards/templates.py get_unifiedreward_think_image_template; Pref-GRPO's licence
# terms, the UnifiedReward models MIT); same verdict format. The indentation and the trailing spaces are its own.
UNIFIEDREWARD_THINK_QWEN3VL_PROMPT = (
    "You are an objective and precise evaluator for image quality comparison. I will provide you with a text "
    "caption and two images generated based on this caption. You must analyze the two images carefully and "
    "determine which image is better.\n\n        Evaluation procedure:\n\n"
    "        1. The caption for the generated images is: 「{prompt}」. You must evaluate the two images across these "
    "core dimensions:\n        - Semantic consistency (how closely the image content aligns with the caption)\n"
    "        - Aesthetics (composition, color usage, artistic expression)\n"
    "        - Authenticity (realism and attention to detail)\n\n"
    "        2. You are also encouraged to add up to two additional evaluation dimensions if they are relevant to "
    "the specific caption or images (e.g., creativity, spatial layout, fine-grained detail). If no extra "
    "dimensions are relevant, just keep the three core dimensions.\n\n        3. For each evaluation dimension:\n"
    "        - Provide a score between 1–10 for both Image 1 and Image 2\n"
    "        - Provide a short rationale for each score (2–5 short sentences)\n"
    "        - The evaluation must follow exactly this format with line breaks and indentation:\n"
    "            Dimension name: \n                Image 1 (x/10) - rationale; \n"
    "                Image 2 (y/10) - rationale\n\n"
    "        4. After evaluating all dimensions, calculate the total score for each image and show the calculation "
    "explicitly, following this exact format:\n            Total score:\n            Image 1: x+x+x=total\n"
    "            Image 2: y+y+y=total\n\n"
    "        5. Wrap all reasoning and scoring strictly within <think> and </think> tags.\n\n"
    "        6. After </think>, output the final judgment strictly inside <answer> and </answer> tags, containing "
    "only one of:\n        - Image 1 is better\n        - Image 2 is better\n\n        Constraints:\n"
    "        - You must strictly follow the line breaks, indentation, and formatting shown in the example below.\n"
    "        - Do not merge multiple dimensions into one line. Each dimension must follow the 3-line block format "
    "shown below.\n        - Do not use Markdown formatting, bullet points, bold text, or headings.\n"
    "        - Do not output explanations outside <think> and <answer>.\n"
    "        - The <answer> tag must contain only the final string with no extra words.\n\n"
    "        Required output format:\n\n        <think>\n        1. Semantic consistency: \n"
    "            Image 1 (9/10) - ...; \n            Image 2 (7/10) - ...\n        2. Aesthetics: \n"
    "            Image 1 (8/10) - ...; \n            Image 2 (8/10) - ...\n        3. Authenticity: \n"
    "            Image 1 (8/10) - ...; \n            Image 2 (5/10) - ...\n        [Additional dimension if any]: \n"
    "            Image 1 (7/10) - ...; \n            Image 2 (8/10) - ...\n        [Additional dimension if any]: \n"
    "            Image 1 (6/10) - ...; \n            Image 2 (7/10) - ...\n        Total score:\n"
    "        Image 1: 9+8+8+7+6=38\n        Image 2: 7+8+5+8+7=35\n        </think>\n"
    "        <answer>Image 1 is better</answer>\n\n"
    "        Note: The example above is only to illustrate the exact format (line breaks, indentation, symbols, "
    "and style). Your actual evaluation must follow this format exactly, but be based on the given caption and "
    "images.\n        ")
JUDGE_PROMPTS = {"unifiedreward-think": UNIFIEDREWARD_THINK_PROMPT,
                 "unifiedreward-think-qwen3vl": UNIFIEDREWARD_THINK_QWEN3VL_PROMPT}
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def judge_text(prompt: str, template: str = "unifiedreward-think") -> str:
    return JUDGE_PROMPTS[template].replace("{prompt}", prompt)  # not .format: a prompt may hold braces


def parse_verdict(reply: str | None) -> float | None:
    """As the official trainer reads a reply of either prompt: the first <answer> with "Image 1 is better" -> 1.0,
    "Image 2 is better" -> 0.0; anything else is None, which counts as a tie (0.5), as there."""
    m = ANSWER.search(reply) if isinstance(reply, str) else None
    return None if not m else 1.0 if "Image 1 is better" in m[1] else 0.0 if "Image 2 is better" in m[1] else None


def pair_schedule(G: int, order: str) -> list[tuple[int, int]]:
    """The judged (shown first, shown second) pairs of a group. `first`: lower index first, as the official trainer
    (image 0 is shown first in all its comparisons, image G - 1 in none: a judge's position bias shifts their win
    rates apart). `balanced`: lower index first iff i + j is odd: every image first in floor or ceil of (G - 1) / 2 of
    its comparisons. `both`: every pair in both orders."""
    pairs = [(i, j) for i in range(G) for j in range(i + 1, G)]
    if order == "balanced":
        return [(i, j) if (i + j) % 2 else (j, i) for i, j in pairs]
    return pairs + ([(j, i) for i, j in pairs] if order == "both" else [])


def judge_groups(judge, prompts: list[str], images: list[Image.Image], G: int, order: str = "balanced"):
    """Judge the scheduled pairs inside each group (never across groups) in one call. Returns the preference matrices
    P[g, i, j] = P(image i beats j) = 1 - P[g, j, i] (both orders: their mean; a failed judgment: a tie), and info."""
    schedule = pair_schedule(G, order)
    reqs = [(g, a, b) for g in range(len(prompts)) for a, b in schedule]
    p_first, info = judge([prompts[g] for g, _, _ in reqs], [images[g * G + a] for g, a, _ in reqs],
                          [images[g * G + b] for g, _, b in reqs])
    total, count = torch.zeros(len(prompts), G, G), torch.zeros(len(prompts), G, G)
    for (g, a, b), p in zip(reqs, p_first):
        if p is not None:
            total[g, [a, b], [b, a]] += torch.tensor([p, 1 - p])
            count[g, [a, b], [b, a]] += 1
    pref = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, 0.5))
    valid = [p for p in p_first if p is not None]
    info = {"judge_requests": len(reqs), "judge_failed": len(reqs) - len(valid),
            # share won by the image shown first: 0.5 = no position bias (a group's images are exchangeable)
            "judge_first_preferred": sum(valid) / len(valid) if valid else 0.5, **info}
    if order == "both":  # pairs whose two orders prefer different images; measurable in this mode only
        per, half = len(schedule), len(schedule) // 2  # a group's requests: its pairs, then the same swapped
        both = [(p_first[g * per + i], p_first[g * per + half + i]) for g in range(len(prompts)) for i in range(half)]
        both = [(x, y) for x, y in both if x is not None and y is not None]
        info["judge_order_disagree"] = sum((x - 0.5) * (0.5 - y) < 0 for x, y in both) / max(len(both), 1)
    return pref, info


def score_groups(scorer, prompts: list[str], images: list[Image.Image], group_size: int):
    """Pointwise baseline: one score per image, (groups, G); a failed score takes its group's mean (zero advantage)."""
    scores, info = scorer([p for p in prompts for _ in range(group_size)], images)
    r = torch.tensor([float("nan") if x is None else float(x) for x in scores]).view(len(prompts), group_size)
    fill = torch.nanmean(r, 1, keepdim=True).nan_to_num(0.0).expand_as(r)
    failed = sum(x is None for x in scores)
    return torch.where(r.isnan(), fill, r), {"judge_requests": len(images), "judge_failed": failed, **info}


# ======================================================================================================================
# 3. Win rate: each image's share of wins against the other G - 1 images of its group
# ======================================================================================================================
def win_rates(pref: torch.Tensor) -> torch.Tensor:
    """pref (groups, G, G), pref[g, i, j] = P(i beats j) -> (groups, G) win rates; a complete group sums to G / 2."""
    G = pref.shape[-1]
    return (pref.sum(-1) - pref.diagonal(dim1=-2, dim2=-1)) / (G - 1)


# ======================================================================================================================
# 4. Advantage: z-score inside the group (each reward on its own), weighted sum, clamped
# ======================================================================================================================
def group_zscore(rewards: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(groups, G) -> (r - group mean) / (group std + eps), Bessel-corrected as officially; an all-equal group: 0."""
    z = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)
    return torch.where((rewards == rewards[:, :1]).all(1, keepdim=True), torch.zeros_like(z), z)


def round_zscore(adv: torch.Tensor, device="cpu", eps: float = 1e-8) -> torch.Tensor:
    """GDPO: (A - mean) / (std + eps) over every trajectory of the round on all processes (Bessel-corrected std, as
    the official --apply_gdpo). Only sums cross processes: n, sum A, sum A^2."""
    s = all_reduce({"n": adv.numel(), "sum": adv.sum().item(), "sq": adv.double().pow(2).sum().item()}, device)
    mean = s["sum"] / s["n"]
    return (adv - mean) / (math.sqrt(max(s["sq"] - s["n"] * mean**2, 0.0) / (s["n"] - 1)) + eps)


def group_advantages(rewards: list[torch.Tensor], weights: list[float], clip: float = 5.0, gdpo: bool = False,
                     device="cpu") -> torch.Tensor:
    """A = sum_k w_k z(r_k), each reward z-scored inside its group (win rates and CLIP scores live on different
    scales), with --gdpo z-scored again over the round, clamped to [-clip, clip] (paper: 0.7 z(win rate) + 1.4
    z(CLIP cosine), clamp 5). GDPO keeps only the weights' ratio: 0.4 : 0.6 is 2 : 3."""
    adv = sum(w * group_zscore(r) for r, w in zip(rewards, weights))
    return (round_zscore(adv, device) if gdpo else adv).clamp(-clip, clip)


# ======================================================================================================================
# 5. Loss: PPO clipped ratio on per-step log-probs, an optimizer update every --accum trajectories
# ======================================================================================================================
def grpo_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """mean over samples of max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(log_prob - old_log_prob)."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    with torch.no_grad():
        stats = {"clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(), "ratio": ratio.mean().item(),
                 "ratio_dev": (ratio - 1).abs().max().item(),
                 "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean().item()}
    return loss, stats


def flow_grpo_kl(mean, base_mean, std_t) -> torch.Tensor:
    """Flow-GRPO's KL term per sample: the squared gap of the two steps' means, averaged over latent elements, over
    2 std_t^2. (The true KL of the two Gaussian steps is this times -dt: their std is std_t sqrt(-dt).)"""
    return ((mean - base_mean) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std_t.flatten() ** 2)


def rationorm(log_prob, old_log_prob, mean, old_mean, std_t, dt):
    """The official --rationorm, per row: with s = std_t sqrt(|dt|) the step's noise std, log r = s (log_prob -
    old_log_prob + mean |mean - old_mean|^2 / (2 s^2)), that is the mean of the step's sampled unit noise times the
    policy's shift of the mean; the loss term is then divided by |dt|. Returns (log r, 1 / |dt|)."""
    s = std_t.flatten() * dt.abs().sqrt()
    gap = ((mean - old_mean) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * s**2)
    return (log_prob - old_log_prob + gap) * s, 1 / dt.abs()


def transition(pipe, batch: dict, idx, steps, args: Args):
    """Transitions steps[r] -> steps[r] + 1 of trajectories idx[r] under the current weights: (log-prob of the stored
    next latent, with gradient; the step's mean; std_t)."""
    sig, lat = batch["sigmas"], batch["latents"]
    x = lat[idx, steps]
    v = velocity(pipe, x, sig[steps], select(batch["cond"], idx), batch["img_ids"], args.guidance, args.cfg_scale)
    return sde_step(v, x, sig[steps], sig[steps + 1], args.eta, float(sig[1]), prev=lat[idx, steps + 1])[1:]


@torch.no_grad()
def base_mean(pipe, batch: dict, idx, steps, args: Args) -> torch.Tensor:
    """The transitions' means under the base model: the same transformer, its LoRA adapter switched off (no copy)."""
    pipe.transformer.disable_adapters()
    try:
        return transition(pipe, batch, idx, steps, args)[1]
    finally:
        pipe.transformer.enable_adapters()


def accumulation(accum: int, world: int, per_process: int) -> tuple[int, str]:
    """--accum is global: trajectories per optimizer update over all processes, each process accumulating accum / world
    of its own (0: all of them, one update a round). Returns that share and a line for the start-up message."""
    if accum % world:
        sys.exit(f"error: --accum ({accum}) counts trajectories per update over all {world} processes and must be a "
                 f"multiple of {world}")
    share = min(accum // world or per_process, per_process)
    full, rest = divmod(per_process, share)
    return share, (f"{full + (rest > 0)} update(s) a round over {share * world} trajectories each ({share} per "
                   f"process){f', the last over {rest * world}' if rest else ''}")


def train_step(pipe, params, optimizer, batch: dict, adv: torch.Tensor, args: Args) -> dict:
    """Section 5 for one round: an optimizer update per --accum trajectories of all processes, the loss a mean over
    them and their trained transitions. Update j takes the j-th slice of every group (official: each GPU's first 4 of
    8, then the last 4); after the first it is off-policy (the clip acts). Zero-advantage trajectories run no forward,
    yet an update of only those still steps, as officially. A non-finite loss or gradient norm: FloatingPointError."""
    dev, trained, world = batch["latents"].device, batch["trained"], world_size()
    (n, k), sharded, size = trained.shape, args.full and world > 1, accumulation(args.accum, world, trained.shape[0])[0]
    order = torch.arange(n).view(-1, args.group_size).t().flatten()  # every group's first trajectories, then ...
    sums = {"loss": 0.0, "clip_frac": 0.0, "ratio": 0.0, "approx_kl": 0.0, **({"kl": 0.0} if args.kl_beta else {})}
    out, terms = {"updates": 0, "ratio_dev": 0.0, "grad_norm": 0.0}, 0
    pipe.transformer.train()
    for start in range(0, n, size):
        chunk = order[start:start + size]
        keep, finite = chunk[adv[chunk] != 0], True
        weight = 1.0 / (len(chunk) * world * k)  # each term's share of the mean over the update's trajectories
        micro = list(keep.split(args.train_batch_size or size)) if len(keep) else []
        if sharded:  # FSDP gathers weights inside each forward: every process must run as many passes
            micro += [keep[:0]] * (int(all_reduce({"n": len(micro)}, dev, "max")["n"]) - len(micro))
        for idx in micro:
            w, rows = weight * len(idx), len(idx)  # statistics: a mean over the real (trajectory, transition) terms
            idx = idx if len(idx) else chunk[:1]  # a padding pass carries weight 0
            for j in range(k):
                steps = trained[idx, j]
                lp, mean, std_t = transition(pipe, batch, idx, steps, args)
                old, a = batch["log_probs"][idx, steps], adv[idx].to(lp.device)
                if args.rationorm:
                    dt = (batch["sigmas"][steps + 1] - batch["sigmas"][steps]).to(lp.device)
                    lp, scale = rationorm(lp, old, mean, batch["means"][idx, steps], std_t, dt)
                    old, a = torch.zeros_like(old), a * scale  # a positive factor per row passes through the max
                loss, s = grpo_loss(lp, old, a, args.clip_range)
                if args.kl_beta:  # Flow-GRPO's KL to the base model on the same transition
                    kl = flow_grpo_kl(mean, base_mean(pipe, batch, idx, steps, args), std_t).mean()
                    loss, s["kl"] = loss + args.kl_beta * kl, kl.item()
                (loss * w).backward()
                s["loss"] = loss.item()
                finite &= math.isfinite(s["loss"])
                out["ratio_dev"] = max(out["ratio_dev"], s.pop("ratio_dev") if rows else 0.0)
                for key, value in s.items():
                    sums[key] += value * rows
                terms += rows
        if world > 1 and not sharded:
            sum_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        bad_loss = all_reduce({"bad": not finite}, dev, "max")["bad"]  # the same verdict on every process
        if bad_loss or not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)  # the weights stay as they were: the caller stops the run
            raise FloatingPointError("non-finite loss" if bad_loss else f"non-finite gradient norm ({norm})")
        for p in params:  # no gradient (all advantages 0) is a zero gradient: AdamW skips parameters without one
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out["updates"], out["grad_norm"] = out["updates"] + 1, max(out["grad_norm"], norm)
    pipe.transformer.eval()
    sums = all_reduce({**sums, "terms": terms}, dev)
    terms = max(sums.pop("terms"), 1)
    return {**{key: v / terms for key, v in sums.items()}, **out}


# ======================================================================================================================
# Models: FLUX.1, SD3, Qwen-Image, Z-Image or FLUX.2 [klein] (hub id or folder), or a tiny random one built offline
# ======================================================================================================================
COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
TINY_PROMPTS = [f"a red {thing}" for thing in ("apple", "car", "house", "bird", "boat", "flower")]
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)


def tiny_tokenizer(max_length: int = 16):
    """A word-level tokenizer built in memory; every text ends with </s>, where CLIP pools (else it is prompt-blind)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    words = ["a", "an", "the", "of", "in", "on", "with", *COLOURS, "apple", "car", "house", "bird", "boat", "flower"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *words])}, "<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_pipeline(seed: int = 0):
    """A random FLUX at toy size (the real classes, 2 blocks, CLIP, T5), its VAE decoder made close to linear: a random
    one maps every latent to nearly one colour, and the colour judge needs the latent's colour to show."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(seed)
    vocab = len(tiny_tokenizer())
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0, scaling_factor=1.0)
    with torch.no_grad():  # residual blocks start as identity, a flat output norm, a strong output gain
        for name, p in vae.decoder.named_parameters():
            if ("resnets" in name and "conv2" in name) or ("attentions" in name and "to_out" in name):
                p.zero_()
        vae.decoder.conv_norm_out.weight.fill_(0.3)
        vae.decoder.conv_out.weight.mul_(20.0)  # 0.3 x 20 = 6: strong enough to reach saturated colours
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, projection_dim=32, **TINY_CLIP_TEXT))
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, text_encoder_2=t5,
                        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer())


FAMILIES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3", "QwenImagePipeline": "qwen",
            "ZImagePipeline": "zimage", "Flux2KleinPipeline": "klein"}  # the pipeline classes handled here


def family(pipe) -> str:
    return FAMILIES[type(pipe).__name__]


def hub_error(name: str, err: Exception, what: str) -> str:
    """One line on why a hub id or folder did not load, and what to do about it."""
    text, kind = str(err), type(err).__name__
    if "Gated" in kind or "gated" in text.lower() or "401" in text:
        return (f"error: {what} {name!r} is gated or private: accept its licence on its hub page, then log in "
                "(`hf auth login`) or set HF_TOKEN")
    if "RepositoryNotFound" in kind or "404" in text:
        return f"error: {what} {name!r}: no such repository on the hub (check the id; private ones need HF_TOKEN)"
    if "LocalEntryNotFound" in kind or re.search(r"offline|not fully cached|outgoing traffic|requested files", text):
        return (f"error: {what} {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
                f"(offline?): download it first (`hf download {name}`) or pass a local folder")
    return f"error: cannot load {what} {name!r}: {' '.join(text.split())[:300] or kind}"


def check_model_name(name: str, what: str) -> None:
    """A folder must exist with every component its model_index.json names; `org/name` is a hub id (resolved later)."""
    if not os.path.exists(name) and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        sys.exit(f"error: {what} {name!r}: no such folder, and not a hub id (org/name)")
    try:
        parts = json.loads((Path(name) / "model_index.json").read_text()) if os.path.isdir(name) else {}
    except (OSError, ValueError):
        parts = {}  # not a pipeline folder (a judge, CLIP), or one the loader will name the fault of
    for part, (library, _) in ((k, v) for k, v in parts.items() if isinstance(v, list) and len(v) == 2):
        if library and not (Path(name) / part).is_dir():
            sys.exit(f"error: {what} {name}: its model_index.json names a {part!r} component, but {part}/ is missing")


def load_pipeline(model: str, device=None, dtype=None):
    """`tiny` or a pipeline of a family in FAMILIES (hub id or folder) on `device`, frozen (training unfreezes)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model == "tiny":
        pipe = tiny_pipeline()
    else:
        from diffusers import DiffusionPipeline
        check_model_name(model, "--model")
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        try:  # from_pretrained keeps the modules that must stay float32 in float32
            pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
        except (OSError, ValueError, TypeError, KeyError) as err:  # missing files, bad id, gated, offline, corrupt
            sys.exit(hub_error(model, err, "--model"))
        if type(pipe).__name__ not in FAMILIES:
            sys.exit(f"error: --model {model!r} is a {type(pipe).__name__}; supported: FLUX.1, SD3, Qwen-Image, "
                     f"Z-Image, FLUX.2 [klein] ({', '.join(FAMILIES)})")
    pipe.to(device).set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


# The official LoRA targets (peft matches name suffixes; CodeGoat24/Pref-GRPO fastvideo/train_*.py at 3e787f6): FLUX
# and SD3 attention (SD3.5's second one too) and feed-forwards; Qwen-Image both streams' attention (train_qwenimage.py
# line 1466); Z-Image attention (train_zimage.py line 1615); klein both block kinds (train_flux2_klein.py 1097-1111).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LORA_TARGETS = {"flux": ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
                "qwen": ATTENTION, "zimage": ATTENTION[:4], "klein": ["attn." + m for m in ATTENTION] + [
                    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                    "attn.to_qkv_mlp_proj"]}
LORA_TARGETS["sd3"] = LORA_TARGETS["flux"]


def trainable_parameters(pipe, args: Args) -> list[torch.nn.Parameter]:
    """LoRA adapters through diffusers' add_adapter (peft), or the whole transformer with --full. Trained weights are
    kept in float32 (master weights); forwards run under bf16 autocast on CUDA."""
    transformer = pipe.transformer
    if args.full:
        transformer.requires_grad_(True)
    else:
        from peft import LoraConfig
        with torch.random.fork_rng(devices=[]):  # the adapter's random A from --seed too (torch seeds at random)
            torch.manual_seed(args.seed)
            transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights=True,
                                               target_modules=LORA_TARGETS[family(pipe)]))  # official: Kaiming A, 0 B
    for p in (p for p in transformer.parameters() if p.requires_grad):
        p.data = p.data.float()
    if args.full and world_size() > 1:
        shard_transformer(transformer)  # replaces the parameters by this process's shards (DTensors)
    return [p for p in transformer.parameters() if p.requires_grad]


# The model-specific parts, family by family: text encoding, latent layout, the transformer call, decoding.
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int = 512, negative: bool = False) -> dict:
    """Text conditioning, one row per prompt (encoders frozen), by the pipeline's own encode_prompt: FLUX = CLIP pooled
    + T5 sequence; SD3 = CLIP-L and CLIP-G pooled + [CLIP-L | CLIP-G, T5] sequence; Qwen-Image = Qwen2.5-VL sequence
    and its mask; Z-Image = a list of unpadded Qwen3 sequences; klein = Qwen3 layers 9, 18, 27 side by side.
    `negative` adds the empty prompt's, for CFG."""
    fam, dev = family(pipe), pipe.transformer.device
    tok = pipe.tokenizer_3 if fam == "sd3" else pipe.tokenizer_2 if fam == "flux" else pipe.tokenizer
    n = min(max_sequence_length, tok.model_max_length)
    with torch.no_grad():
        if fam == "sd3":
            out = pipe.encode_prompt(prompts, None, None, device=dev, do_classifier_free_guidance=False,
                                     max_sequence_length=n)
            cond = {"embeds": out[0], "pooled": out[2]}
        elif fam == "flux":  # (embeds, pooled, text_ids)
            cond = dict(zip(("embeds", "pooled", "text_ids"), pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=dev, max_sequence_length=n)))
        elif fam == "qwen":  # the empty prompt in the same batch: one padded length, the mask marks the padding
            embeds, mask = pipe.encode_prompt(prompts + [""] * negative, dev, max_sequence_length=min(n, 1024))
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev) if mask is None else mask
            cond = {"embeds": embeds, "mask": mask}
            return {**select(cond, slice(len(prompts))), **({"neg": select(cond, -1)} if negative else {})}
        elif fam == "zimage":  # a copy: its encode_prompt writes the chat template into the list it is given
            cond = {"embeds": pipe.encode_prompt(list(prompts), dev, False, max_sequence_length=n)[0]}
        else:
            cond = dict(zip(("embeds", "text_ids"), pipe.encode_prompt(prompts, dev, max_sequence_length=n)))
    if negative:
        cond["neg"] = select(encode_prompts(pipe, [""], max_sequence_length), 0)
    return cond


ROWS = ("embeds", "pooled", "mask")  # the per-sample conditioning; text ids are shared by all rows


def select(cond: dict, index) -> dict:
    """The conditioning rows of some samples (text ids and the empty prompt's "neg" are shared by all rows)."""
    def rows(v):  # Z-Image's sequences are a list (a list of one for a single index)
        return [v[i] for i in torch.as_tensor(index).reshape(-1).tolist()] if isinstance(v, list) else v[index]
    return {k: (rows(v) if k in ROWS else v) for k, v in cond.items()}


def latent_geometry(pipe, resolution: int) -> tuple[int, torch.Tensor | list | None]:
    """Image-token count (the dynamic shifts depend on it) and positional ids: FLUX packs latents to (B, tokens, 4C)
    with 3-coordinate ids, klein to (B, tokens, 4C) with 4-coordinate ids, Qwen-Image to (B, tokens, 4C) with its
    img_shapes; SD3 and Z-Image keep (B, C, H, W) and their transformers cut patches themselves."""
    fam = family(pipe)
    multiple = pipe.vae_scale_factor * (pipe.transformer.config.patch_size if fam == "sd3" else 2)
    if resolution % multiple:
        sys.exit(f"error: --resolution must be a multiple of {multiple} for this model (got {resolution})")
    side = resolution // multiple
    if fam in ("sd3", "zimage"):
        return side ** 2, None
    if fam == "qwen":
        return side ** 2, [(1, side, side)]
    if fam == "klein":
        return side ** 2, pipe._prepare_latent_ids(torch.empty(1, 0, side, side)).to(pipe.transformer.device)
    ids = pipe._prepare_latent_image_ids(1, side, side, pipe.transformer.device, pipe.transformer.dtype)
    return ids.shape[0], ids


def initial_noise(pipe, n: int, resolution: int, generator) -> torch.Tensor:
    """n Gaussian latents in the model's layout (a list of generators gives each image its own seed)."""
    unpacked, channels = family(pipe) in ("sd3", "zimage"), pipe.transformer.config.in_channels
    x = pipe.prepare_latents(n, channels if unpacked else channels // 4, resolution, resolution, torch.float32,
                             pipe.transformer.device, generator)
    return x[0] if isinstance(x, tuple) else x  # FLUX and klein also return their positional ids


def velocity(pipe, x, sigma, cond: dict, img_ids, guidance: float, cfg_scale: float = 1.0) -> torch.Tensor:
    """Flow-matching velocity at noise level sigma (a number or one per row). The timestep the transformer takes:
    sigma (FLUX, Qwen-Image, klein), 1000 sigma (SD3), 1 - sigma (Z-Image, which predicts the negative velocity).
    guidance: FLUX.1-dev's distilled guidance embedding. cfg_scale != 1: v_neg + cfg_scale (v_pos - v_neg)."""
    transformer, n, fam = pipe.transformer, x.shape[0], family(pipe)
    t = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(n)  # float32 in sampling and training
    if cfg_scale != 1 and not pipe.config.get("is_distilled"):  # klein-4B: guidance-distilled; its pipeline ignores CFG
        neg = cond["neg"]
        both = {**cond, **{k: neg[k] * n + cond[k] if isinstance(cond[k], list) else
                           torch.cat([neg[k].expand_as(cond[k]), cond[k]]) for k in neg if k in ROWS}}
        v_neg, v_pos = velocity(pipe, torch.cat([x, x]), torch.cat([t, t]), both, img_ids, guidance).chunk(2)
        v = v_neg + cfg_scale * (v_pos - v_neg)
        # Qwen-Image's pipeline brings each guided token back to the norm of its conditional velocity
        return v * (v_pos.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True)) if fam == "qwen" else v
    embeds = cond["embeds"]
    dtype = (embeds[0] if isinstance(embeds, list) else embeds).dtype  # not transformer.dtype: a walk of its modules
    kwargs = dict(hidden_states=x.to(dtype), encoder_hidden_states=embeds, return_dict=False)
    half = dtype if dtype == torch.float16 else torch.bfloat16  # fp16 weights (UniGenBench) compute in fp16
    with torch.autocast("cuda", half, enabled=x.device.type == "cuda"):
        if fam == "sd3":
            return transformer(timestep=1000 * t, pooled_projections=cond["pooled"], **kwargs)[0]
        if fam == "qwen":  # the mask only where a row has padding, as the pipeline passes it
            mask = None if bool(cond["mask"].all()) else cond["mask"]
            return transformer(timestep=t, encoder_hidden_states_mask=mask, img_shapes=img_ids, **kwargs)[0]
        if fam == "zimage":  # lists in and out, one (C, 1, H, W) latent per image; it predicts x0 - noise = -v
            out = transformer(list(x.to(dtype).unsqueeze(2).unbind(0)), 1 - t, embeds, return_dict=False)[0]
            return -torch.stack(out).squeeze(2)
        if fam == "klein":
            return transformer(timestep=t, txt_ids=cond["text_ids"], img_ids=img_ids, **kwargs)[0]
        g = torch.full((n,), guidance, device=x.device) if transformer.config.guidance_embeds else None
        return transformer(timestep=t, guidance=g, pooled_projections=cond["pooled"], txt_ids=cond["text_ids"],
                           img_ids=img_ids, **kwargs)[0]


@torch.no_grad()
def decode(pipe, latents, resolution: int) -> list[Image.Image]:
    """Latents -> PIL images through the VAE, each family's latents unpacked and un-normalised as its pipeline does."""
    fam, vae = family(pipe), pipe.vae
    if fam in ("flux", "qwen"):
        latents = pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
    if fam == "qwen":  # a video VAE: one frame; per-channel statistics
        mean, std = (torch.tensor(vae.config["latents_" + k]).view(1, -1, 1, 1, 1).to(latents) for k in ("mean", "std"))
        image = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0][:, :, 0]
    elif fam == "klein":  # tokens back in place by their ids, the VAE's batch-norm statistics, 2x2 patches undone
        ids = latent_geometry(pipe, resolution)[1].expand(len(latents), -1, -1)
        x = pipe._unpack_latents_with_ids(latents, ids)
        std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
        x = x * std.view(1, -1, 1, 1).to(x) + vae.bn.running_mean.view(1, -1, 1, 1).to(x)
        image = vae.decode(pipe._unpatchify_latents(x).to(vae.dtype), return_dict=False)[0]
    else:
        x = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(x.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], *, steps: int = 28, resolution: int = 512,
                    guidance: float = 3.5, max_sequence_length: int = 512, batch_size: int = 8,
                    cfg_scale: float = 1.0, shift: float | None = None) -> list[Image.Image]:
    """One deterministic (eta = 0) image per (prompt, seed); the same seed gives the same image in any batch."""
    images, (seq_len, img_ids), dev = [], latent_geometry(pipe, resolution), pipe.transformer.device
    sigmas = sigma_schedule(pipe, steps, seq_len, shift)
    for s in range(0, len(prompts), batch_size):
        p, gens = prompts[s:s + batch_size], [torch.Generator(dev).manual_seed(int(x)) for x in seeds[s:s + batch_size]]
        latents = rollout(pipe, encode_prompts(pipe, p, max_sequence_length, cfg_scale != 1), initial_noise(
            pipe, len(p), resolution, gens), sigmas, [False] * steps, 0.0, guidance, img_ids, None, cfg_scale)[0]
        images += decode(pipe, latents[:, -1], resolution)
    return images


# ======================================================================================================================
# Reward models: the judge's transport (an OpenAI-compatible server, or Qwen-VL in this process), CLIP, offline judges
# ======================================================================================================================
# The standard library's HTTP client: no dependency for the reward server. unigenbench.py has its own copy (runs alone).
RETRY_BACKOFF_S, MAX_BACKOFF_S = 1.0, 10.0  # first retry delay, doubling up to the cap (tests make them small)


def http_headers(key_env: str) -> dict:
    key = os.environ.get(key_env)
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}


def scrub(text, key_env: str) -> str:
    """Error text shown to users: one line, and never the API key (some servers echo request details)."""
    key = os.environ.get(key_env)
    return " ".join((str(text).replace(key, "***") if key else str(text)).split())[:300]


def served_models(url: str, key_env: str, timeout: float = 30.0) -> list[str]:
    """The names `{url}/models` lists; one line and exit if the server does not answer."""
    req = urllib.request.Request(url.rstrip("/") + "/models", headers=http_headers(key_env))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        hint = (f" (check ${key_env})" if e.code in (401, 403) else
                " (is the URL missing /v1?)" if e.code == 404 and not url.rstrip("/").endswith("/v1") else "")
        sys.exit(scrub(f"error: judge server {url} answered HTTP {e.code} on /models{hint}", key_env))
    except (OSError, http.client.HTTPException) as e:
        sys.exit(scrub(f"error: judge server {url} is not reachable: {getattr(e, 'reason', None) or e}", key_env))
    try:
        listed = json.loads(body)
    except ValueError:  # a web page, a proxy: every request would fail the same way
        sys.exit(scrub(f"error: judge server {url} answered /models with something that is not JSON ({not_json(body)}):"
                       " --judge-url must be an OpenAI-compatible API, e.g. http://HOST:8080/v1", key_env))
    try:  # a server with an odd but JSON /models reply may still answer chat completions
        return [m["id"] for m in listed["data"]]
    except (LookupError, TypeError):
        return []


def not_json(body: bytes) -> str:
    return f"it starts {body[:60].decode(errors='replace')!r}" if body.strip() else "an empty reply"


def jpeg_data_url(image: Image.Image, max_side: int = 0) -> str:
    """JPEG quality 95 at the image's own size, as the official clients send it (smaller only if asked)."""
    image, buf = image.convert("RGB"), io.BytesIO()
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.BICUBIC)
    image.save(buf, format="JPEG", quality=95)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def post_json(url: str, payload: dict, headers: dict, timeout: float, retries: int, retry_seconds: float = 60.0):
    """POST a chat request; (the reply's text or None, attempts, last error). Timeouts, dropped connections, 5xx, 408,
    429 and cut-off JSON are retried with jittered, capped exponential backoff until `retries` or `retry_seconds` after
    the first failure run out; other 4xx and replies that are not JSON (a web page) are not. Never raises."""
    error, first_failure = None, None
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # the timeout bounds connect and every read
                body, kind = resp.read(), resp.headers.get_content_type()
            if "json" not in kind and not body.lstrip().startswith(b"{"):
                return None, attempt + 1, f"the reply is not JSON ({kind}, {not_json(body)}): not an OpenAI API"
            try:  # JSON cut off mid-reply, or not a chat completion: retried
                text = json.loads(body)["choices"][0]["message"]["content"]
            except (ValueError, LookupError, TypeError) as e:
                raise ValueError(f"not an OpenAI chat completion ({type(e).__name__}: {e}; {not_json(body)})") from None
            if isinstance(text, str):
                return text, attempt + 1, None
            error = "a chat completion whose message content is not text"
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}"
            if e.code < 500 and e.code not in (408, 429):
                return None, attempt + 1, error  # a request the server rejects will be rejected again
        except (OSError, http.client.HTTPException, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        first_failure = first_failure or time.monotonic()
        wait = min(RETRY_BACKOFF_S * 2 ** attempt, MAX_BACKOFF_S) * random.uniform(1.0, 1.5)  # jitter: no lockstep
        if attempt == retries or time.monotonic() + wait - first_failure > retry_seconds:
            return None, attempt + 1, error
        time.sleep(wait)


def server_chat(requests: list[tuple[str, list[Image.Image]]], args: Args) -> tuple[list, dict]:
    """One chat completion per (text, images) request to --judge-url, images first, --judge-workers in flight. Returns
    each reply (None: failed after its retries) and {"failed", "attempts", "errors"}. Sampling is left to the server,
    as officially."""
    endpoint, headers = args.judge_url.rstrip("/") + "/chat/completions", http_headers(args.judge_api_key_env)
    with ThreadPoolExecutor(args.judge_workers) as pool:
        unique = {id(im): im for _, ims in requests for im in ims}  # a pair judged twice shares its images
        urls = dict(zip(unique, pool.map(lambda im: jpeg_data_url(im, args.judge_image_size), unique.values())))
        payloads = []
        for text, ims in requests:
            content = [{"type": "image_url", "image_url": {"url": urls[id(im)]}} for im in ims]
            messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
            payloads.append({"model": args.judge_model, "messages": messages, "max_tokens": args.judge_max_tokens})
        results = list(pool.map(lambda p: post_json(endpoint, p, headers, args.judge_timeout, args.judge_retries,
                                                    args.judge_retry_seconds), payloads))
    errors = [scrub(r[2], args.judge_api_key_env) for r in results if r[0] is None and r[2]]
    return [r[0] for r in results], {"failed": sum(r[0] is None for r in results),
                                     "attempts": sum(r[1] for r in results), "errors": errors}


def load_local_vlm(name: str, device=None, dtype=None, what: str = "--judge-model") -> tuple:
    """(model, processor) of a Qwen-VL checkpoint (hub id or folder), eval mode, left padding for batching."""
    import transformers
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_model_name(name, what)
    try:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            name, dtype=dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)).to(device).eval()
        try:
            processor = transformers.AutoProcessor.from_pretrained(name)
        except ImportError:  # no torchvision: build the model's processor class without its video half (not needed)
            from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
            base = getattr(transformers, PROCESSOR_MAPPING_NAMES[model.config.model_type])
            image_only = type("ImageOnly" + base.__name__, (base,), {"check_argument_for_proper_class": lambda s, n, a:
                              None if a is None else base.check_argument_for_proper_class(s, n, a)})
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
            processor = image_only(image_processor=transformers.AutoImageProcessor.from_pretrained(name),
                                   tokenizer=tokenizer, video_processor=None, chat_template=tokenizer.chat_template)
    except (OSError, ValueError, TypeError, KeyError) as err:
        sys.exit(hub_error(name, err, what))
    processor.tokenizer.padding_side = "left"  # batched generation appends on the right
    return model, processor


def local_chat(vlm: tuple, requests, *, max_tokens: int = 2048, batch_size: int = 8) -> list[str]:
    """Greedy replies of an in-process VLM, `batch_size` (text, images) requests per generate() call."""
    model, processor = vlm
    replies = []
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * len(ims) + [{"type": "text", "text": text}]}],
            tokenize=False, add_generation_prompt=True) for text, ims in batch]
        images = [im.convert("RGB") for _, ims in batch for im in ims] or None
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        replies += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return replies


def user_function(spec: str, flag_name: str, pairwise: bool):
    """Your judge (pairwise: P(a better than b) per pair) or scorer (a score per image) as the loop calls it: values
    checked, None or NaN = no verdict, and an optional second return value, a dict of numbers to log each round."""
    fn = load_object(spec, flag_name)
    if not callable(fn):
        sys.exit(f"error: {flag_name} {spec} is not a function")
    unit = "pair" if pairwise else "image"

    def call(prompts, *images):
        out = fn(list(prompts), *(list(x) for x in images))
        values, info = out if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict) else (out, {})
        try:
            values = [None if v is None or math.isnan(float(v)) else float(v) for v in values]
        except (TypeError, ValueError):
            sys.exit(f"error: {flag_name} {spec} must return a list of numbers (or None), one per {unit}")
        if len(values) != len(prompts):
            sys.exit(f"error: {flag_name} {spec} returned {len(values)} values for {len(prompts)} {unit}s")
        if pairwise and any(v is not None and not 0 <= v <= 1 for v in values):
            sys.exit(f"error: {flag_name} {spec} must return P(image a is better than b) in [0, 1], got "
                     f"{next(v for v in values if v is not None and not 0 <= v <= 1)}")
        info = {k: v for k, v in info.items() if isinstance(v, (int, float))}
        return values, {**info, **({"judge_error": f"{spec} gave no verdict (None)"} if None in values else {})}

    call.name = spec
    return call


def make_judge(args: Args):
    """The judge the flags name: judge(prompts, firsts, seconds) -> (P(first better) or None, info); with --reward
    pointwise a scorer(prompts, images). A server is checked now: a dead one fails before any model loads."""
    if args.reward == "pointwise":
        return user_function(args.scorer_fn, "--scorer-fn", pairwise=False)
    if args.judge_fn:
        return user_function(args.judge_fn, "--judge-fn", pairwise=True)
    url, key_env = args.judge_url, args.judge_api_key_env
    if not url and args.judge_model == Args.judge_model:  # a served name, not a model to load here
        sys.exit(f"error: no judge: pass --judge-url (a reward server serving {args.judge_model}), --judge-model (a "
                 "Qwen-VL hub id or folder, run in this process) or --judge-fn module:function")
    served = served_models(url, key_env) if url else None
    if served and args.judge_model not in served:
        sys.exit(f"error: judge server {url} does not serve --judge-model {args.judge_model!r} "
                 f"(it serves: {', '.join(served)})")
    vlm = None if url else load_local_vlm(args.judge_model, args.device)

    def judge(prompts, firsts, seconds):
        start = time.perf_counter()
        requests = [(judge_text(p, args.judge_prompt), [a, b]) for p, a, b in zip(prompts, firsts, seconds)]
        stats = {"failed": 0, "attempts": len(requests), "errors": []}
        if url:
            replies, stats = server_chat(requests, args)
        else:
            replies = local_chat(vlm, requests, max_tokens=args.judge_max_tokens)
        probs = [parse_verdict(r) for r in replies]
        unparsed = [r for p, r in zip(probs, replies) if p is None and r is not None]
        if stats["errors"]:
            tqdm.write(f"judge server: {len(stats['errors'])}/{len(requests)} requests failed after retries "
                       f"(last: {stats['errors'][-1]})")
        error = stats["errors"][-1] if stats["errors"] else (
            f"no verdict in the reply {' '.join(str(unparsed[-1]).split())[:100]!r}" if unparsed else None)
        return probs, {"judge_request_failed": stats["failed"], "judge_attempts": stats["attempts"],
                       "judge_unparsed": len(unparsed), "judge_seconds": time.perf_counter() - start,
                       **({"judge_error": error} if error else {})}

    judge.name = f"{args.judge_model} at {url}" if url else args.judge_model
    return judge


def load_clip(name: str, device, as_trained: bool = False) -> tuple:
    """(model, tokenizer, image processor) of a CLIP model loaded with transformers; `tiny`: a random tiny one. By
    default as the official reward runs it (fastvideo/rewards/clip_reward.py: open_clip's create_model_and_transforms(
    "ViT-H-14", pretrained=<the DFN5B-378 weights>)): official_clip's model and open_clip's 224-px preprocessing, which
    CLIPImageProcessorPil's defaults are (short side to 224 bicubic, centre crop, OpenAI mean and std)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel
    if name == "tiny":  # DFN5B-CLIP-ViT-H-14-378's geometry and QuickGELU (CLIPConfig's default), 2 narrow layers
        torch.manual_seed(0)
        tokenizer = tiny_tokenizer(16)
        model = CLIPModel(CLIPConfig(text_config=dict(vocab_size=len(tokenizer), **TINY_CLIP_TEXT), projection_dim=16,
                                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, image_size=378, patch_size=14)))
        processor = CLIPImageProcessorPil(size={"shortest_edge": 378}, crop_size=378)
    else:
        check_model_name(name, "--clip-model")
        try:
            model = CLIPModel.from_pretrained(name, dtype=torch.float32)  # float32, as open_clip's default
            tokenizer, processor = AutoTokenizer.from_pretrained(name), AutoImageProcessor.from_pretrained(name)
        except (OSError, ValueError, TypeError, KeyError) as err:
            sys.exit(hub_error(name, err, "--clip-model"))
    if not as_trained:
        model, processor = official_clip(model), CLIPImageProcessorPil()
    return model.to(device).eval(), tokenizer, processor


def official_clip(model, size: int = 224):
    """The weights in open_clip's ViT-H-14 config, as the official reward loads DFN5B-CLIP-ViT-H-14-378 (trained at
    378 px with QuickGELU): `size` px input, GELU in both towers, and the position-embedding grid resized as open_clip's
    resize_pos_embed does when it loads a checkpoint of another grid (bicubic, antialiased; the class token's kept)."""
    from transformers import CLIPModel
    config, state, key = model.config, model.state_dict(), "vision_model.embeddings.position_embedding.weight"
    config.vision_config.image_size, grid = size, size // config.vision_config.patch_size
    config.vision_config.hidden_act = config.text_config.hidden_act = "gelu"
    pos, old = state[key], int(math.sqrt(state[key].shape[0] - 1))
    if grid != old:
        img = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        img = torch.nn.functional.interpolate(img, size=(grid, grid), mode="bicubic", antialias=True,
                                              align_corners=False)
        state[key] = torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(grid * grid, -1)])
    official = CLIPModel(config)
    official.load_state_dict(state)
    return official


@torch.no_grad()
def clip_scores(clip: tuple, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
    """Cosine similarity of each image's and its prompt's CLIP embeddings, as the official reward (no x100)."""
    model, tokenizer, processor = clip
    text = tokenizer(prompts, padding=True, truncation=True, max_length=min(77, tokenizer.model_max_length),
                     return_tensors="pt").to(model.device)
    pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    out = model(**text, pixel_values=pixels.to(model.device))  # text_embeds, image_embeds: projected, normalised
    return (out.text_embeds * out.image_embeds).sum(-1).float().cpu()


def colour_distance(prompt: str, image: Image.Image) -> float | None:
    """The smoke test's truth: RGB distance in [0, sqrt(3)] of the image's mean colour to the prompt's (None: none)."""
    target = next((COLOURS[w] for w in re.findall(r"[a-z]+", prompt.lower()) if w in COLOURS), None)
    if target is None:
        return None
    mean = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) / 255
    return float(np.linalg.norm(mean - np.array(target)))


def colour_judge(prompts, firsts, seconds):
    """Prefers the image whose colours are closer to the colour the prompt names; a hard verdict, like a real judge."""
    dist = [(colour_distance(p, a), colour_distance(p, b)) for p, a, b in zip(prompts, firsts, seconds)]
    return [None if da is None else 0.5 if da == db else float(da < db) for da, db in dist], {}


def colour_scorer(prompts, images):
    """The pointwise twin of the colour judge: 1 - distance / sqrt(3) per image (1 is the named colour)."""
    dist = [colour_distance(p, im) for p, im in zip(prompts, images)]
    return [None if d is None else 1 - d / math.sqrt(3) for d in dist], {}


# ======================================================================================================================
# Processes: the same file under torchrun (one process per GPU), on torch.distributed
# ======================================================================================================================
# Every process takes its own whole groups of the round's global prompt list. LoRA: replicated weights, each chunk's
# gradients summed in one all-reduce (not DDP, which syncs inside each backward and needs as many on every process, but
# zero-advantage trajectories get none). --full: FSDP2 shards weights, gradients and optimizer state.
def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(values: dict, device, op: str = "sum") -> dict:
    """Sum (or max) a dict of numbers over processes; the identity in a single process."""
    if world_size() == 1:
        return values
    t = torch.tensor([float(values[k]) for k in sorted(values)], dtype=torch.float64, device=device)
    dist.all_reduce(t, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return dict(zip(sorted(values), t.tolist()))


def gather(t: torch.Tensor, device) -> torch.Tensor:
    """The rows of a tensor from every process, in rank order (the global batch); same shape on every process."""
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t, device=device) for _ in range(world_size())]
    dist.all_gather(parts, t.to(device))
    return torch.cat(parts).cpu()


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replicated (LoRA) weights: sum the gradients of all processes, in one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def shard_transformer(transformer) -> None:
    """FSDP2: one unit per transformer block plus the root. Weights stay float32 (master copy, sharded); on CUDA each
    unit is gathered in bf16 for compute and gradients are reduced in float32. Gradients are summed, not averaged."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    cuda = transformer.device.type == "cuda"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32)
    # FLUX and klein have both kinds of blocks, SD3 and Qwen-Image the first; Z-Image its refiners and layers
    for name in ("transformer_blocks", "single_transformer_blocks", "noise_refiner", "context_refiner", "layers"):
        for block in getattr(transformer, name, []):
            fully_shard(block, mp_policy=mp)
    fully_shard(transformer, mp_policy=mp)
    for unit in (m for m in transformer.modules() if isinstance(m, FSDPModule)):  # a plain SUM (gloo has no PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)


# ======================================================================================================================
# Prompts, checkpoints, logging
# ======================================================================================================================
def load_prompts(spec: str, flag_name: str = "--prompts") -> list[str]:
    """Prompts from a file, told apart by its content (not its name): a JSON list (of prompts, or of objects with a
    "prompt" field), JSON lines with a "prompt" field, or plain text, one a line (a BOM, CRLF and blank lines are
    dropped); or module:NAME, a list of prompts in your own code or a function returning one."""
    if ":" in spec and not os.path.exists(spec):
        found = load_object(spec, flag_name)
        rows = [(spec, p) for p in (found() if callable(found) else found)]
    else:
        try:
            text = Path(spec).read_text(encoding="utf-8-sig")
        except (UnicodeDecodeError, OSError) as err:
            why = {IsADirectoryError: "is a folder, not a file", FileNotFoundError: "does not exist"}.get(
                type(err), f"is not a UTF-8 text file ({type(err).__name__})")
            sys.exit(f"error: {flag_name} {spec!r} {why}")
        lines = [(f"{spec}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]

        def parse(where, text):  # a file that begins like JSON must be JSON throughout
            try:
                return json.loads(text)
            except ValueError as err:
                sys.exit(f"error: {where}: not valid JSON ({err})")
        if text.lstrip().startswith("["):
            rows = [(f"{spec}: item {n}", x) for n, x in enumerate(parse(spec, text), 1)]
        else:
            jsonl = lines and lines[0][1].startswith("{")
            rows = [(where, parse(where, line)) for where, line in lines] if jsonl else lines
    prompts = []
    for where, row in rows:
        prompt = row.get("prompt") if isinstance(row, dict) else row
        if not isinstance(prompt, str) or not prompt.strip():
            sys.exit(f"error: {where}: expected a non-empty prompt (a string, or an object with a \"prompt\" field)")
        prompts.append(prompt.strip())
    if not prompts:
        sys.exit(f"error: {flag_name} {spec!r} has no prompts")
    return prompts


def step_prompts(prompts: list[str], step: int, count: int, seed: int) -> list[str]:
    """The prompts of one round: walk through a fresh permutation of the prompt list every epoch."""
    n = len(prompts)
    return [prompts[int(torch.randperm(n, generator=torch.Generator().manual_seed(seed + pos // n))[pos % n])]
            for pos in range(step * count, (step + 1) * count)]


def save_checkpoint(run_dir: Path, step: int, pipe, optimizer, args: Args, rank: int = 0) -> Path | None:
    """Written by rank 0 to a temporary folder, flushed, then renamed: a kill mid-write leaves no broken checkpoint.
    LoRA in diffusers' format (load_lora_weights reads it); --full: the transformer (gathered from the FSDP shards) and
    the optimizer state. Weights that are not finite are never saved (FloatingPointError)."""
    if not finite_weights(pipe.transformer):
        raise FloatingPointError("the trained weights are not finite (NaN or inf)")
    if args.full:  # a collective under FSDP: every process takes part, rank 0 receives the unsharded tensors
        import torch.distributed.checkpoint.state_dict as dcp
        opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = dcp.get_model_state_dict(pipe.transformer, options=opts)
        optim = dcp.get_optimizer_state_dict(pipe.transformer, optimizer, options=opts)
    if rank != 0:
        return None
    root = run_dir / "checkpoints"
    tmp, final = root / f".tmp-{step:06d}", root / f"step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if args.full:
        from safetensors.torch import save_file
        pipe.transformer.save_config(tmp / "transformer")
        config = json.loads((tmp / "transformer" / "config.json").read_text())  # FSDP2 renamed the class FSDP<name>
        config["_class_name"] = config["_class_name"].removeprefix("FSDP")
        (tmp / "transformer" / "config.json").write_text(json.dumps(config, indent=1))
        save_file(weights, tmp / "transformer" / "diffusion_pytorch_model.safetensors")
    else:
        from peft.utils import get_peft_model_state_dict
        optim = optimizer.state_dict()
        type(pipe).save_lora_weights(  # the metadata carries lora_alpha, which the weights alone do not
            tmp, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
            transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict())
    torch.save(optim, tmp / "optimizer.pt")  # tensors, numbers and names only: loads with weights_only=True
    # All randomness is keyed by (seed, step, group), so the step number is the whole RNG state.
    (tmp / "state.json").write_text(json.dumps({"step": step, **{k: getattr(args, k) for k in FIXED_ON_RESUME}}))
    for f in (f for f in tmp.rglob("*") if f.is_file()):  # on disk before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-args.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def finite_weights(transformer) -> bool:
    """Whether every trained weight of every process is finite (FSDP: each checks its own shards)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in transformer.parameters() if p.requires_grad]
    bad = sum(int(not torch.isfinite(p).all()) for p in local)
    return all_reduce({"bad": bad}, local[0].device if local else "cpu")["bad"] == 0


def find_checkpoint(path: str) -> Path:
    """A checkpoint folder itself, or the latest complete checkpoint of a run folder."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    found = sorted((p / "checkpoints").glob("step-*/state.json"))
    if not found:
        sys.exit(f"error: --resume {path}: no checkpoint in it (a run saves one every --save-every rounds)")
    return found[-1].parent


def load_checkpoint(ckpt: Path, pipe, optimizer, args: Args) -> int:
    """Restore trained weights and optimizer state; returns the round to continue from. LoRA: every process reads the
    (small) files. --full: rank 0 reads them and FSDP broadcasts each tensor, each process keeping its shard."""
    from safetensors.torch import load_file
    try:
        state = json.loads((ckpt / "state.json").read_text())
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        sys.exit(f"error: {ckpt / 'state.json'} is damaged; resume from an earlier checkpoint (pass its folder)")
    changed = [k for k in FIXED_ON_RESUME if k in state and state[k] != getattr(args, k)]
    if changed:
        sys.exit(f"error: {flag(changed[0])} {getattr(args, changed[0])} does not fit the checkpoint {ckpt} (made with "
                 f"{state[changed[0]]}); drop the flag to resume, or start a new run")
    try:
        if args.full:
            import torch.distributed.checkpoint.state_dict as dcp
            first = not dist.is_initialized() or dist.get_rank() == 0
            opts = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=world_size() > 1)
            weights = load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors") if first else {}
            dcp.set_model_state_dict(pipe.transformer, weights, options=opts)
            optim = torch.load(ckpt / "optimizer.pt", weights_only=True) if first else {}
            dcp.set_optimizer_state_dict(pipe.transformer, optimizer, optim, options=opts)
        else:
            from peft.utils import set_peft_model_state_dict
            weights = load_file(ckpt / "pytorch_lora_weights.safetensors")
            result = set_peft_model_state_dict(pipe.transformer, {k.removeprefix("transformer."): v
                                                                  for k, v in weights.items()})
            if getattr(result, "unexpected_keys", None):
                raise ValueError("its LoRA layers do not match this model")
            for p in (p for p in pipe.transformer.parameters() if p.requires_grad):
                p.data = p.data.float()
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    except Exception as err:  # a truncated or foreign file: whatever the loader raises, one line naming the folder
        sys.exit(f"error: checkpoint {ckpt} cannot be loaded ({type(err).__name__}: {str(err)[:120]}); resume from "
                 f"an earlier one (pass its folder)")
    if not finite_weights(pipe.transformer):
        earlier = [str(c) for c in sorted(ckpt.parent.glob("step-*")) if c.name < ckpt.name]
        sys.exit(f"error: checkpoint {ckpt} holds weights that are not finite (NaN or inf); resume from an earlier "
                 f"one (pass its folder{': ' + earlier[-1] if earlier else ''}) with a smaller --lr")
    return step


def trim_metrics(path: Path, start: int) -> None:
    """A resumed run drops the lines of the rounds after its checkpoint (they are run again) and a last line a kill cut
    short. Any other line it cannot read stops it: nothing else in the file is deleted."""
    text = path.read_text() if path.exists() else ""
    lines, kept = text.splitlines(), []
    for n, line in enumerate(lines, 1):
        try:
            step = int(json.loads(line)["step"]) if line.strip() else 0
        except (ValueError, LookupError, TypeError):
            if n == len(lines) and not text.endswith("\n"):
                break
            sys.exit(f"error: {path}:{n}: a line that is not a metrics record; mend or delete it, then resume again")
        kept += [line] if step <= start else []
    path.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
    os.replace(path.with_suffix(".tmp"), path)


def save_grid(images: list[Image.Image], labels: list[str], columns: int, path: Path, frames: list | None = None,
              gap_after: int | None = None) -> None:
    """One row per label, written above the row (tiny images are enlarged so the text fits). `frames`: a green (True)
    or red (False) border per image; `gap_after`: a white gap after that many columns (before | after)."""
    scale = max(1, 128 // images[0].width)
    w, h, cap, gap = images[0].width * scale, images[0].height * scale, 14, 16 if gap_after else 0
    grid = Image.new("RGB", (w * columns + gap, (h + cap) * len(labels)), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(labels):
        draw.text((2, r * (h + cap) + 1), label[:120], fill="black")
        for c in range(columns):
            k, x, y = r * columns + c, c * w + (gap if gap_after and c >= gap_after else 0), r * (h + cap) + cap
            grid.paste(images[k].resize((w, h), Image.NEAREST), (x, y))
            if frames is not None and frames[k] is not None:
                draw.rectangle((x, y, x + w - 1, y + h - 1), outline=(0, 170, 0) if frames[k] else (220, 0, 0), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ======================================================================================================================
# Training loop
# ======================================================================================================================
def sample_batch(pipe, prompts: list[str], step: int, args: Args, device, first_group: int = 0) -> dict:
    """Section 1 for one round: a group of G SDE trajectories per prompt, batched rollouts of --sample-batch-size. Each
    group draws its noise and its trained steps from its own generators, keyed by (seed, step, global group index):
    processes sample different images, and a group depends neither on how many processes share the round nor on the
    batch it is sampled in."""
    G, n, groups = args.group_size, len(prompts) * args.group_size, range(first_group, first_group + len(prompts))

    def gen(group: int, stream: int, dev="cpu"):  # hashed, so that nearby (seed, step, group) give unrelated streams
        return torch.Generator(dev).manual_seed(int(np.random.SeedSequence(
            [args.seed, step, group, stream]).generate_state(1)[0]))
    gens = [gen(g, 0, device) for g in groups]
    seq_len, img_ids = latent_geometry(pipe, args.resolution)
    sigmas = sigma_schedule(pipe, args.sample_steps, seq_len, args.shift)
    sde_mask, trained = step_plan(args.sample_steps, args.sde_window, args.train_fraction, [gen(g, 1) for g in groups],
                                  G, gen(0, 2))
    noise = torch.cat([initial_noise(pipe, 1 if args.same_noise else G, args.resolution, g) for g in gens])
    noise = noise.repeat_interleave(G, 0) if args.same_noise else noise
    cond = select(encode_prompts(pipe, prompts, args.max_sequence_length, args.cfg_scale != 1), torch.arange(n) // G)
    per, parts = max(1, args.sample_batch_size // G) if args.sample_batch_size else len(prompts), []  # groups a batch
    for c in range(0, len(prompts), per):
        rows, means = torch.arange(c * G, min(c + per, len(prompts)) * G), [] if args.rationorm else None
        out = rollout(pipe, select(cond, rows), noise[rows], sigmas, sde_mask, args.eta, args.guidance, img_ids,
                      gens[c:c + per], args.cfg_scale, means)  # means: each step's, rationorm's reference
        parts.append((*out, torch.stack(means, 1) if means else None))
    latents, log_probs, x0, means = (None if part[0] is None else torch.cat(part) for part in zip(*parts))
    return {"latents": latents, "log_probs": log_probs, "x0": x0, "cond": cond, "sigmas": sigmas, "img_ids": img_ids,
            "trained": trained, "means": means}


def compare(judge, args: Args, prompts, before, after) -> float:
    """The judge's win rate of the current policy's held-out images against the initial policy's (0.5: no change),
    each pair judged once with the current image shown first in every other pair, so position bias cancels."""
    if args.reward == "pointwise":  # a scorer's verdict on a pair: the higher score wins
        (s1, _), (s0, _) = judge(prompts, after), judge(prompts, before)
        wins = [None if a is None or b is None else 0.5 if a == b else float(a > b) for a, b in zip(s1, s0)]
    else:
        swap = [k % 2 == 1 for k in range(len(prompts))]
        p, _ = judge(prompts, [b if s else a for a, b, s in zip(after, before, swap)],
                     [a if s else b for a, b, s in zip(after, before, swap)])
        wins = [None if x is None else 1 - x if s else x for x, s in zip(p, swap)]
    return sum(0.5 if w is None else w for w in wins) / len(wins)


def save_images(images: list[Image.Image], folder: Path) -> None:
    """All or nothing: written to a temporary folder, then renamed into place."""
    tmp = folder.with_name("." + folder.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, im in enumerate(images):
        im.save(tmp / f"{k:04d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


@dataclasses.dataclass
class Run:
    """What every round uses, built once by start_run. Under torchrun each process has its own; rank 0 writes."""
    args: Args
    dir: Path
    device: torch.device
    rank: int = 0
    world: int = 1
    own_group: bool = False  # this run started torch.distributed, so it ends it
    judge: object = None
    eval_fn: object = None
    clip: tuple | None = None
    pipe: object = None
    params: list = dataclasses.field(default_factory=list)
    optimizer: object = None
    prompts: list = dataclasses.field(default_factory=list)
    eval_prompts: list = dataclasses.field(default_factory=list)  # each held-out prompt once per held-out seed
    eval_seeds: list = dataclasses.field(default_factory=list)
    before: list = dataclasses.field(default_factory=list)  # the initial policy's held-out images
    initial: tuple = ({}, None)  # held_out_scores of them
    start: int = 0
    silent_rounds: int = 0
    wandb: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:  # FSDP: forwards are collective, so every process samples the held-out images too
        return self.args.full and self.world > 1


def start_processes(args: Args) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world size, whether this call started torch.distributed): one process per GPU under torchrun."""
    world_env = int(os.environ.get("WORLD_SIZE", 1))
    if args.prompts_per_step % world_env:
        sys.exit(f"error: --prompts-per-step ({args.prompts_per_step}) is the number of groups per round over all "
                 f"{world_env} processes and must be a multiple of {world_env}: each process takes whole groups")
    accumulation(args.accum, world_env, (args.prompts_per_step // world_env or 1) * args.group_size)  # or exits
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # under torchrun: a GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    own = world_env > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank() if dist.is_initialized() else 0, world_size(), own


def run_folder(args: Args, ckpt: Path | None, rank: int, world: int) -> Path:
    """The run's folder, checked before any model loads: a new run needs a new, writable one."""
    run_dir = Path(ckpt.parent.parent if ckpt else args.output_dir or time.strftime("runs/%Y%m%d-%H%M%S"))
    if world > 1:  # rank 0's clock names a new run
        dist.broadcast_object_list(names := [str(run_dir)], src=0)
        run_dir = Path(names[0])
    if not ckpt and ((run_dir / "args.json").exists() or (run_dir / "metrics.jsonl").exists()):
        sys.exit(f"error: --output-dir {run_dir} already holds a run; continue it with --resume {run_dir}, or pick "
                 "another folder")
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / ".write-test").touch()
            (run_dir / ".write-test").unlink()
        except OSError as err:
            sys.exit(f"error: {'--resume' if ckpt else '--output-dir'} {run_dir}: cannot write there "
                     f"({err.strerror or type(err).__name__})")
    return run_dir


def start_run(args: Args, judge=None) -> Run:
    """Everything before the first round, cheap checks first: processes, folder, prompts, judge, models, held-out
    images of the initial policy, optimizer, checkpoint, logs."""
    device, rank, world, own = start_processes(args)
    ckpt = find_checkpoint(args.resume) if args.resume else None
    run = Run(args, run_folder(args, ckpt, rank, world), device, rank, world, own)
    built = ":" in args.model and not os.path.exists(args.model)  # module:function returns a hub id or folder
    if args.model != "tiny" and not built:
        check_model_name(args.model, "--model")
    if not args.prompts:
        sys.exit("error: --prompts is required for this model (a text or JSON lines file of training prompts)")
    run.prompts = load_prompts(args.prompts)
    held = (load_prompts(args.eval_prompts, "--eval-prompts") if args.eval_prompts else run.prompts)[:args.eval_count]
    run.eval_prompts = [p for p in held for _ in range(args.eval_seeds)]
    run.eval_seeds = [10**9 + s for _ in held for s in range(args.eval_seeds)]  # seeds that training never uses
    run.judge = judge or make_judge(args)
    run.eval_fn = load_object(args.eval_fn, "--eval-fn") if args.eval_fn else None
    run.clip = load_clip(args.clip_model, device, args.clip_as_trained) if args.clip_model else None
    run.pipe = load_pipeline(str(load_object(args.model, "--model")()) if built else args.model, device)
    latent_geometry(run.pipe, args.resolution)  # a resolution the model cannot take fails now, not after a round
    run.before = held_out_images(run)  # before any update (a resumed run has not loaded its checkpoint yet)
    if run.main and run.before:
        save_images(run.before, run.dir / "eval" / "before")
        run.initial = held_out_scores(run, run.before)
    run.params = trainable_parameters(run.pipe, args)
    run.optimizer = torch.optim.AdamW(run.params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=args.weight_decay)
    args.device = args.device or device.type  # args.json holds resolved values
    args.grad_checkpointing = device.type == "cuda" if args.grad_checkpointing is None else args.grad_checkpointing
    if args.grad_checkpointing:
        run.pipe.transformer.enable_gradient_checkpointing()
    run.start = load_checkpoint(ckpt, run.pipe, run.optimizer, args) if ckpt else 0
    open_logs(run)
    return run


def held_out_images(run: Run) -> list[Image.Image]:
    """The held-out prompts x seeds through the deterministic sampler, on rank 0 (on all processes under FSDP)."""
    a = run.args
    if not run.eval_prompts or not (run.main or run.sharded):
        return []
    return generate_images(run.pipe, run.eval_prompts, run.eval_seeds, steps=a.sample_steps, resolution=a.resolution,
                           guidance=a.guidance, max_sequence_length=a.max_sequence_length, cfg_scale=a.cfg_scale,
                           shift=a.shift)


def held_out_scores(run: Run, images: list[Image.Image]) -> tuple[dict, list | None]:
    """What held-out images score without the judge: CLIP, and the mean of each of --eval-fn's numbers (over the images
    that have it). Also, per image, whether its first number is at least 0.5: before_after.png's frame colour."""
    out = {"clip_score": clip_scores(run.clip, run.eval_prompts, images).mean().item()} if run.clip else {}
    if not run.eval_fn:
        return out, None
    rows = run.eval_fn(run.eval_prompts, images)
    if len(rows) != len(images) or not all(isinstance(r, dict) for r in rows):
        sys.exit(f"error: --eval-fn {run.args.eval_fn} must return one dict of numbers per image")
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [float(r[key]) for r in rows if key in r]
        out[key] = sum(values) / len(values)
    first = next(iter(rows[0]), None)
    return out, [None if first not in r else r[first] >= 0.5 for r in rows]


def open_logs(run: Run) -> None:
    """args.json for a new run; for a resumed one, its metrics trimmed to the checkpoint and the changed flags recorded
    in resumes.jsonl (args.json keeps the first values). Then the start-up line, and wandb if asked."""
    args, resolved = run.args, dataclasses.asdict(run.args)
    if not run.main:
        return
    if not run.start:
        (run.dir / "args.json").write_text(json.dumps(resolved, indent=1))
    else:
        trim_metrics(run.dir / "metrics.jsonl", run.start)
        saved = json.loads((run.dir / "args.json").read_text())
        changed = {k: [saved.get(k), v] for k, v in resolved.items() if k != "resume" and saved.get(k) != v}
        if changed:
            with open(run.dir / "resumes.jsonl", "a") as f:
                f.write(json.dumps({"step": run.start, "changed": changed}) + "\n")
        print(f"resuming {run.dir} at round {run.start}"
              + "".join(f"; {flag(k)} {a} -> {b}" for k, (a, b) in changed.items()))
    overrides = [flag(k) for k in args.given if k in PRESETS.get(args.preset, {})]
    overridden = f" (overridden: {', '.join(overrides)})" if overrides else ""
    order = f", {args.judge_order} order" if args.reward == "pairwise" else ""
    updates = accumulation(args.accum, run.world, len(round_prompts(run, 0)) * args.group_size)[1]
    print(f"run {run.dir} | preset {args.preset or 'none'}{overridden} | model {args.model} | "
          f"{'full' if args.full else 'LoRA'} {sum(p.numel() for p in run.params) / 1e6:.2f}M trainable | "
          f"{run.world} process(es){', FSDP2' if run.sharded else ''} | {len(run.prompts)} prompts | judge "
          f"{getattr(run.judge, 'name', 'passed to train()')} ({args.reward}{order}) | rounds {run.start}->"
          f"{args.train_steps} | {updates}")
    if args.judge_order != "both" and args.reward == "pairwise":
        print("judge_order_disagree is measured only with --judge-order both")
    if args.wandb_project:  # an optional dependency, imported here and nowhere else
        try:
            import wandb
        except ImportError:
            sys.exit("error: --wandb-project needs the wandb package (pip install wandb)")
        run.wandb = wandb
        wandb.init(project=args.wandb_project, name=run.dir.name, dir=str(run.dir), config=resolved, resume="allow",
                   id=re.sub(r"[^\w-]", "-", str(run.dir.resolve()))[-64:])


def round_prompts(run: Run, step: int) -> list[str]:
    """This process's whole groups of the round's global prompt list (the same list on every process)."""
    per = run.args.prompts_per_step // run.world or 1
    return step_prompts(run.prompts, step, per * run.world, run.args.seed)[run.rank * per:(run.rank + 1) * per]


def judge_round(run: Run, step: int, prompts: list[str], images: list[Image.Image]) -> tuple[list, list, dict]:
    """Sections 2-3 (with --reward pointwise: a score per image) and the CLIP score: the rewards the advantage
    z-scores, their weights, and the judge's numbers. A judge that gives no verdict stops the run (check_verdicts)."""
    args, G = run.args, run.args.group_size
    if args.reward == "pairwise":
        pref, info = judge_groups(run.judge, prompts, images, G, args.judge_order)  # 2. judge pairs
        rewards = [win_rates(pref)]                                                 # 3. win rates
    else:
        scores, info = score_groups(run.judge, prompts, images, G)
        rewards = [scores]
    weights = [args.pref_weight]
    if run.clip:
        rewards.append(clip_scores(run.clip, [p for p in prompts for _ in range(G)], images).view_as(rewards[0]))
        weights.append(args.clip_weight)
    check_verdicts(run, step, info)
    return rewards, weights, info


def check_verdicts(run: Run, step: int, info: dict) -> None:
    """A run whose judge gives no verdict cannot learn: stop in its first round, else after --judge-dead-rounds rounds
    in a row without one verdict (over all processes). A round with some failures goes on: they are ties."""
    error = info.pop("judge_error", None)
    counts = all_reduce({"asked": info["judge_requests"], "failed": info["judge_failed"]}, run.device)
    run.silent_rounds = run.silent_rounds + 1 if counts["failed"] == counts["asked"] else 0
    if run.silent_rounds and (step == run.start or run.silent_rounds >= run.args.judge_dead_rounds):
        when = "the first round" if step == run.start else f"{run.silent_rounds} rounds in a row"
        sys.exit(f"error: judge {getattr(run.judge, 'name', 'passed to train()')}: no verdict in {when} "
                 f"({int(counts['failed'])} of {int(counts['asked'])} judgments failed; last: {error}); stopped, "
                 "since a run without verdicts learns nothing" if run.main else 1)


def round_metrics(run: Run, step: int, rewards: list, adv, batch: dict, info: dict, stats: dict, times) -> dict:
    """One round's numbers over all processes: judge counts (ints) summed, rates averaged, the rest gathered."""
    dev, (t0, t1, t2, t3) = run.device, times
    win, adv = gather(rewards[0], dev), gather(adv, dev)
    if run.world > 1:
        info = {k: int(v) if type(info[k]) is int else v / run.world for k, v in all_reduce(info, dev).items()}
    peak = (torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # ru_maxrss: KiB on Linux
    return {"step": step + 1, "reward_mean": win.mean().item(),
            "reward_group_std": win.std(1, correction=0).mean().item(), "adv_abs_mean": adv.abs().mean().item(),
            "adv_max": adv.max().item(), "adv_min": adv.min().item(),
            "zero_adv_groups": int((adv.view(win.shape) == 0).all(1).sum()),
            "trained_transitions": batch["trained"].shape[1], **stats, **info, "time_sample": t1 - t0,
            "time_judge": t2 - t1, "time_train": t3 - t2, "images_per_s": win.numel() / (t3 - t0),
            "peak_mem_gb": all_reduce({"m": peak}, dev, "max")["m"],
            **({"clip_score": gather(rewards[1], dev).mean().item()} if run.clip else {})}


def evaluate_now(run: Run) -> tuple[dict, list, list | None]:
    """The current policy's held-out images and, on rank 0, their numbers: the judge's win rate against the initial
    policy's (win_rate_vs_initial) and held_out_scores' (with the frame colours)."""
    after = held_out_images(run) if run.before else []
    if not (run.main and after):
        return {}, after, None
    scores, frames = held_out_scores(run, after)
    win = compare(run.judge, run.args, run.eval_prompts, run.before, after)
    return {"win_rate_vs_initial": win, **scores}, after, frames


def log_round(run: Run, bar, metrics: dict, prompts: list[str], images: list[Image.Image]) -> None:
    """Rank 0: a grid of samples every --sample-every rounds, the progress bar, wandb, and last (once it is written, an
    interruption saves the round) the round's metrics line."""
    args, done = run.args, metrics["step"]
    if not run.main:
        return
    grid = run.dir / "samples" / f"step-{done:06d}.png"
    if done % args.sample_every == 0 or done == args.train_steps:  # rank 0's groups, a row each
        save_grid(images, prompts, args.group_size, grid)
    bar.set_postfix({k.removeprefix("eval_"): f"{metrics[k]:.3g}" for k in (
        "eval_win_rate_vs_initial", "eval_checker_accuracy", "loss", "images_per_s") if k in metrics})
    if run.wandb:
        run.wandb.log({**metrics, **({"samples": run.wandb.Image(str(grid))} if grid.exists() else {})}, step=done)
    with open(run.dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")


def finish(run: Run, done: int) -> dict:
    """The final comparison, initial against final policy on the held-out prompts and seeds: eval/eval.json,
    eval/before_after.png (per prompt: its seeds before, a gap, after), eval/after/."""
    final, after, after_frames = evaluate_now(run)
    (initial, before_frames), result, eval_dir = run.initial, {}, run.dir / "eval"
    if final:
        n, S, win = len(after), run.args.eval_seeds, final.pop("win_rate_vs_initial")
        result = {"images": n, "win_rate_final_vs_initial": win, **{k + "_initial": v for k, v in initial.items()},
                  **{k + "_final": v for k, v in final.items()}}
        order = [i for k in range(0, n, S) for i in [*range(k, k + S), *range(n + k, n + k + S)]]  # before, after
        images, frames = run.before + after, before_frames + after_frames if after_frames else None
        save_grid([images[i] for i in order], [f"{p}: before | after" for p in run.eval_prompts[::S]], 2 * S,
                  eval_dir / "before_after.png", [frames[i] for i in order] if frames else None, gap_after=S)
        save_images(after, eval_dir / "after")
        (eval_dir / "eval.json").write_text(json.dumps(result, indent=1))
        print(f"held-out ({n} images, seeds never trained on): judge win rate of the final vs the initial policy "
              f"{win:.3f} (0.5 = no change)")
        if initial:
            print("initial -> final: " + ", ".join(f"{k} {v:.3f} -> {final[k]:.3f}" for k, v in initial.items()))
        if run.wandb:
            run.wandb.log({"before_after": run.wandb.Image(str(eval_dir / "before_after.png")), **result}, step=done)
    if run.wandb:
        run.wandb.finish()
    if run.own_group:
        dist.destroy_process_group()
    return result


def catch_ctrl_c() -> tuple[list, object]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also noted in the returned list, which the loop checks after
    each round: Python drops an exception raised inside a finalizer, and the run would then go on to the end. Also
    returns the handler it replaced (None off the main thread, where none may be set), for train() to put back."""
    stop = []

    def interrupted(*_):
        stop.append(True)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return stop, None
    return stop, signal.signal(signal.SIGINT, interrupted)


def train(args: Args, judge=None) -> dict:
    """The loop: each round samples, judges, computes advantages and updates (sections 1-5). `judge` replaces the one
    the flags name. Under torchrun every process does this for its own groups; rank 0 alone writes files."""
    run = start_run(args, judge)
    bar = tqdm(range(run.start, args.train_steps), initial=run.start, total=args.train_steps, desc="pref-grpo",
               disable=not run.main)
    done = saved = run.start
    stop, previous_handler = catch_ctrl_c()
    try:
        for step in bar:
            t0 = time.perf_counter()
            prompts = round_prompts(run, step)
            batch = sample_batch(run.pipe, prompts, step, args, run.device, run.rank * len(prompts))  # 1. sample
            images = decode(run.pipe, batch["x0"], args.resolution)
            t1 = time.perf_counter()
            rewards, weights, info = judge_round(run, step, prompts, images)                  # 2-3. judge, win rates
            t2 = time.perf_counter()
            adv = group_advantages(rewards, weights, args.adv_clip, args.gdpo, run.device).flatten()  # 4. advantages
            stats = train_step(run.pipe, run.params, run.optimizer, batch, adv, args)       # 5. clipped loss, updates
            metrics = round_metrics(run, step, rewards, adv, batch, info, stats, (t0, t1, t2, time.perf_counter()))
            if args.eval_every and (step + 1) % args.eval_every == 0:
                metrics.update({"eval_" + k: v for k, v in evaluate_now(run)[0].items()})
            log_round(run, bar, metrics, prompts, images)
            done = step + 1  # logged: from here on, an interruption saves this round
            if stop:  # a Ctrl-C whose KeyboardInterrupt a library swallowed (in a finalizer, say) stops here
                raise KeyboardInterrupt
            if done % args.save_every == 0 or done == args.train_steps:  # every process: FSDP gathers
                save_checkpoint(run.dir, done, run.pipe, run.optimizer, args, run.rank)
                saved = done
    except KeyboardInterrupt:
        bar.close()
        if done > saved:
            save_checkpoint(run.dir, done, run.pipe, run.optimizer, args, run.rank)
        if run.main:
            print(f"interrupted after round {done} (checkpoint saved); continue with: python pref_grpo.py --resume "
                  f"{run.dir}", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as err:  # nothing non-finite is saved: the last checkpoint is the last good one
        bar.close()
        last = f"the last good checkpoint is round {saved}" if saved else "no checkpoint was saved yet"
        sys.exit(f"error: stopped in round {step + 1}: {err}; {last} (resume with a smaller --lr, or with "
                 "--max-grad-norm)" if run.main else 1)
    finally:  # a program that calls train() gets its own Ctrl-C handler back
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    return finish(run, done)


if __name__ == "__main__":
    try:
        train(parse_args())
    except KeyboardInterrupt:  # before the first round finished: nothing to save
        sys.exit("interrupted")
