"""Multimodal LLM judges: UnifiedReward-Think as a pairwise preference reward.

The reward model (CodeGoat24/UnifiedReward-Think-qwen-7b, a fine-tuned Qwen2.5-VL) sees two images and the
caption they were generated from, reasons inside <think>...</think> and ends with
<answer>Image 1 is better</answer> or <answer>Image 2 is better</answer>.

Two back ends share one interface, `make_pairwise_judge(...)` -> judge(prompts, images_a, images_b):

* server:     an OpenAI-compatible chat endpoint (vLLM, SGLang, ...) reached with the standard library only.
              Many requests in flight, a timeout per request, retries with exponential backoff; a request that
              still fails becomes a failed judgment (None) and is counted, it never raises.
* in-process: the model loaded with transformers, pairs batched with left padding.

and two modes:

* generate:   chain-of-thought then verdict, as the model was trained; P(A better) is 0 or 1 per order.
* logits:     the assistant turn is prefilled up to "<answer>Image " and one forward pass reads the
              probabilities of the next token being "1" or "2": a soft P = p1 / (p1 + p2), no reasoning.

By default every pair is judged in both orders, (A, B) and (B, A), and P = (P_AB + 1 - P_BA) / 2, which cancels
the judge's position bias; how often the two orders disagree is reported.

The same helpers (`server_chat`, `local_chat`, ...) serve other image-judging prompts (UniGenBench scoring).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from PIL import Image
from tqdm import tqdm

log = logging.getLogger(__name__)

Request = tuple[str, list[Image.Image]]  # (user text, images); the images go before the text in the user turn

# The comparison instruction, in the structure UnifiedReward-Think was trained on: caption last, per-dimension
# scores, reasoning in <think>, a fixed verdict sentence in <answer>. Edit freely; keep the "{prompt}" slot.
PAIRWISE_INSTRUCTION = """You are shown two images that were generated from the same text caption, which is given at the end. Compare them carefully.

Judge the two images along several dimensions: semantic consistency (does the image show what the caption asks for: objects, counts, attributes, relations, written text), aesthetics (composition, color, artistic quality) and authenticity (realism, plausible detail, no artifacts). Add other dimensions when they matter for this caption. For every dimension give each image a score from 1 to 10 with a short reason, then add up the scores of each image and show the sums.

Put all of this reasoning between <think> and </think>. Then give the verdict between <answer> and </answer>: exactly "Image 1 is better" or "Image 2 is better", for the image with the higher total, and nothing else.

Format to follow (the scores below are placeholders that only show the layout):
<think>
1. Semantic consistency: Image 1 (8/10) - ...; Image 2 (6/10) - ...
2. Aesthetics: Image 1 (7/10) - ...; Image 2 (7/10) - ...
3. Authenticity: Image 1 (7/10) - ...; Image 2 (8/10) - ...
Total score:
Image 1: 8+7+7=22
Image 2: 6+7+8=21
</think>
<answer>Image 1 is better</answer>

