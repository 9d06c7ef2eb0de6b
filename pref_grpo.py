"""Pref-GRPO: online RL for flow-matching text-to-image models with a pairwise preference reward (arXiv 2508.20751).

One training step, in the order of this file:
  1. Sample a group of G images per prompt with an SDE version of the flow sampler, keeping each step's log-prob.
  2. Judge every pair of images inside a group with a pairwise preference model: P(image a beats image b).
  3. Reward = each image's win rate inside its group (a tie counts half).
  4. Advantage = z-score of the win rates inside the group, clamped.
  5. Loss = PPO-style clipped ratio on the per-step log-probs of a random subset of the sampling steps.

Why pairwise: a pointwise reward model gives the images of a group scores that differ by tiny amounts; z-scoring
blows those gaps up into large "illusory" advantages that the policy learns to exploit. Win rates spread over [0, 1]
and keep their meaning.

Launch:
  python pref_grpo.py                                   # offline demo: tiny random FLUX, toy colour judge, CPU, minutes
  python pref_grpo.py --resume runs/RUN                 # continue a run from its latest checkpoint
  python pref_grpo.py --model black-forest-labs/FLUX.1-dev --prompts train_prompt.txt \\
      --judge-url http://localhost:8080/v1 --judge-model UnifiedReward-Think \\
      --resolution 720 --sample-steps 25 --group-size 8 --lr 1e-5 --lora-rank 64 --lora-alpha 128   # paper setup
  python pref_grpo.py --model tiny-sd3 --cfg-scale 4.5  # the same loop on a tiny random SD3.5
  torchrun --nproc_per_node 8 pref_grpo.py ...          # the same file on 8 GPUs (whole groups per GPU; --full: FSDP2)
  python pref_grpo.py --help                            # every flag with its docstring
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm.auto import tqdm


# ======================================================================================================================
# Flags
# ======================================================================================================================
@dataclass
class Args:
    # --- model and data
    model: str = "tiny"
    """hub id or local path of a FLUX or SD3 pipeline (black-forest-labs/FLUX.1-dev is the paper's; Flow-GRPO trains
    stabilityai/stable-diffusion-3.5-medium), or `tiny` / `tiny-sd3`: a small FLUX / SD3.5 with random weights built
    from configs, offline, in a second"""
    prompts: str | None = None
    """training prompts: a .txt file (one prompt a line) or a .jsonl file with a "prompt" field; default: the built-in
    colour prompts of the offline demo"""
    output_dir: str | None = None
    """where metrics, sample grids and checkpoints go (default: runs/<date-time>)"""
    resume: str | None = None
    """a run directory (continue from its latest checkpoint) or one checkpoint directory; flags come from the command line"""
    seed: int = 0
    """every random draw (prompts, noise, trained steps) is a function of (seed, step), so a resumed run repeats exactly"""
    device: str | None = None
    """cuda, cpu, ... (default: cuda when available)"""

    # --- sampling (section 1)
    train_steps: int = 120
    """number of optimizer steps (one round of sampling, judging and training each)"""
    prompts_per_step: int = 4
    """distinct prompts sampled per step over ALL processes (a multiple of their number); each gets a group of
    --group-size images, and each process samples, judges and trains whole groups"""
    group_size: int = 8
    """G: images per prompt; rewards and advantages are computed inside each group"""
    sample_steps: int = 8
    """denoising steps of the sampler (paper: 25)"""
    resolution: int = 16
    """image height and width in pixels (paper: 720)"""
    guidance: float = 3.5
    """FLUX.1-dev's distilled guidance embedding (no true classifier-free guidance needed); SD3 has none"""
    cfg_scale: float = 1.0
    """true classifier-free guidance, v = v_empty + s (v_prompt - v_empty), in sampling AND training forwards (doubles
    their batch); 1 = off (FLUX.1-dev); Flow-GRPO uses 4.5 for SD3.5"""
    eta: float = 0.7
    """SDE noise level: std_t = eta * sqrt(sigma / (1 - sigma)); 0 gives the deterministic Euler sampler"""
    shift: float | None = None
    """fixed flow shift for the sigma schedule; default: the resolution-dependent shift that FLUX's scheduler computes"""
    same_noise: bool = True
    """all images of a group start from the same initial noise (the SDE noise alone makes them differ)"""
    sde_window: int = 0
    """if > 0, use the SDE only on a random window of this many consecutive steps and deterministic Euler elsewhere
    (MixGRPO / Flow-GRPO-Fast); only window steps are trained. 0: SDE on every step"""
    train_fraction: float = 0.6
    """fraction of the SDE transitions of each trajectory that get a training forward/backward"""
    max_sequence_length: int = 0
    """T5 prompt length (capped by the tokenizer's own limit); 0: the pipeline's default (FLUX 512, SD3 256)"""

    # --- judge (sections 2-3)
    reward: str = "pairwise"
    """`pairwise`: win rates from a pairwise judge (Pref-GRPO); `pointwise`: the judge scores each image alone and the
    scores are z-scored as plain GRPO does (the baseline the paper argues against)"""
    judge_model: str = "toy"
    """`toy` (the offline colour judge), a served model name (with --judge-url) or a hub id / local path of a pairwise
    preference VLM loaded in-process (e.g. CodeGoat24/UnifiedReward-Think-qwen-7b)"""
    judge_url: str | None = None
    """OpenAI-compatible endpoint of the reward server, e.g. http://localhost:8080/v1 (vLLM, SGLang, ...)"""
    judge_mode: str = "generate"
    """`generate`: reasoning then verdict, as the model was trained; `logits`: one forward pass reading P(image 1) vs
    P(image 2) after a fixed answer prefix"""
    judge_both_orders: bool = True
    """judge every pair as (A, B) and (B, A) and average, cancelling the judge's position bias"""
    judge_workers: int = 16
    """requests in flight at once to the reward server"""
    judge_timeout: float = 180.0
    """seconds per request before it is retried"""
    judge_retries: int = 3
    """retries per request; a pair that still fails counts as a tie"""
    judge_api_key_env: str = "OPENAI_API_KEY"
    """name of the environment variable holding the reward server's API key (never printed)"""

    # --- advantages and loss (sections 4-5)
    adv_clip: float = 5.0
    """advantages are clamped to [-adv_clip, adv_clip]"""
    clip_range: float = 1e-4
    """PPO ratio clip; tiny because the log-probs are averaged over latent elements"""
    kl_beta: float = 0.0
    """weight of the KL between the policy's and the base model's Gaussian step (base = LoRA switched off); 0 as in
    the paper"""

    # --- optimisation
    lr: float = 1e-2
    """AdamW learning rate (paper: 1e-5 on FLUX.1-dev; the tiny random model needs a large one to move in minutes)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient-norm clipping"""
    train_batch_size: int = 0
    """trajectories per forward/backward (gradients accumulate over these micro-batches and over trained steps); 0: all"""
    full: bool = False
    """full fine-tuning instead of LoRA; under torchrun the transformer is sharded over the processes with FSDP2"""
    lora_rank: int = 16
    """LoRA rank (paper: 64)"""
    lora_alpha: float = 32.0
    """LoRA alpha (paper: 128)"""
    grad_checkpointing: bool | None = None
    """recompute activations in the backward pass; default: on for CUDA (saves memory), off on CPU (only costs time)"""

    # --- logging, checkpoints, evaluation
    save_every: int = 50
    """save a checkpoint every N steps (and at the end)"""
    keep_checkpoints: int = 2
    """how many most recent checkpoints to keep on disk"""
    sample_every: int = 20
    """save a grid of the step's samples every N steps"""
    eval_prompts: int = 8
    """held-out comparison at the end: the first N prompts ..."""
    eval_seeds: int = 4
    """... times this many held-out seeds, initial vs final policy, deterministic sampler; 0 disables"""


