"""Shared test fixtures: tiny models built offline, and an offline Hugging Face cache holding them under the real hub
ids, so that tests load `--model black-forest-labs/FLUX.1-dev` exactly as a user's command line does."""

import os
from pathlib import Path

# Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP threads that wait for each other
# made a tiny training round 70x slower (45 s against 0.6 s). Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"

import json  # noqa: E402
import threading  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import pref_grpo as pg  # noqa: E402

torch.set_num_threads(1)

HUB_IDS = {"flux": "black-forest-labs/FLUX.1-dev", "sd3": "stabilityai/stable-diffusion-3.5-medium",
           "judge": "CodeGoat24/UnifiedReward-Think-qwen-7b", "clip": "apple/DFN5B-CLIP-ViT-H-14-378",
           "ugb_judge": "CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1"}


def tiny_vlm(seed: int = 0, verdict: str | None = None) -> tuple:
    """A tiny random Qwen2.5-VL (model, processor) built offline: a byte-level BPE tokenizer trained in memory with
    Qwen's split rules and special tokens, a Qwen-format chat template, 56x56 images (4 vision tokens each).
    `verdict`: a text it answers every time (one added token, biased to win each step), so a run gets verdicts."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([pg.UNIFIEDREWARD_THINK_PROMPT, "You are a helpful assistant."],
                            trainers.BpeTrainer(vocab_size=512, special_tokens=special, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
                "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left", chat_template=template)
    tokenizer.add_tokens([verdict] if verdict else [])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}

    class ImageOnlyProcessor(Qwen2_5_VLProcessor):  # no torchvision here: no video processor
        def check_argument_for_proper_class(self, name, argument):
            return None if argument is None else super().check_argument_for_proper_class(name, argument)

    processor = ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56),
                                   tokenizer=tokenizer, video_processor=None, chat_template=template)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], initializer_range=0.1),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56, initializer_range=0.3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    config.initializer_range = 0.1  # wider than the default 0.02, so the answer visibly depends on the images
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    if verdict:
        model.generation_config.sequence_bias = [[[tokenizer.convert_tokens_to_ids(verdict)], 100.0]]
    return model, processor


def tiny_sd3(seed: int = 0):
    """A tiny random SD3.5 (MMDiT-X: a dual-attention layer, RMS q/k norm) with two CLIPs and T5, on the tiny FLUX's
    near-linear VAE and word-level tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    flux, vocab = pg.tiny_pipeline(seed), len(pg.tiny_tokenizer())
    clip = CLIPTextConfig(vocab_size=vocab, projection_dim=32, **pg.TINY_CLIP_TEXT)
    # SD3 lays the two CLIPs' token features side by side and pads them to T5's width: T5 must be >= 2 x 32 wide
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=flux.vae,
        text_encoder=CLIPTextModelWithProjection(clip), text_encoder_2=CLIPTextModelWithProjection(clip),
        text_encoder_3=t5, **{k: pg.tiny_tokenizer() for k in ("tokenizer", "tokenizer_2", "tokenizer_3")})


def save_vlm(vlm: tuple, folder: Path) -> None:
    model, processor = vlm
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)


def snapshot(cache: Path, repo_id: str) -> Path:
    """The folder a hub download of repo_id lands in (models--ORG--NAME/snapshots/<commit>, refs/main naming it)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache with the tiny models saved under the real hub ids. Use it with offline_env()."""
    cache = tmp_path_factory.mktemp("hf-cache")
    pg.tiny_pipeline().save_pretrained(snapshot(cache, HUB_IDS["flux"]))
    tiny_sd3().save_pretrained(snapshot(cache, HUB_IDS["sd3"]))
    save_vlm(tiny_vlm(verdict="<answer>Image 1 is better</answer>"), snapshot(cache, HUB_IDS["judge"]))
    save_vlm(tiny_vlm(seed=1), snapshot(cache, HUB_IDS["ugb_judge"]))
    model, tokenizer, images = pg.load_clip("tiny", "cpu", as_trained=True)  # the checkpoint as trained
    for part in (model, tokenizer, images):
        part.save_pretrained(snapshot(cache, HUB_IDS["clip"]))
    return cache


def offline_env(cache: Path) -> dict:
    """The environment of a user whose cache holds the models and who has no network."""
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache.parent / "hf-home")}


class JSONHandler(BaseHTTPRequestHandler):
    """The base of the tests' OpenAI-compatible servers on 127.0.0.1: quiet, and a JSON (or raw bytes) reply."""

    def log_message(self, *args):
        pass

    def send_json(self, code, obj, reason=None):
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(code, reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving `handler`; `url` ends in /v1, like vLLM's."""

    def __init__(self, handler):
        ThreadingHTTPServer.request_queue_size = 64  # the default backlog of 5 drops concurrent connections
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def one_line_error(r, *needles):
    """A failed command: non-zero exit, no traceback, exactly one error line, naming each needle."""
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout[-2000:] + r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, r.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def read_metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