Caption: [{prompt}]"""

# Logits mode: the assistant turn is prefilled with a closed, neutral <think> block (the model always saw one before
# <answer>) and the answer up to the image number. It ends with a space on purpose: Qwen's tokenizer splits every
# digit into its own token with the space before it as a separate token, so after this prefix the next token is
# exactly "1" or "2", as in training.
LOGITS_PREFIX = ("<think>\nI scored both images on semantic consistency, aesthetics and authenticity, "
                 "and added up the totals.\n</think>\n<answer>Image ")

JUDGE_IMAGE_SIZE = 512      # the reward model was trained on 512x512 images; also bounds request size
RETRY_BACKOFF_S = 1.0       # first retry delay; doubles each attempt (tests make it small)
TOP_LOGPROBS = 20           # vLLM's default --max-logprobs

_ANSWER = re.compile(r"<answer>(.*?)</answer>\s*\Z", re.DOTALL)
_VERDICTS = {"Image 1 is better": 1.0, "Image 2 is better": 0.0}


def parse_verdict(reply: str) -> float | None:
    """1.0 if the reply says image 1 is better, 0.0 for image 2, None for anything that is not exactly the format.

    Strict on purpose: a reply that drifts from the trained format is a sign the judgment is unreliable, so it
    counts as failed (a tie for the trainer) rather than being guessed at."""
    if not isinstance(reply, str) or reply.count("<answer>") != 1 or reply.count("</answer>") != 1:
        return None
    if "<think>" in reply and not 0 <= reply.find("</think>") < reply.find("<answer>"):
        return None  # the answer must come after the reasoning is closed, not inside it
    m = _ANSWER.search(reply)  # nothing but whitespace may follow </answer>
    return _VERDICTS.get(m.group(1).strip()) if m else None


# ----------------------------------------------------------------------------------------------- server back end

def _headers(api_key_env: str) -> dict:
    headers = {"Content-Type": "application/json"}
    if key := os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _scrub(text: str, api_key_env: str) -> str:
    """Error text shown to users: one line, and never the API key (some servers echo request details)."""
    key = os.environ.get(api_key_env)
    text = str(text).replace(key, "***") if key else str(text)
    return " ".join(text.split())[:300]


def _list_models(url: str, api_key_env: str, timeout: float) -> list[str]:
    req = urllib.request.Request(url.rstrip("/") + "/models", headers=_headers(api_key_env))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:
        hint = f" (check ${api_key_env})" if e.code in (401, 403) else ""
        raise RuntimeError(_scrub(f"judge server {url} answered HTTP {e.code} on /models{hint}", api_key_env)) from None
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise RuntimeError(_scrub(f"judge server {url} is not reachable: {reason}", api_key_env)) from None
    try:  # a reachable server with an odd /models reply is still usable: don't fail on the listing
        return [m["id"] for m in json.loads(body)["data"]]
    except (ValueError, LookupError, TypeError):
        return []


def check_server(url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 10.0) -> None:
    """Raise RuntimeError with one clear line if `{url}/models` does not answer; return quietly if it does."""
    _list_models(url, api_key_env, timeout)


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG", compress_level=1)  # fast: size matters less than CPU time
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _post_json(url: str, payload: dict, headers: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # timeout bounds connect and every read
        return json.loads(resp.read())


def _first_choice(data: dict) -> dict:
    choice = data["choices"][0]
    if not isinstance(choice, dict):
        raise TypeError("choice is not an object")
    return choice


def _reply_text(data: dict) -> str:
    text = _first_choice(data)["message"]["content"]
    if not isinstance(text, str):
        raise TypeError("message content is not a string")
    return text


def _send(url: str, payload: dict, headers: dict, timeout: float, retries: int, extract) -> tuple:
    """POST with retries; returns (extract(reply) or None, retries used, last error). Never raises on bad servers."""
    error = None
    for attempt in range(retries + 1):
        try:
            return extract(_post_json(url, payload, headers, timeout)), attempt, None
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}"
            if e.code < 500 and e.code not in (408, 429):
                return None, attempt, error  # a request the server rejects will be rejected again
        except (OSError, http.client.HTTPException, ValueError, LookupError, TypeError, AttributeError) as e:
            error = f"{type(e).__name__}: {e}"  # timeouts, dropped connections, garbage or malformed JSON
        if attempt < retries:  # jitter keeps many workers from retrying in lockstep
            time.sleep(RETRY_BACKOFF_S * 2 ** attempt * random.uniform(1.0, 1.5))
    return None, retries, error


def _server_run(requests: list[Request], url: str, model: str, *, extract, extra: dict, prefill: str | None,
                max_tokens: int, temperature: float, workers: int, timeout: float, retries: int,
                api_key_env: str, progress: bool) -> tuple[list, dict]:
    """The engine behind server_chat and the server logits mode: one chat completion per request, in parallel."""
    endpoint, headers = url.rstrip("/") + "/chat/completions", _headers(api_key_env)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        # Encode each distinct image once (a pair judged in both orders shares its images), in parallel.
        unique = {id(im): im for _, ims in requests for im in ims}
        urls = dict(zip(unique, pool.map(_png_data_url, unique.values())))
        futures = []
        for text, ims in requests:
            content = [{"type": "image_url", "image_url": {"url": urls[id(im)]}} for im in ims]
            messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
            if prefill is not None:
                messages.append({"role": "assistant", "content": prefill})
            payload = {"model": model, "messages": messages, "max_tokens": max_tokens,
                       "temperature": temperature, **extra}
            futures.append(pool.submit(_send, endpoint, payload, headers, timeout, retries, extract))
        for _ in tqdm(as_completed(futures), total=len(futures), disable=not progress, desc="judge"):
            pass
    results = [f.result() for f in futures]
    failed = Counter(r[2] for r in results if r[2] is not None)
    if failed:
        kinds = ", ".join(f"{error} x{count}" for error, count in failed.most_common(3))
        log.warning("%s", _scrub(f"judge server: {failed.total()}/{len(results)} requests failed after retries "
                                 f"({kinds})", api_key_env))
    stats = {"requests": len(results), "failed": failed.total(), "retries": sum(r[1] for r in results)}
    return [r[0] for r in results], stats


def server_chat(requests: list[Request], url: str, model: str, *, max_tokens: int = 1024, temperature: float = 0.0,
                workers: int = 8, timeout: float = 120.0, retries: int = 3, api_key_env: str = "OPENAI_API_KEY",
                progress: bool = False) -> tuple[list[str | None], dict]:
    """Replies in request order (None = failed after `retries` retries) and stats {"requests", "failed", "retries"}."""
    return _server_run(requests, url, model, extract=_reply_text, extra={}, prefill=None, max_tokens=max_tokens,
                       temperature=temperature, workers=workers, timeout=timeout, retries=retries,
                       api_key_env=api_key_env, progress=progress)


def _prob_from_logprobs(choice: dict | None) -> tuple[float, float] | None:
    """(p1 / (p1 + p2), p1 + p2) from the top log-probs of the first generated token that is not whitespace.

    Servers that apply the chat template through transformers may trim the prefill's trailing space; the model
    then first writes the space itself, so that step is skipped and the digit is read at the next one."""
    try:
        for step in choice["logprobs"]["content"]:
            top = [(t["token"].strip(), math.exp(t["logprob"])) for t in step["top_logprobs"]]
            if step["token"].strip() or not top:
                p1 = sum(p for tok, p in top if tok == "1")  # a digit missing from the top list counts as 0
                p2 = sum(p for tok, p in top if tok == "2")
                return (p1 / (p1 + p2), p1 + p2) if p1 + p2 > 0 else None
    except (LookupError, TypeError, AttributeError, ValueError, OverflowError):
        pass  # the server returned no (usable) log-probs
    return None


# ------------------------------------------------------------------------------------------ in-process back end

def _image_only_processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor without its video half, which needs torchvision; images work the same."""

        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwenProcessor


def load_local_vlm(name_or_path: str, device=None, dtype=None) -> tuple:
    """(model, processor) for a Qwen2.5-VL checkpoint (hub id or local folder), eval mode, left padding."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except ImportError:  # no torchvision: build the image-only processor below
        processor = None
    if not hasattr(processor, "image_processor"):  # AutoProcessor may also fall back to a bare tokenizer
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        processor = _image_only_processor_class()(image_processor=AutoImageProcessor.from_pretrained(name_or_path),
                                                  tokenizer=tokenizer, video_processor=None,
                                                  chat_template=tokenizer.chat_template)
    processor.tokenizer.padding_side = "left"  # batched generation appends on the right
    return model, processor


def _chat_text(processor, text: str, n_images: int, prefill: str = "") -> str:
    # The prefill is appended to the rendered prompt, not sent through continue_final_message, so nothing trims it.
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True) + prefill


def _encode(vlm: tuple, requests: list[Request], prefill: str = ""):
    model, processor = vlm
    texts = [_chat_text(processor, text, len(ims), prefill) for text, ims in requests]
    images = [im for _, ims in requests for im in ims] or None
    return processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt").to(model.device)


def local_chat(vlm: tuple, requests: list[Request], *, max_tokens: int = 1024, batch_size: int = 8) -> list[str]:
    """Greedy replies, `batch_size` requests per generate() call."""
    model, processor = vlm
    replies = []
    for i in range(0, len(requests), batch_size):
        inputs = _encode(vlm, requests[i:i + batch_size])
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=processor.tokenizer.pad_token_id)
        replies += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return replies


def _digit_token_ids(tokenizer, prefix: str) -> tuple[int, int]:
    """Token ids of "1" and "2" as the tokenizer writes them right after `prefix`."""
    base = tokenizer.encode(prefix, add_special_tokens=False)
    ids = []
    for digit in "12":
        full = tokenizer.encode(prefix + digit, add_special_tokens=False)
        if full[:len(base)] != base or len(full) != len(base) + 1:
            raise ValueError(f"the tokenizer does not write {digit!r} as one token after LOGITS_PREFIX; "
                             "edit LOGITS_PREFIX so that it does (for Qwen, end it with 'Image ')")
        ids.append(full[-1])
    return ids[0], ids[1]


def _local_answer_probs(vlm: tuple, requests: list[Request], batch_size: int) -> list[tuple[float, float]]:
    """Logits mode in process: (p1 / (p1 + p2), p1 + p2) per request, one forward pass each."""
    model, processor = vlm
    id1, id2 = _digit_token_ids(processor.tokenizer, LOGITS_PREFIX)
    results = []
    for i in range(0, len(requests), batch_size):
        inputs = _encode(vlm, requests[i:i + batch_size], prefill=LOGITS_PREFIX)
        with torch.inference_mode():  # left padding: the last position is every row's next token
            logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
        probs = logits.softmax(-1)
        p1, p2 = probs[:, id1], probs[:, id2]
        pref = torch.sigmoid(logits[:, id1] - logits[:, id2])  # = p1 / (p1 + p2), stable even when both are tiny
        results += list(zip(pref.tolist(), (p1 + p2).tolist()))
    return results


def tiny_vlm(seed: int = 0) -> tuple:
    """A tiny random Qwen2.5-VL (model, processor) built offline: a byte-level BPE tokenizer trained in memory with
    Qwen's split rules and special tokens, a Qwen-format chat template, 56x56 images (4 vision tokens each)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2VLImageProcessorPil)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    qwen_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen_split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([PAIRWISE_INSTRUCTION, LOGITS_PREFIX, "You are a helpful assistant."],
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
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    processor = _image_only_processor_class()(image_processor=images, tokenizer=tokenizer, video_processor=None,
                                              chat_template=template)
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
    return model, processor