def parse_args(argv: list[str] | None = None) -> Args:
    """Build the command line from the dataclass: --flag-name per field, its docstring as help."""
    docs, fields = {}, ast.parse(inspect.getsource(Args)).body[0].body
    for node, nxt in zip(fields, fields[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    for f in dataclasses.fields(Args):
        name, kind = "--" + f.name.replace("_", "-"), str(f.type)
        if "bool" in kind:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=docs.get(f.name))
        else:
            cast = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(name, type=cast, default=f.default, help=docs.get(f.name))
    args = Args(**vars(parser.parse_args(argv)))
    if args.reward not in ("pairwise", "pointwise"):
        parser.error("--reward must be pairwise or pointwise")
    if args.group_size < 2:
        parser.error("--group-size must be at least 2: rewards are win rates inside a group")
    if not 0 < args.train_fraction <= 1:
        parser.error("--train-fraction must be in (0, 1]")
    if not 0 <= args.sde_window <= args.sample_steps:
        parser.error("--sde-window must be between 0 and --sample-steps")
    if args.kl_beta > 0 and args.full:  # a frozen copy of a 12B transformer would cost 24 GB more per GPU
        parser.error("--kl-beta needs LoRA: the base model is the transformer with its adapter switched off, and "
                     "--full has no adapter")
    return args


# ======================================================================================================================
# Models: FLUX or SD3 from the hub, or a tiny random one built offline (same code path for all)
# ======================================================================================================================
TOY_COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
TOY_THINGS = ["apple", "car", "house", "bird", "boat", "flower"]
# The demo's prompts all name one colour: the tiny random model barely listens to its text (its text pathway is random),
# and learning a prompt-conditional colour takes it far longer than a demo should (4 colours, 300 steps: no progress).
TOY_PROMPTS = [f"a red {thing}" for thing in TOY_THINGS]


def tiny_tokenizer(max_length: int):
    """A word-level tokenizer built in memory: the demo's words get their own ids, anything else is <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "an", "the", "of", "in", "on", "with", *TOY_COLOURS, *TOY_THINGS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    # End every prompt with </s>: CLIP pools its output at that token, so without it the pooled text is prompt-blind.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def tiny_pipeline(model: str = "tiny", seed: int = 0):
    """FLUX (`tiny`) or SD3.5 (`tiny-sd3`) at toy size with random weights: the real classes, 2 transformer blocks, a
    2-level VAE with 4 latent channels, CLIP (SD3: two, pooled and concatenated) and T5. FLUX: packed latents and a
    guidance embedding; SD3: (B, C, H, W) latents patchified inside the transformer, SD3.5's second attention and
    qk-norm. A random VAE decoder maps every latent to nearly the same colour: make it close to linear instead
    (residual blocks start as identity, a flat output norm, a strong output gain), so the latent's colour shows."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab, sd3 = len(tiny_tokenizer(8)), model == "tiny-sd3"
    clip = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, projection_dim=32, max_position_embeddings=16, pad_token_id=0,
                          bos_token_id=1, eos_token_id=1)
    # SD3 lays the two CLIPs' token features side by side and pads them to T5's width: T5 must be >= 2 x 32 wide
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=64 if sd3 else 32, d_kv=16, d_ff=64, num_layers=2,
                                 num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0, scaling_factor=1.0)
    with torch.no_grad():
        for name, p in vae.decoder.named_parameters():
            if ("resnets" in name and "conv2" in name) or ("attentions" in name and "to_out" in name):
                p.zero_()
        vae.decoder.conv_norm_out.weight.fill_(0.3)
        vae.decoder.conv_out.weight.mul_(20.0)  # 0.3 x 20 = 6: strong enough to reach saturated colours
    parts = dict(vae=vae, tokenizer=tiny_tokenizer(16), tokenizer_2=tiny_tokenizer(16))
    if sd3:
        transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                            joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16,
                                            dual_attention_layers=(0,), qk_norm="rms_norm")
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder_3=t5,
            text_encoder=CLIPTextModelWithProjection(clip), text_encoder_2=CLIPTextModelWithProjection(clip),
            tokenizer_3=tiny_tokenizer(16), **parts)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, text_encoder=CLIPTextModel(clip),
                        text_encoder_2=t5, **parts)


def is_sd3(pipe) -> bool:
    return type(pipe).__name__.startswith("StableDiffusion3")


