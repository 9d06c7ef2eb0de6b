"""Today's open model families through the same file: Qwen-Image, Z-Image and FLUX.2 [klein]. Tiny random pipelines of
each, built here from configs (the real classes, toy sizes), are saved under their hub ids in an offline Hugging Face
cache, and every test goes through the command line a user types or checks our sampler against the family's own
diffusers pipeline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import pref_grpo as pg
from conftest import JSONHandler, LocalServer, offline_env, snapshot

ROOT = Path(__file__).resolve().parent
QWEN, ZIMAGE, ZTURBO = "Qwen/Qwen-Image", "Tongyi-MAI/Z-Image", "Tongyi-MAI/Z-Image-Turbo"
KLEIN_BASE, KLEIN = "black-forest-labs/FLUX.2-klein-base-9B", "black-forest-labs/FLUX.2-klein-4B"
FAMILIES = [QWEN, ZIMAGE, ZTURBO, KLEIN_BASE, KLEIN]
RES = 32  # every tiny VAE here downsamples 4x and the transformers cut 2x2 patches: 8x8 latents, 16 image tokens


# ---------------------------------------------------------------------------------------------------------------------
# Tiny random pipelines of each family (a Qwen-format byte-level BPE built in memory; Qwen2.5-VL / Qwen3 text encoders)
# ---------------------------------------------------------------------------------------------------------------------
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                 "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def qwen_tokenizer():
    """Byte-level BPE with Qwen's special tokens and chat template (the `enable_thinking` switch included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>", "<think>", "</think>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(pg.TINY_PROMPTS + ["Describe the image by detailing the color, shape, size, texture"],
                            trainers.BpeTrainer(vocab_size=320, special_tokens=special, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=QWEN_TEMPLATE, model_max_length=2048)


def qwen3(tokenizer, layers: int, causal_lm: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config).eval()


def tiny_family(repo: str):
    """A tiny random pipeline of the family that `repo` names, with its real classes and config conventions."""
    from diffusers import FlowMatchEulerDiscreteScheduler as Scheduler
    torch.manual_seed(0)
    tok = qwen_tokenizer()
    if repo == QWEN:
        from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                             pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, initializer_range=0.2),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32))).eval()
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True], latents_mean=[0.3, -0.2, 0.1, 0.5],
                                     latents_std=[1.5, 0.8, 2.0, 1.2])
        transformer = QwenImageTransformer2DModel(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                                  num_attention_heads=2, joint_attention_dim=32,
                                                  axes_dims_rope=(4, 6, 6))
        # dynamic shift, exponential time shift and a terminal stretch: the fixed --shift path must undo all three
        scheduler = Scheduler(base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9,
                              shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True, time_shift_type="exponential")
        return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok,
                                 transformer=transformer)
    if repo in (ZIMAGE, ZTURBO):
        from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                            up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 8, 16], layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, shift_factor=0.1159, scaling_factor=0.3611,
                            use_quant_conv=False, use_post_quant_conv=False)
        transformer = ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
                                               n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
                                               axes_lens=[256, 64, 64])
        return ZImagePipeline(scheduler=Scheduler(shift=3.0), vae=vae, text_encoder=qwen3(tok, 2, False),
                              tokenizer=tok, transformer=transformer)
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    vae = AutoencoderKLFlux2(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                             block_out_channels=[8, 8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4)
    with torch.no_grad():  # batch-norm statistics away from (0, 1), so that a missing normalisation shows
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 16))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    transformer = Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                          num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
                                          axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    scheduler = Scheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=qwen3(tok, 27, True), tokenizer=tok,
                              transformer=transformer, is_distilled=repo == KLEIN)


@pytest.fixture(scope="session")
def family_cache(tmp_path_factory) -> Path:
    """An offline Hugging Face cache with a tiny pipeline of each family under its hub id (use with offline_env)."""
    cache = tmp_path_factory.mktemp("hf-cache-families")
    for repo in FAMILIES:
        tiny_family(repo).save_pretrained(snapshot(cache, repo))
    return cache