# ------------------------------------------------------------------------------------------------- the judge

def _combine_orders(p_ab: list, p_ba: list | None) -> tuple[list, int, int]:
    """P(A better) per pair from P(first shown is better) in each order; also (#disagreeing, #pairs with both)."""
    if p_ba is None:
        return list(p_ab), 0, 0
    probs, disagree, both = [], 0, 0
    for ab, ba in zip(p_ab, p_ba):
        if ab is None or ba is None:  # one order failed: use the other; None if both did
            probs.append(ab if ba is None else 1.0 - ba)
            continue
        both += 1
        disagree += (ab - 0.5) * (0.5 - ba) < 0  # each order prefers a different image
        probs.append((ab + 1.0 - ba) / 2)
    return probs, disagree, both


def _judge_image(image: Image.Image) -> Image.Image:
    if image.size == (JUDGE_IMAGE_SIZE, JUDGE_IMAGE_SIZE) and image.mode == "RGB":
        return image
    return image.convert("RGB").resize((JUDGE_IMAGE_SIZE, JUDGE_IMAGE_SIZE), Image.BICUBIC)


def make_pairwise_judge(model: str, url: str | None = None, *, mode: str = "generate", both_orders: bool = True,
                        workers: int = 8, timeout: float = 120.0, retries: int = 3, api_key_env: str = "OPENAI_API_KEY",
                        max_tokens: int = 1024, batch_size: int = 8, device=None, dtype=None, vlm=None):
    """Returns judge(prompts, images_a, images_b) -> (probs, info): probs[i] = P(images_a[i] is better than
    images_b[i]) in [0, 1] or None for a failed judgment; info is a flat dict of numbers for the trainer's metrics.
    With `url` the model is served (checked now: a dead server fails here, once); otherwise it is loaded in process
    (`vlm` lets tests pass an already-built (model, processor))."""
    if mode not in ("generate", "logits"):
        raise ValueError(f"mode must be 'generate' or 'logits', not {mode!r}")
    if url is not None:
        served = _list_models(url, api_key_env, min(timeout, 30.0))
        if served and model not in served:
            raise RuntimeError(f"judge server {url} does not serve model {model!r} (it serves: {', '.join(served)})")
    elif vlm is None:
        vlm = load_local_vlm(model, device, dtype)
    server = dict(workers=workers, timeout=timeout, retries=retries, api_key_env=api_key_env)

    def score(requests: list[Request]) -> tuple[list, list, dict]:
        """P(first image better) per request, the answer-token mass (logits mode), server stats."""
        stats = {"requests": len(requests), "failed": 0, "retries": 0}
        if mode == "generate":
            if url is None:
                replies = local_chat(vlm, requests, max_tokens=max_tokens, batch_size=batch_size)
            else:
                replies, stats = server_chat(requests, url, model, max_tokens=max_tokens, **server)
            return [parse_verdict(r) for r in replies], [], stats
        if url is None:
            results = _local_answer_probs(vlm, requests, batch_size)
        else:  # max_tokens=2: room for the space a server may have trimmed off the prefill (see _prob_from_logprobs)
            extra = {"logprobs": True, "top_logprobs": TOP_LOGPROBS, "add_generation_prompt": False,
                     "continue_final_message": True}
            choices, stats = _server_run(requests, url, model, extract=_first_choice, extra=extra,
                                         prefill=LOGITS_PREFIX, max_tokens=2, temperature=0.0, progress=False, **server)
            results = [_prob_from_logprobs(c) for c in choices]
        return [r[0] if r else None for r in results], [r[1] for r in results if r], stats

    def judge(prompts: list[str], images_a: list[Image.Image], images_b: list[Image.Image]):
        if not len(prompts) == len(images_a) == len(images_b):
            raise ValueError("prompts, images_a and images_b must have the same length")
        start, n = time.perf_counter(), len(prompts)
        a, b = [_judge_image(im) for im in images_a], [_judge_image(im) for im in images_b]
        texts = [PAIRWISE_INSTRUCTION.replace("{prompt}", p) for p in prompts]  # not .format: prompts may hold braces
        requests = [(t, [x, y]) for t, x, y in zip(texts, a, b)]
        if both_orders:
            requests += [(t, [y, x]) for t, x, y in zip(texts, a, b)]
        p_first, mass, stats = score(requests)
        probs, disagree, both = _combine_orders(p_first[:n], p_first[n:] if both_orders else None)
        valid = [p for p in p_first if p is not None]
        info = {"judge_pairs": n, "judge_requests": len(requests),
                "judge_failed": sum(p is None for p in probs),  # pairs with no usable judgment (-> tie)
                "judge_invalid": len(requests) - len(valid),  # single-order judgments that failed
                "judge_retries": stats["retries"],
                "judge_order_disagree": disagree / both if both else 0.0,
                "judge_first_preferred": sum(valid) / len(valid) if valid else 0.5,  # 0.5 = no position bias
                "judge_seconds": time.perf_counter() - start}
        if mode == "logits":
            info["judge_answer_mass"] = sum(mass) / len(mass) if mass else 0.0
        return probs, info

    return judge