def load_pipeline(model: str, device=None, dtype=None):
    """`tiny`, `tiny-sd3`, or a FLUX / SD3 pipeline from the hub or a local path (DiffusionPipeline picks the class
    from model_index.json), on `device`, frozen (training enables what it trains)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if model in ("tiny", "tiny-sd3"):
        pipe = tiny_pipeline(model)
    else:
        from diffusers import DiffusionPipeline

        if os.sep in model and not os.path.exists(model):
            raise SystemExit(f"error: model path {model!r} does not exist")
        try:
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
        except (OSError, ValueError) as err:  # missing files, bad repo id, no network: one line, not a traceback
            raise SystemExit(f"error: cannot load model {model!r}: {str(err).splitlines()[0]}") from None
        if not type(pipe).__name__.startswith(("Flux", "StableDiffusion3")):
            raise SystemExit(f"error: {model!r} is a {type(pipe).__name__}; only FLUX and SD3 pipelines are handled")
    pipe.to(device)  # dtype was set at load time (from_pretrained keeps the modules that must stay float32)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


# Module names (peft matches name suffixes). SD3: attention (attn and SD3.5's attn2) and both feed-forwards.
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
LORA_TARGETS = SD3_LORA_TARGETS + ["proj_mlp", "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear"]


def trainable_parameters(pipe, args: Args) -> list[torch.nn.Parameter]:
    """LoRA adapters through diffusers' add_adapter (peft), or the whole transformer with --full. Trained weights are
    kept in float32 (master weights); forwards run under bf16 autocast on CUDA."""
    transformer = pipe.transformer
    if args.full:
        transformer.requires_grad_(True)
    else:
        from peft import LoraConfig

        transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                           target_modules=SD3_LORA_TARGETS if is_sd3(pipe) else LORA_TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if args.full and world_size() > 1:
        shard_transformer(transformer)  # replaces the parameters by this process's shards (DTensors)
        params = [p for p in transformer.parameters() if p.requires_grad]
    return params


# ======================================================================================================================
# 1. Sampling: the flow ODE turned into an SDE with the same marginals, and each step's Gaussian log-prob
# ======================================================================================================================
def sigma_schedule(pipe, steps: int, image_seq_len: int, shift: float | None = None) -> torch.Tensor:
    """steps + 1 noise levels from 1 down to 0, from diffusers' own scheduler (FLUX's resolution-dependent shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler, cfg = pipe.scheduler, pipe.scheduler.config
    if shift is not None:  # a fixed shift, as Flow-GRPO and the official Pref-GRPO use (3.0)
        scheduler = type(scheduler).from_config(cfg, use_dynamic_shifting=False, shift=shift)
    mu = None
    if scheduler.config.use_dynamic_shifting:
        mu = calculate_shift(image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=mu, device="cpu")
    return scheduler.sigmas.float().clone()


def sde_step(v, x, sigma: float, sigma_next: float, eta: float, sigma_cap: float, prev=None, generator=None):
    """One Flow-GRPO SDE step x_sigma -> x_sigma_next for a flow-matching velocity v (float32 whatever the model dtype).

    std_t = eta * sqrt(sigma / (1 - sigma)), where sigma = 1 (infinite std) is capped at the first sigma below 1.
    mean  = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt,  dt = sigma_next - sigma < 0
    x_next = mean + std_t sqrt(-dt) * noise.
    Returns (x_next, log-prob of x_next averaged over all non-batch elements, mean, noise std). Given `prev`, returns
    that latent's log-prob instead of sampling one (the training pass). eta = 0 is the deterministic Euler step; it
    has no density, so its log-prob is returned as 0. A list of generators splits the rows evenly between them.
    """
    v, x = v.float(), x.float()
    dt = sigma_next - sigma
    std_t = eta * math.sqrt(sigma / (1 - min(sigma, sigma_cap)))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    if prev is None:
        noise = gaussian(x.shape, generator, x.device) if std > 0 else 0.0
        prev = mean + std * noise
    prev = prev.float().detach()
    if std == 0:
        return prev, torch.zeros(x.shape[0], device=x.device), mean, std
    log_prob = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return prev, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std


def gaussian(shape, generator, device) -> torch.Tensor:
    """Standard normal noise; a list of generators (one per group) draws the rows in equal blocks, one block each, so a
    group's noise does not depend on what else is in the batch."""
    if not isinstance(generator, list):
        return torch.randn(shape, generator=generator, device=device)
    rows = shape[0] // len(generator)
    return torch.cat([torch.randn((rows, *shape[1:]), generator=g, device=device) for g in generator])


# The model-specific parts, FLUX and SD3 side by side: text encoding, latent layout, the transformer call, decoding.
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int = 0, negative: bool = False) -> dict:
    """Text conditioning, one row per prompt (encoders frozen): FLUX = CLIP pooled + T5 sequence; SD3 = CLIP-L and
    CLIP-G pooled (concatenated) + [CLIP-L | CLIP-G, T5] sequence. `negative` adds the empty prompt's, for CFG."""
    t5 = pipe.tokenizer_3 if is_sd3(pipe) else pipe.tokenizer_2
    n = min(max_sequence_length or (256 if is_sd3(pipe) else 512), t5.model_max_length)
    with torch.no_grad():
        if is_sd3(pipe):
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=pipe.transformer.device,
                                                      do_classifier_free_guidance=False, max_sequence_length=n)
            cond = {"embeds": embeds, "pooled": pooled}
        else:
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                          device=pipe.transformer.device, max_sequence_length=n)
            cond = {"embeds": embeds, "pooled": pooled, "text_ids": text_ids}
    if negative:
        cond["neg"] = select(encode_prompts(pipe, [""], max_sequence_length), 0)
    return cond


def select(cond: dict, index) -> dict:
    """The conditioning rows of some samples (text_ids and the empty prompt's "neg" are shared by all rows)."""
    return {k: (v[index] if k in ("embeds", "pooled") else v) for k, v in cond.items()}