def folder(cache: Path, repo: str) -> str:
    return str(snapshot(cache, repo))


def run_cli(script, *flags, env):
    return subprocess.run([sys.executable, str(ROOT / script), *flags], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


class FirstImageJudge(JSONHandler):
    """An OpenAI-compatible judge server that always prefers the image shown first."""

    def do_GET(self):
        self.send_json(200, {"object": "list", "data": [{"id": "UnifiedReward", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        reply = "<think>both fine</think><answer>Image 1 is better</answer>"
        self.send_json(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})


@pytest.fixture(scope="module")
def judge_url():
    server = LocalServer(FirstImageJudge)
    yield server.url
    server.close()


def stock_latents(pipe, noise):
    """Our initial noise in the layout the stock pipeline takes as `latents` (klein: unpacked patches)."""
    if pg.family(pipe) != "klein":
        return noise
    side = int(noise.shape[1] ** 0.5)
    return noise.transpose(1, 2).reshape(len(noise), -1, side, side)


# ---------------------------------------------------------------------------------------------------------------------
# Our sampler against each family's own pipeline
# ---------------------------------------------------------------------------------------------------------------------
STOCK_CFG = {QWEN: lambda g: dict(true_cfg_scale=g, negative_prompt="" if g != 1 else None),
             ZIMAGE: lambda g: dict(guidance_scale=g - 1),  # its pipeline's guidance g: pos + g (pos - neg)
             KLEIN_BASE: lambda g: dict(guidance_scale=g), KLEIN: lambda g: dict(guidance_scale=g)}
STOCK_CFG[ZTURBO] = STOCK_CFG[ZIMAGE]


@pytest.mark.parametrize("repo", FAMILIES)
def test_sde_step_mean_at_eta_zero_is_the_pipelines_own_scheduler_step_in_float64(family_cache, repo):
    """From the latents the stock pipeline (float64 weights) holds before each step, our velocity and SDE step at
    eta = 0 land on the latents its scheduler steps to: the same sigmas, timestep convention, sign and layout."""
    pipe = pg.load_pipeline(folder(family_cache, repo), "cpu", torch.float64)
    seq_len, ids = pg.latent_geometry(pipe, RES)
    noise = pg.initial_noise(pipe, 1, RES, torch.Generator().manual_seed(3))
    seen = []
    pipe(prompt=["a red apple"], latents=stock_latents(pipe, noise), height=RES, width=RES, num_inference_steps=4,
         max_sequence_length=64, output_type="latent", **STOCK_CFG[repo](1.0),  # no CFG
         callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or {})
    sigmas = pg.sigma_schedule(pipe, 4, seq_len)
    assert torch.allclose(sigmas, pipe.scheduler.sigmas.float(), atol=1e-6)
    cond = pg.encode_prompts(pipe, ["a red apple"], 64)
    for i, (x, stock_next) in enumerate(zip([noise] + seen[:-1], seen)):
        v = pg.velocity(pipe, x, float(sigmas[i]), cond, ids, 0.0)
        mean = pg.sde_step(v, x, float(sigmas[i]), float(sigmas[i + 1]), 0.0, float(sigmas[1]))[2]
        assert torch.allclose(mean, stock_next.float(), atol=1e-5), (i, (mean - stock_next).abs().max())
        assert (stock_next - x).abs().max() > 1e-2  # each step moves the latents


@pytest.mark.parametrize("repo, cfg", [(QWEN, 1.0), (QWEN, 4.0), (ZIMAGE, 1.0), (ZIMAGE, 4.0), (KLEIN_BASE, 4.0),
                                       (KLEIN, 4.0)])
def test_deterministic_sampler_equals_the_stock_pipeline_with_and_without_cfg(family_cache, repo, cfg):
    """Same noise in, same image out, through each family's VAE decoding; klein-4B is guidance-distilled: its pipeline
    ignores CFG, and so do we."""
    pipe = pg.load_pipeline(folder(family_cache, repo), "cpu")
    noise = pg.initial_noise(pipe, 1, RES, torch.Generator().manual_seed(7))
    ours = pg.generate_images(pipe, ["a red apple"], [7], steps=3, resolution=RES, max_sequence_length=64,
                              cfg_scale=cfg)[0]
    stock = pipe(prompt=["a red apple"], latents=stock_latents(pipe, noise), height=RES, width=RES,
                 num_inference_steps=3, max_sequence_length=64, **STOCK_CFG[repo](cfg)).images[0]
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(stock, dtype=int)).max() <= 1
    if cfg != 1 and repo != KLEIN:
        plain = pg.generate_images(pipe, ["a red apple"], [7], steps=3, resolution=RES, max_sequence_length=64)[0]
        assert not np.array_equal(np.asarray(plain), np.asarray(ours))


def test_a_fixed_shift_is_the_official_schedule_whatever_the_models_own(family_cache):
    """Qwen-Image's scheduler shifts by image size and stretches to a terminal sigma; --shift 3 is the official
    sd3_time_shift(3, linspace(1, 0)) all the same. Without --shift, klein's mu also depends on the step count."""
    pipe = tiny_family(QWEN)
    t = np.linspace(1, 0, 21)
    assert torch.allclose(pg.sigma_schedule(pipe, 20, 2025, 3.0), torch.tensor(3 * t / (1 + 2 * t)).float(), atol=1e-6)
    assert pg.sigma_schedule(pipe, 20, 2025)[-2] == pytest.approx(0.02, abs=1e-6)  # the terminal stretch is its own
    klein = tiny_family(KLEIN)
    a, b = pg.sigma_schedule(klein, 4, 1024), pg.sigma_schedule(klein, 50, 1024)
    assert not torch.allclose(a[1], b[50 // 4])  # sigma at the same t = 0.75 differs with the number of steps


# ---------------------------------------------------------------------------------------------------------------------
# The command line a user types: train, resume, the LoRA in the stock pipeline, unigenbench.py generate
# ---------------------------------------------------------------------------------------------------------------------
CLI_CFG = {QWEN: "4", ZIMAGE: "4", ZTURBO: "1", KLEIN_BASE: "4", KLEIN: "1"}  # CFG where the model is not distilled


def strip(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(("time", "images_per", "peak", "judge_sec"))}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("repo", FAMILIES)
def test_train_resume_load_the_lora_in_the_stock_pipeline_and_generate(family_cache, judge_url, tmp_path, repo):
    """Through the command line: one round, then resumed to two, equals an uninterrupted two-round run (in process:
    each interpreter start costs seconds); its LoRA loads into the stock pipeline; unigenbench.py generate draws."""
    env = offline_env(family_cache)
    (tmp_path / "p.txt").write_text("a red apple\na blue car\n")
    flags = ["--prompts", str(tmp_path / "p.txt"), "--judge-url", judge_url, "--judge-model", "UnifiedReward",
             "--judge-order", "first", "--resolution", str(RES), "--sample-steps", "3", "--group-size", "3",
             "--prompts-per-step", "1", "--eval-seeds", "0", "--max-sequence-length", "64", "--lora-rank", "4",
             "--lr", "3e-2", "--save-every", "1", "--cfg-scale", CLI_CFG[repo]]
    r = run_cli("pref_grpo.py", "--model", repo, *flags, "--train-steps", "1", "--output-dir", str(tmp_path / "cut"),
                env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("pref_grpo.py", "--resume", str(tmp_path / "cut"), "--train-steps", "2", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    pg.train(pg.parse_args(["--model", folder(family_cache, repo), *flags, "--train-steps", "2", "--output-dir",
                            str(tmp_path / "full")]))
    full = strip(tmp_path / "full")
    assert [m["step"] for m in full] == [1, 2] and all(m["updates"] == 1 and m["grad_norm"] > 0 for m in full)
    assert strip(tmp_path / "cut") == full  # the resumed run repeats the uninterrupted one exactly
    a, b = (load_file(tmp_path / run / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors")
            for run in ("cut", "full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the LoRA loads into the family's stock pipeline and gives our trained transformer's velocity
    from diffusers import DiffusionPipeline
    ckpt = tmp_path / "full" / "checkpoints" / "step-000002"
    stock = DiffusionPipeline.from_pretrained(folder(family_cache, repo))
    args = pg.parse_args(["--resume", str(tmp_path / "full")])
    ours = pg.load_pipeline(folder(family_cache, repo), "cpu")
    pg.load_checkpoint(ckpt, ours, torch.optim.AdamW(pg.trainable_parameters(ours, args)), args)
    _, ids = pg.latent_geometry(stock, RES)
    x, cond = pg.initial_noise(stock, 2, RES, torch.Generator().manual_seed(0)), pg.encode_prompts(stock, ["a", "b"])
    with torch.no_grad():
        base = pg.velocity(stock, x, 0.6, cond, ids, 0.0)
        stock.load_lora_weights(str(ckpt))
        loaded, trained = pg.velocity(stock, x, 0.6, cond, ids, 0.0), pg.velocity(ours, x, 0.6, cond, ids, 0.0)
    assert (loaded - base).abs().max() > 1e-4 and torch.allclose(loaded, trained, atol=1e-5)

    (tmp_path / "ugb.jsonl").write_text("".join(line + "\n" for line in (ROOT / "prompts.jsonl").read_text()
                                                .splitlines()[:2]))
    r = run_cli("unigenbench.py", "generate", "--model", repo, "--out", str(tmp_path / "images"), "--steps", "2",
                "--resolution", str(RES), "--n", "1", "--prompts", str(tmp_path / "ugb.jsonl"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    images = sorted((tmp_path / "images").glob("*.png"))
    assert len(images) == 2 and all(Image.open(p).size == (RES, RES) for p in images)


@pytest.mark.parametrize("repo", [QWEN, ZIMAGE, KLEIN_BASE])
def test_full_fine_tuning_with_gradient_checkpointing_saves_a_transformer_the_stock_class_loads(family_cache,
                                                                                                 judge_url, tmp_path,
                                                                                                 repo):
    (tmp_path / "p.txt").write_text("a red apple\n")
    pg.train(pg.parse_args(["--model", folder(family_cache, repo), "--prompts", str(tmp_path / "p.txt"), "--judge-url",
                            judge_url, "--judge-model", "UnifiedReward", "--judge-order", "first", "--resolution",
                            str(RES), "--sample-steps", "3", "--group-size", "3", "--eval-seeds", "0", "--lr", "1e-3",
                            "--max-sequence-length", "64", "--full", "--grad-checkpointing", "--train-steps", "1",
                            "--cfg-scale", "2", "--output-dir", str(tmp_path / "run")]))
    m = strip(tmp_path / "run")[0]
    assert m["updates"] == 1 and m["grad_norm"] > 0 and m["ratio"] == pytest.approx(1.0)
    base = pg.load_pipeline(folder(family_cache, repo), "cpu").transformer
    trained = type(base).from_pretrained(tmp_path / "run" / "checkpoints" / "step-000001" / "transformer")
    same = {n.rsplit(".", 1)[0] for (n, p), q in zip(base.named_parameters(), trained.parameters())
            if torch.equal(p, q)}
    # every weight moved except, in Qwen-Image, the last block's text-side output: nothing reads it, so no gradient
    assert same == ({"transformer_blocks.1.attn.to_add_out", "transformer_blocks.1.txt_mlp.net.0.proj",
                     "transformer_blocks.1.txt_mlp.net.2"} if repo == QWEN else set())


def test_an_unknown_pipeline_class_is_a_one_line_error_naming_the_supported_families(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    (tmp_path / "p.txt").write_text("a red apple\n")
    r = run_cli("pref_grpo.py", "--model", str(tmp_path / "ddpm"), "--prompts", str(tmp_path / "p.txt"),
                "--judge-model", "colour", "--output-dir", str(tmp_path / "run"), env=os.environ)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    for name in ("DDPMPipeline", "Qwen-Image", "Z-Image", "FLUX.2 [klein]", "Flux2KleinPipeline"):
        assert name in errors[0]