def latent_geometry(pipe, resolution: int) -> tuple[int, torch.Tensor | None]:
    """Image-token count (FLUX's shift depends on it) and positional ids. FLUX: a packed (B, tokens, 4C) sequence with
    ids; SD3: (B, C, H, W) latents that its transformer cuts into patch_size^2 patches itself, no ids."""
    side = resolution // pipe.vae_scale_factor
    if is_sd3(pipe):
        return (side // pipe.transformer.config.patch_size) ** 2, None
    ids = pipe._prepare_latent_image_ids(1, side // 2, side // 2, pipe.transformer.device, pipe.transformer.dtype)
    return ids.shape[0], ids


def initial_noise(pipe, n: int, resolution: int, generator) -> torch.Tensor:
    """n Gaussian latents in the model's layout (a list of generators gives each image its own seed)."""
    dev, channels = pipe.transformer.device, pipe.transformer.config.in_channels
    if is_sd3(pipe):
        return pipe.prepare_latents(n, channels, resolution, resolution, torch.float32, dev, generator)
    return pipe.prepare_latents(n, channels // 4, resolution, resolution, torch.float32, dev, generator)[0]


def velocity(pipe, x, sigma: float, cond: dict, img_ids, guidance: float, cfg_scale: float = 1.0) -> torch.Tensor:
    """The transformer's flow-matching velocity at noise level sigma. FLUX takes timestep = sigma and a guidance
    embedding; SD3 takes timestep = 1000 sigma. cfg_scale != 1: classifier-free guidance in one doubled batch."""
    transformer, n = pipe.transformer, x.shape[0]
    if cfg_scale != 1:
        both = {**cond, **{k: torch.cat([cond["neg"][k].expand_as(cond[k]), cond[k]]) for k in ("embeds", "pooled")}}
        v_neg, v_pos = velocity(pipe, torch.cat([x, x]), sigma, both, img_ids, guidance).chunk(2)
        return v_neg + cfg_scale * (v_pos - v_neg)
    # The text embeddings carry the pipeline's dtype; transformer.dtype would walk every submodule on each call.
    kwargs = dict(hidden_states=x.to(cond["embeds"].dtype), pooled_projections=cond["pooled"],
                  encoder_hidden_states=cond["embeds"], return_dict=False)
    with torch.autocast("cuda", torch.bfloat16, enabled=x.device.type == "cuda"):
        if is_sd3(pipe):
            return transformer(timestep=torch.full((n,), 1000 * sigma, device=x.device), **kwargs)[0]
        g = torch.full((n,), guidance, device=x.device) if transformer.config.guidance_embeds else None
        return transformer(timestep=torch.full((n,), sigma, device=x.device), guidance=g, txt_ids=cond["text_ids"],
                           img_ids=img_ids, **kwargs)[0]


@torch.no_grad()
def rollout(pipe, cond: dict, noise, sigmas, sde_mask: list[bool], eta: float, guidance: float, img_ids, generator,
            cfg_scale: float = 1.0):
    """Denoise a whole batch (every image of every group) with one transformer call per step.
    Returns all latents (n, T+1, *latent shape) and the log-probs of the SDE transitions (n, T; 0 on Euler steps)."""
    sigma_cap = float(sigmas[1])
    x, latents, log_probs = noise.float(), [noise.float()], []
    for i in range(len(sigmas) - 1):
        v = velocity(pipe, x, float(sigmas[i]), cond, img_ids, guidance, cfg_scale)
        x, lp, _, _ = sde_step(v, x, float(sigmas[i]), float(sigmas[i + 1]), eta if sde_mask[i] else 0.0, sigma_cap,
                               generator=generator)
        latents.append(x)
        log_probs.append(lp)
    return torch.stack(latents, 1), torch.stack(log_probs, 1)


@torch.no_grad()
def decode(pipe, latents, resolution: int) -> list[Image.Image]:
    """Latents -> PIL images through the VAE (FLUX's packed latents are unpacked to (B, C, H, W) first)."""
    x = latents if is_sd3(pipe) else pipe._unpack_latents(latents, resolution, resolution, pipe.vae_scale_factor)
    x = x / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    return pipe.image_processor.postprocess(pipe.vae.decode(x.to(pipe.vae.dtype)).sample, output_type="pil")


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], *, steps: int = 28, resolution: int = 512,
                    guidance: float = 3.5, max_sequence_length: int = 0, batch_size: int = 8,
                    cfg_scale: float = 1.0) -> list[Image.Image]:
    """One deterministic (eta = 0) image per (prompt, seed); the same seed gives the same image in any batch."""
    images = []
    for s in range(0, len(prompts), batch_size):
        p, sd = prompts[s:s + batch_size], seeds[s:s + batch_size]
        seq_len, img_ids = latent_geometry(pipe, resolution)
        gens = [torch.Generator(pipe.transformer.device).manual_seed(int(x)) for x in sd]
        latents, _ = rollout(pipe, encode_prompts(pipe, p, max_sequence_length, cfg_scale != 1),
                             initial_noise(pipe, len(p), resolution, gens), sigma_schedule(pipe, steps, seq_len),
                             [False] * steps, 0.0, guidance, img_ids, None, cfg_scale)
        images += decode(pipe, latents[:, -1], resolution)
    return images


def step_plan(steps: int, window: int, fraction: float, generator) -> tuple[list[bool], list[int]]:
    """Which sampling steps use the SDE (all, or a random window) and which of those get trained (a random subset)."""
    start = int(torch.randint(0, steps - window + 1, (1,), generator=generator)) if window else 0
    sde = list(range(start, start + window)) if window else list(range(steps))
    k = max(1, round(fraction * len(sde)))
    trained = sorted(sde[int(i)] for i in torch.randperm(len(sde), generator=generator)[:k])
    return [i in sde for i in range(steps)], trained


# ======================================================================================================================
# 2. Judging pairs: any function (prompts, images_a, images_b) -> (P(a better) or None per pair, info dict)
# ======================================================================================================================
def toy_colour_distance(prompt: str, image: Image.Image) -> float | None:
    """The offline demo's ground truth: distance from the image's mean colour to the colour named in the prompt
    (RGB in [0, 1], so 0 is perfect and sqrt(3) the worst); None when the prompt names no known colour."""
    words = re.findall(r"[a-z]+", prompt.lower())
    target = next((TOY_COLOURS[w] for w in words if w in TOY_COLOURS), None)
    if target is None:
        return None
    mean = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0) / 255
    return float(np.linalg.norm(mean - np.array(target)))


def toy_judge(prompts, images_a, images_b):
    """Prefers the image whose colours are closer to the colour the prompt names; a hard verdict, like a real judge."""
    probs = []
    for prompt, a, b in zip(prompts, images_a, images_b):
        da, db = toy_colour_distance(prompt, a), toy_colour_distance(prompt, b)
        probs.append(None if da is None else 0.5 if da == db else float(da < db))
    return probs, {}


def toy_scorer(prompts, images):
    """The pointwise twin of the toy judge: a score per image, 1 - distance / sqrt(3) (1 is the named colour)."""
    dist = [toy_colour_distance(p, im) for p, im in zip(prompts, images)]
    return [None if d is None else 1 - d / math.sqrt(3) for d in dist], {}


def make_judge(args: Args):
    """The toy judge (or scorer), or a real pairwise reward model (server or in-process) from mllm.py."""
    if args.judge_model == "toy":
        return toy_scorer if args.reward == "pointwise" else toy_judge
    if args.reward == "pointwise":
        raise SystemExit("error: --reward pointwise has only the toy scorer built in; pass train(args, judge=...) "
                         "a function (prompts, images) -> (scores, info) for another")
    import mllm

    try:
        return mllm.make_pairwise_judge(args.judge_model, args.judge_url, mode=args.judge_mode,
                                        both_orders=args.judge_both_orders, workers=args.judge_workers,
                                        timeout=args.judge_timeout, retries=args.judge_retries,
                                        api_key_env=args.judge_api_key_env)
    except RuntimeError as err:  # e.g. the reward server is down at start
        raise SystemExit(f"error: {err}") from None


def judge_groups(judge, prompts: list[str], images: list[Image.Image], group_size: int):
    """Judge every pair inside each group (never across groups) in one call; returns the preference matrices
    P[g, i, j] = P(image i beats image j) with P[g, j, i] = 1 - P[g, i, j], a failed judgment counting as a tie."""
    G, n_groups = group_size, len(prompts)
    pairs = [(g, i, j) for g in range(n_groups) for i in range(G) for j in range(i + 1, G)]
    probs, info = judge([prompts[g] for g, _, _ in pairs], [images[g * G + i] for g, i, _ in pairs],
                        [images[g * G + j] for g, _, j in pairs])
    pref = torch.full((n_groups, G, G), 0.5)
    for (g, i, j), p in zip(pairs, probs):
        p = 0.5 if p is None else float(p)
        pref[g, i, j], pref[g, j, i] = p, 1 - p
    return pref, {"judge_pairs": len(pairs), "judge_failed": sum(p is None for p in probs), **info}


def score_groups(scorer, prompts: list[str], images: list[Image.Image], group_size: int):
    """Pointwise baseline: one score per image, (groups, G); a failed score takes its group's mean (zero advantage)."""
    scores, info = scorer([p for p in prompts for _ in range(group_size)], images)
    r = torch.tensor([float("nan") if x is None else float(x) for x in scores]).view(len(prompts), group_size)
    fill = torch.nanmean(r, 1, keepdim=True).nan_to_num(0.0).expand_as(r)
    return torch.where(r.isnan(), fill, r), {"judge_failed": sum(x is None for x in scores), **info}


# ======================================================================================================================
# 3. Win rate: each image's share of wins against the other G - 1 images of its group
# ======================================================================================================================
def win_rates(pref: torch.Tensor) -> torch.Tensor:
    """pref (groups, G, G) with pref[g, i, j] = P(i beats j) -> (groups, G) win rates; a complete group sums to G / 2."""
    G = pref.shape[-1]
    return (pref.sum(-1) - pref.diagonal(dim1=-2, dim2=-1)) / (G - 1)


# ======================================================================================================================
# 4. Advantage: z-score inside the group, clamped
# ======================================================================================================================
def group_advantages(rewards: torch.Tensor, clip: float = 5.0, eps: float = 1e-4) -> torch.Tensor:
    """(groups, G) rewards -> advantages (r - mean) / (population std + eps), clamped to [-clip, clip].
    A group whose rewards are all equal carries no signal: its advantages are exactly 0."""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, correction=0, keepdim=True)
    adv = ((rewards - mean) / (std + eps)).clamp(-clip, clip)
    return torch.where((rewards == rewards[:, :1]).all(1, keepdim=True), torch.zeros_like(adv), adv)


# ======================================================================================================================
# 5. Loss: PPO clipped ratio on per-step log-probs
# ======================================================================================================================
def grpo_loss(log_prob, old_log_prob, advantages, clip_range: float):
    """mean over samples of max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = exp(log_prob - old_log_prob)."""
    ratio = torch.exp(log_prob - old_log_prob)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    with torch.no_grad():
        stats = {"clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(), "ratio": ratio.mean().item(),
                 "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean().item()}
    return loss, stats


def gaussian_kl(mean, base_mean, std: float) -> torch.Tensor:
    """KL(N(mean, std^2) || N(base_mean, std^2)) per sample: both steps share the SDE's std, so it is the squared mean
    gap over 2 std^2. Averaged (not summed) over latent elements, like the log-probs, so --kl-beta does not have to
    change with the resolution (Flow-GRPO's choice)."""
    return ((mean - base_mean) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std**2)


@contextlib.contextmanager
def adapters_off(transformer):
    """The base model without a second copy in memory: the same transformer with its LoRA adapter switched off."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


# ======================================================================================================================
# Processes: the same file under torchrun (one process per GPU), on torch.distributed
# ======================================================================================================================
# Every process computes the same global prompt list for a step and takes its own slice of whole groups, so a group is
# sampled, judged and turned into advantages on one process and pairs never cross groups, whatever the batch sizes.
# LoRA: the weights are replicated; after the backward passes the gradients are summed with one all-reduce (the loss
# is normalised by the GLOBAL number of kept samples, so the sum is exactly the 1-process gradient even when processes
# keep different numbers of samples). Not DDP: DDP syncs inside each backward and needs the same number of backward
# passes everywhere, but a process whose groups all have zero advantage runs none. --full: FSDP2 shards the weights,
# gradients and optimizer state (a 12B model in float32 with AdamW needs 190 GB); its reduce-scatter sums gradients.
def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def init_distributed(args: Args) -> tuple[int, int, torch.device]:
    """Under torchrun (WORLD_SIZE is set) join the process group: nccl on CUDA with one GPU per process (LOCAL_RANK),
    gloo on CPU. Returns (rank, world size, device); a plain `python pref_grpo.py` is rank 0 of 1."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if dist.is_initialized() else 0), world_size(), device


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
    for name in ("transformer_blocks", "single_transformer_blocks"):  # FLUX has both kinds, SD3 the first
        for block in getattr(transformer, name, []):
            fully_shard(block, mp_policy=mp)
    fully_shard(transformer, mp_policy=mp)
    for unit in (m for m in transformer.modules() if isinstance(m, FSDPModule)):  # a plain SUM (gloo has no PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)


# ======================================================================================================================
# Prompts, checkpoints, logging
# ======================================================================================================================
def load_prompts(path: str | None) -> list[str]:
    """A .txt file (one prompt a line, blank lines skipped) or a .jsonl file with a "prompt" field per line."""
    if path is None:
        return list(TOY_PROMPTS)
    if not os.path.isfile(path):
        raise SystemExit(f"error: prompt file {path!r} does not exist")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    prompt = json.loads(line)["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise SystemExit(f"error: {path}:{n}: expected a JSON object with a \"prompt\" field") from None
                if not isinstance(prompt, str) or not prompt.strip():
                    raise SystemExit(f"error: {path}:{n}: \"prompt\" must be a non-empty string")
                line = prompt
            prompts.append(line.strip())
    if not prompts:
        raise SystemExit(f"error: prompt file {path!r} has no prompts")
    return prompts


def step_prompts(prompts: list[str], step: int, count: int, seed: int) -> list[str]:
    """The prompts of one step: walk through a fresh permutation of the prompt list every epoch."""
    out = []
    for pos in range(step * count, (step + 1) * count):
        epoch, k = divmod(pos, len(prompts))
        out.append(prompts[int(torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + epoch))[k])])
    return out


def save_checkpoint(run_dir: Path, step: int, pipe, optimizer, args: Args, rank: int = 0) -> Path | None:
    """Written by rank 0 to a temporary directory and renamed into place, so a kill mid-write never leaves a broken
    checkpoint. LoRA in diffusers' format (the pipeline's load_lora_weights reads it); --full: the whole transformer
    (safetensors + config, gathered from the FSDP shards onto rank 0's CPU) and the optimizer state by name."""
    if args.full:  # a collective under FSDP: every process takes part, rank 0 receives the unsharded tensors
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(pipe.transformer, options=opts)
        optim = get_optimizer_state_dict(pipe.transformer, optimizer, options=opts)
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
    # All randomness is keyed by (seed, step), so the step number is the whole RNG state.
    (tmp / "state.json").write_text(json.dumps({"step": step, "seed": args.seed}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-args.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(path: str) -> Path:
    """A checkpoint directory itself, or the latest complete checkpoint of a run directory."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    found = sorted((p / "checkpoints").glob("step-*/state.json"))
    if not found:
        raise SystemExit(f"error: no checkpoint found in {path!r}")
    return found[-1].parent


def load_checkpoint(ckpt: Path, pipe, optimizer, args: Args) -> int:
    """Restore trained weights and optimizer state; returns the step to continue from. LoRA: every process reads the
    (small) files. --full: rank 0 reads them and FSDP broadcasts each tensor, each process keeping its shard."""
    from safetensors.torch import load_file

    if args.full:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        first = not dist.is_initialized() or dist.get_rank() == 0
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world_size() > 1)
        state = load_file(next((ckpt / "transformer").glob("*.safetensors"))) if first else {}
        set_model_state_dict(pipe.transformer, state, options=opts)
        optim = torch.load(ckpt / "optimizer.pt", weights_only=True) if first else {}
        set_optimizer_state_dict(pipe.transformer, optimizer, optim, options=opts)
    else:
        from peft.utils import set_peft_model_state_dict

        state = load_file(ckpt / "pytorch_lora_weights.safetensors")
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        result = set_peft_model_state_dict(pipe.transformer, state)
        if getattr(result, "unexpected_keys", None):
            raise SystemExit(f"error: {ckpt} does not match this model/LoRA configuration")
        for p in (p for p in pipe.transformer.parameters() if p.requires_grad):
            p.data = p.data.float()
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return json.loads((ckpt / "state.json").read_text())["step"]


def save_grid(images: list[Image.Image], prompts: list[str], columns: int, path: Path) -> None:
    """One row per prompt, with the prompt written above the row (tiny images are enlarged so the text fits)."""
    scale = max(1, 128 // images[0].width)
    w, h, cap = images[0].width * scale, images[0].height * scale, 14
    grid = Image.new("RGB", (w * columns, (h + cap) * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for r, prompt in enumerate(prompts):
        draw.text((2, r * (h + cap) + 1), prompt[:120], fill="black")
        for c in range(columns):
            grid.paste(images[r * columns + c].resize((w, h), Image.NEAREST), (c * w, r * (h + cap) + cap))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ======================================================================================================================
# Training loop
# ======================================================================================================================
def transition(pipe, batch: dict, idx, j: int, args: Args):
    """The sampling step j -> j + 1 of samples idx recomputed under the current weights: log-prob of the stored next
    latent (with gradient), the step's mean and its std."""
    sig, lat = batch["sigmas"], batch["latents"]
    v = velocity(pipe, lat[idx, j], float(sig[j]), select(batch["cond"], idx), batch["img_ids"], args.guidance,
                 args.cfg_scale)
    _, lp, mean, std = sde_step(v, lat[idx, j], float(sig[j]), float(sig[j + 1]), args.eta, float(sig[1]),
                                prev=lat[idx, j + 1])
    return lp, mean, std


def train_step(pipe, params, optimizer, batch: dict, adv: torch.Tensor, trained: list[int], args: Args) -> dict:
    """Recompute the log-probs of the trained steps with gradients and take one optimizer step. Trajectories whose
    group had zero advantage get no forward/backward at all. Under torchrun each process passes its own groups; the
    loss is the mean over the kept samples of all processes, so the update is the 1-process one."""
    dev, keep = batch["latents"].device, torch.nonzero(adv != 0).flatten()
    n_keep = int(all_reduce({"n": len(keep)}, dev)["n"])
    sums = {"loss": 0.0, "clip_frac": 0.0, "ratio": 0.0, "approx_kl": 0.0, **({"kl": 0.0} if args.kl_beta else {})}
    if n_keep == 0:
        return {**sums, "grad_norm": 0.0, "skipped_update": 1}
    chunks = list(keep.split(args.train_batch_size or max(len(keep), 1)))
    sharded = args.full and world_size() > 1
    if sharded:  # FSDP gathers weights inside each forward: every process must run as many passes (pad with empties)
        chunks += [keep[:0]] * (int(all_reduce({"n": len(chunks)}, dev, "max")["n"]) - len(chunks))
    pipe.transformer.train()
    for j in trained:
        for idx in chunks:
            weight = len(idx) / (n_keep * len(trained))  # mean over trained steps and all processes' kept samples
            idx = idx if len(idx) else torch.zeros(1, dtype=torch.long)  # a padding pass carries weight 0
            lp, mean, std = transition(pipe, batch, idx, j, args)
            loss, s = grpo_loss(lp, batch["log_probs"][idx, j], adv[idx].to(lp.device), args.clip_range)
            if args.kl_beta:  # KL to the base model on the same transition
                with torch.no_grad(), adapters_off(pipe.transformer):
                    base_mean = transition(pipe, batch, idx, j, args)[1]
                kl = gaussian_kl(mean, base_mean, std).mean()
                loss, s["kl"] = loss + args.kl_beta * kl, kl.item()
            (loss * weight).backward()
            for k in s:
                sums[k] += s[k] * weight
            sums["loss"] += loss.item() * weight
    pipe.transformer.eval()
    stats = {**all_reduce(sums, dev), "skipped_update": 0}  # per-process shares of the global means -> the means
    if world_size() > 1 and not sharded:
        sum_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    stats["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    if math.isfinite(stats["grad_norm"]) and math.isfinite(stats["loss"]):
        optimizer.step()
    else:  # a NaN/inf loss or gradient must not poison the weights: drop this update, keep training
        stats["skipped_update"] = 1
    optimizer.zero_grad(set_to_none=True)
    return stats


def group_seed(seed: int, step: int, group: int) -> int:
    """A seed for one group of one step, hashed so that nearby (seed, step, group) triples give unrelated streams."""
    return int(np.random.SeedSequence([seed, step, group]).generate_state(1)[0])


def sample_batch(pipe, prompts: list[str], step: int, args: Args, device, first_group: int = 0) -> dict:
    """Section 1 for one step: a group of G SDE trajectories for each prompt, all in one batched rollout. Each group
    draws all its noise from its own generator, keyed by (seed, step, global group index): processes sample different
    images, and a group's images do not depend on how many processes share the step."""
    G, n = args.group_size, len(prompts) * args.group_size
    groups = range(first_group, first_group + len(prompts))  # global group indices
    gens = [torch.Generator(device).manual_seed(group_seed(args.seed, step, g)) for g in groups]
    seq_len, img_ids = latent_geometry(pipe, args.resolution)
    sigmas = sigma_schedule(pipe, args.sample_steps, seq_len, args.shift)
    sde_mask, trained = step_plan(args.sample_steps, args.sde_window, args.train_fraction,  # same on every process
                                  torch.Generator().manual_seed(args.seed * 1_000_003 + step))
    noise = torch.cat([initial_noise(pipe, 1 if args.same_noise else G, args.resolution, g) for g in gens])
    if args.same_noise:
        noise = noise.repeat_interleave(G, 0)
    cond = select(encode_prompts(pipe, prompts, args.max_sequence_length, args.cfg_scale != 1), torch.arange(n) // G)
    latents, log_probs = rollout(pipe, cond, noise, sigmas, sde_mask, args.eta, args.guidance, img_ids, gens,
                                 args.cfg_scale)
    return {"latents": latents, "log_probs": log_probs, "cond": cond, "sigmas": sigmas, "img_ids": img_ids,
            "trained": trained}


def held_out(pipe, prompts: list[str], args: Args) -> tuple[list[str], list[Image.Image]]:
    """Images for the before/after comparison: fixed prompts and seeds that training never uses (eta = 0)."""
    ps = [p for p in prompts[:args.eval_prompts] for _ in range(args.eval_seeds)]
    seeds = [10**9 + k % args.eval_seeds for k in range(len(ps))]
    return ps, generate_images(pipe, ps, seeds, steps=args.sample_steps, resolution=args.resolution,
                               guidance=args.guidance, max_sequence_length=args.max_sequence_length,
                               cfg_scale=args.cfg_scale)


def compare(judge, prompts, before, after, pointwise: bool = False) -> dict:
    """The judge's win rate of the final policy against the initial one (0.5 = no change), and the toy metric."""
    if pointwise:  # a scorer's verdict on a pair: the higher score wins
        (s1, _), (s0, _) = judge(prompts, after), judge(prompts, before)
        probs = [None if a is None or b is None else 0.5 if a == b else float(a > b) for a, b in zip(s1, s0)]
    else:
        probs, _ = judge(prompts, after, before)
    out = {"win_rate_final_vs_initial": sum(0.5 if p is None else p for p in probs) / len(probs)}
    d0 = [toy_colour_distance(p, im) for p, im in zip(prompts, before)]
    d1 = [toy_colour_distance(p, im) for p, im in zip(prompts, after)]
    if None not in d0:
        out["colour_distance_initial"], out["colour_distance_final"] = sum(d0) / len(d0), sum(d1) / len(d1)
    return out


def train(args: Args, judge=None) -> dict:
    """The training loop. `judge` replaces the one the flags name (a pairwise judge, or a scorer with --reward
    pointwise). Under torchrun: every process samples, judges and trains its own groups; rank 0 alone writes files."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.prompts_per_step % world:
        raise SystemExit(f"error: --prompts-per-step ({args.prompts_per_step}) is the number of groups per step over "
                         f"all {world} processes and must be a multiple of {world}: each process takes whole groups")
    own_group = not dist.is_initialized()
    rank, world, device = init_distributed(args)
    main, sharded, per_rank = rank == 0, args.full and world > 1, args.prompts_per_step // world
    prompts = load_prompts(args.prompts)
    ckpt = find_checkpoint(args.resume) if args.resume else None
    run_dir = [str(ckpt.parent.parent if ckpt else args.output_dir or time.strftime("runs/%Y%m%d-%H%M%S"))]
    if world > 1:  # rank 0's clock names a new run
        dist.broadcast_object_list(run_dir, src=0)
    run_dir = Path(run_dir[0])
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    judge = judge or make_judge(args)  # before the (slow) model load: a dead reward server fails at once
    pipe = load_pipeline(args.model, device)

    # Initial policy images for the final comparison, made before any update (and kept on disk for resumed runs).
    eval_dir = run_dir / "eval"
    if main and args.eval_seeds and not (eval_dir / "before").exists():
        ps, imgs = held_out(pipe, prompts, args)
        for k, im in enumerate(imgs):
            (eval_dir / ".before").mkdir(parents=True, exist_ok=True)
            im.save(eval_dir / ".before" / f"{k:04d}.png")
        os.replace(eval_dir / ".before", eval_dir / "before")

    params = trainable_parameters(pipe, args)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if args.grad_checkpointing if args.grad_checkpointing is not None else device.type == "cuda":
        pipe.transformer.enable_gradient_checkpointing()
    start = load_checkpoint(ckpt, pipe, optimizer, args) if ckpt else 0
    if main:
        (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        n_params = sum(p.numel() for p in params)  # a DTensor shard counts its whole tensor
        print(f"run dir {run_dir} | {'full' if args.full else 'LoRA'} {n_params / 1e6:.2f}M trainable params | "
              f"{world} process(es){', FSDP2' if sharded else ''} | {len(prompts)} prompts | judge {args.judge_model} "
              f"| steps {start}->{args.train_steps}")

    bar = tqdm(range(start, args.train_steps), initial=start, total=args.train_steps, desc="pref-grpo",
               disable=not main)
    for step in bar:
        t0 = time.perf_counter()
        step_ps = step_prompts(prompts, step, args.prompts_per_step, args.seed)  # the global list, same everywhere
        mine = step_ps[rank * per_rank:(rank + 1) * per_rank]                     # this process's whole groups
        batch = sample_batch(pipe, mine, step, args, device, rank * per_rank)     # 1. sample
        t1 = time.perf_counter()
        images = decode(pipe, batch["latents"][:, -1], args.resolution)
        t2 = time.perf_counter()
        if args.reward == "pairwise":
            pref, judge_info = judge_groups(judge, mine, images, args.group_size)      # 2. judge pairs
            rewards = win_rates(pref)                                                  # 3. win rates
        else:
            rewards, judge_info = score_groups(judge, mine, images, args.group_size)
        t3 = time.perf_counter()
        adv = group_advantages(rewards, args.adv_clip).flatten()                       # 4. advantages
        stats = train_step(pipe, params, optimizer, batch, adv, batch["trained"], args)  # 5. loss + update
        t4 = time.perf_counter()

        # Metrics of the global batch: rewards gathered, judge counts (ints) summed and rates (floats) averaged.
        rewards, adv = gather(rewards, device), gather(adv, device)
        if world > 1:
            summed = all_reduce(judge_info, device)
            judge_info = {k: int(v) if type(judge_info[k]) is int else v / world for k, v in summed.items()}
        zero = (adv.view(-1, args.group_size) == 0).all(1)
        metrics = {"step": step + 1, "reward_mean": rewards.mean().item(),
                   "reward_group_std": rewards.std(1, correction=0).mean().item(),
                   "adv_abs_mean": adv.abs().mean().item(), "adv_max": adv.max().item(), "adv_min": adv.min().item(),
                   "skipped_groups": int(zero.sum()), "trained_steps": len(batch["trained"]), **stats, **judge_info,
                   "time_sample": t1 - t0, "time_decode": t2 - t1, "time_judge": t3 - t2, "time_train": t4 - t3,
                   "images_per_s": len(images) * world / (t4 - t0),
                   "peak_mem_gb": all_reduce({"m": peak_memory_gb(device)}, device, "max")["m"]}
        if args.judge_model == "toy":  # the demo's ground truth, when every prompt names a colour
            dists = [toy_colour_distance(mine[k // args.group_size], im) for k, im in enumerate(images)]
            dists = gather(torch.tensor([math.nan if d is None else d for d in dists]), device)
            if not dists.isnan().any():
                metrics["colour_distance"] = dists.mean().item()
        if main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            bar.set_postfix(reward_std=f"{metrics['reward_group_std']:.3f}", loss=f"{stats['loss']:.2e}",
                            img_s=f"{metrics['images_per_s']:.1f}")
            if (step + 1) % args.sample_every == 0 or step + 1 == args.train_steps:  # rank 0's groups
                save_grid(images, mine, args.group_size, run_dir / "samples" / f"step-{step + 1:06d}.png")
        if (step + 1) % args.save_every == 0 or step + 1 == args.train_steps:  # every process: FSDP gathers
            save_checkpoint(run_dir, step + 1, pipe, optimizer, args, rank)

    result = {}
    if args.eval_seeds and (main or sharded):  # FSDP forwards are collective: then every process samples them
        ps, after = held_out(pipe, prompts, args)
    if args.eval_seeds and main:
        before = [Image.open(eval_dir / "before" / f"{k:04d}.png").convert("RGB") for k in range(len(ps))]
        (eval_dir / "after").mkdir(exist_ok=True)
        for k, im in enumerate(after):
            im.save(eval_dir / "after" / f"{k:04d}.png")
        S = args.eval_seeds  # one row per prompt: its held-out seeds before training, then after
        save_grid([im for k in range(0, len(ps), S) for im in before[k:k + S] + after[k:k + S]],
                  [f"{p}: {S} before | {S} after" for p in ps[::S]], 2 * S, eval_dir / "before_after.png")
        result = compare(judge, ps, before, after, pointwise=args.reward == "pointwise")
        (eval_dir / "eval.json").write_text(json.dumps(result, indent=1))
        print(f"held-out ({len(ps)} images, seeds never trained on): judge win rate of final vs initial policy "
              f"{result['win_rate_final_vs_initial']:.3f} (0.5 = no change)")
        if "colour_distance_initial" in result:
            print(f"toy metric, distance to the prompt's colour (lower is better): "
                  f"{result['colour_distance_initial']:.3f} -> {result['colour_distance_final']:.3f}")
    if own_group and dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    train(parse_args())
