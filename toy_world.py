"""A toy world small enough to watch Pref-GRPO learn on a laptop CPU: 32 x 32 scenes of coloured squares and bars,
prompts whose requirements are known exactly, a pixel checker that grades an image against its prompt, a graded
pairwise judge built on that checker, and a tiny FLUX pretrained on the world once (minutes on 2 CPU cores) and cached.

The world: filled squares and thin horizontal bars in red, green, blue or yellow on white, one or two of them, of one
colour and shape, anywhere or in a named half. 80 prompts:
  "a red square"                       requires colour, shape, count (exactly one object)
  "two blue bars"                      colour, shape, count (exactly two)
  "two green squares at the top"       ... and side (every object's centre in the named half)
TRAIN_PROMPTS and EVAL_PROMPTS are disjoint; the model is pretrained and RL-trained on TRAIN_PROMPTS only, so
EVAL_PROMPTS measure whether what it learnt carries over to new combinations of the same words.

Usage:
  python toy_world.py                  # pretrain (first time only, then cached) and grade the model on EVAL_PROMPTS

  import pref_grpo, toy_world
  folder = toy_world.pretrained_model()               # a FluxPipeline folder; trains on a cache miss
  pipe = pref_grpo.load_pipeline(str(folder))         # the same loading code as a real FLUX
  images = pref_grpo.generate_images(pipe, prompts, seeds, steps=8, resolution=32)
  toy_world.accuracy(prompts, images)                 # {"colour": 0.95, "shape": 0.7, ..., "all": 0.3}

The cache lives in $PREF_GRPO_CACHE, else $XDG_CACHE_HOME/pref_grpo, else ~/.cache/pref_grpo, in a folder named after
a hash of the world's settings (change a setting and the next call retrains).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import pref_grpo

# ======================================================================================================================
# The world: palette, shapes, prompts
# ======================================================================================================================
SIZE = 32
MIDDLE = (SIZE - 1) / 2
BACKGROUND = (255, 255, 255)
# Saturated and far apart in RGB, so the nearest palette colour of a slightly blurry generated pixel is unambiguous.
COLOURS = {"red": (255, 0, 0), "green": (0, 204, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
# Two shapes a 1M-parameter model tells apart at 32 px: a filled square and a thin horizontal bar (width / height 1
# against 3-6). Circles, squares and triangles came out as the same blob (docs/toy_world.md).
SHAPES = ["square", "bar"]
NUMBERS = {"a": 1, "two": 2}  # "three" made count the bottleneck (docs/toy_world.md)
SIDES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
KINDS = ["colour", "shape", "count", "side"]


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: `count` objects of one colour and shape, in the named half (side) or anywhere (None)."""
    colour: str
    shape: str
    count: int
    side: str | None = None

    @property
    def kinds(self) -> list[str]:
        return ["colour", "shape", "count"] + (["side"] if self.side else [])


def prompt_text(spec: Spec) -> str:
    """The one English sentence for a spec (the inverse of parse_prompt)."""
    number = next(w for w, n in NUMBERS.items() if n == spec.count)
    where = f" {SIDES[spec.side]}" if spec.side else ""
    return f"{number} {spec.colour} {spec.shape}{'s' * (spec.count > 1)}{where}"


_GRAMMAR = re.compile(rf"({'|'.join(NUMBERS)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?"
                      rf"(?: ({'|'.join(SIDES.values())}))?")


def parse_prompt(prompt: str) -> Spec:
    """Any sentence of the toy grammar -> its Spec (so prompts read from a file are graded too)."""
    text = " ".join(prompt.lower().split())
    m = _GRAMMAR.fullmatch(text)
    spec = m and Spec(m[2], m[3], NUMBERS[m[1]], next((k for k, v in SIDES.items() if v == m[4]), None))
    if not spec or prompt_text(spec) != text:  # "a red squares", "two red square": not the grammar
        raise ValueError(f"not a toy-world prompt: {prompt!r}")
    return spec


def all_prompts() -> list[str]:
    """Every prompt of the grammar, in a fixed order: 4 colours x 2 shapes x 2 counts x (anywhere + 4 sides) = 80."""
    return [prompt_text(Spec(c, s, n, side)) for n in NUMBERS.values() for side in [None, *SIDES] for c in COLOURS
            for s in SHAPES]


def split_prompts(eval_every: int = 5, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out one prompt in `eval_every` of each template (count x anywhere-or-sided; seeded shuffle), so the eval
    set covers every kind of requirement while each held-out prompt is a new combination of words the training
    prompts all use. 66 training prompts, 14 held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    templates: dict[tuple, list[str]] = {}
    for p in all_prompts():
        spec = parse_prompt(p)
        templates.setdefault((spec.count, spec.side is None), []).append(p)
    for ps in templates.values():
        order, k = rng.permutation(len(ps)), max(1, len(ps) // eval_every)
        held += [ps[i] for i in sorted(order[:k])]
        train += [ps[i] for i in sorted(order[k:])]
    return train, held


TRAIN_PROMPTS, EVAL_PROMPTS = split_prompts()


# ======================================================================================================================
# Drawing a scene
# ======================================================================================================================
# (width, height) ranges in pixels per shape and count: as large as fits in one half, two with room between them.
SIZES = {("square", 1): ((10, 13),) * 2, ("square", 2): ((8, 10),) * 2,
         ("bar", 1): ((12, 14), (3, 4)), ("bar", 2): ((10, 13), (3, 3))}
GAP = 3  # empty pixels between two objects, so objects of one colour never merge into one region


def place_boxes(rng: np.random.Generator, spec: Spec) -> list[tuple[int, int, int, int]]:
    """spec.count non-overlapping boxes (x0, y0, width, height), GAP apart, one pixel from the border; with a side,
    wholly inside that half and a pixel from the middle, so the side is never a judgement call."""
    (w_lo, w_hi), (h_lo, h_hi) = SIZES[spec.shape, spec.count]
    for _ in range(10_000):
        boxes = []
        for _ in range(spec.count):
            w = int(rng.integers(w_lo, w_hi + 1))
            h = w if spec.shape == "square" else int(rng.integers(h_lo, h_hi + 1))
            x_lo, x_hi, y_lo, y_hi = 1, SIZE - 1 - w, 1, SIZE - 1 - h
            if spec.side == "left":
                x_hi = SIZE // 2 - 1 - w
            elif spec.side == "right":
                x_lo = SIZE // 2 + 1
            elif spec.side == "top":
                y_hi = SIZE // 2 - 1 - h
            elif spec.side == "bottom":
                y_lo = SIZE // 2 + 1
            box = (int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1)), w, h)
            if not all(_gap(box, b) >= GAP for b in boxes):
                break
            boxes.append(box)
        if len(boxes) == spec.count:
            return boxes
    raise RuntimeError(f"could not place {prompt_text(spec)!r}")  # unreachable at these sizes


def _gap(a, b) -> int:
    """Empty pixels between two boxes (the larger of the horizontal and vertical gaps; negative if they overlap)."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    return max(bx - (ax + aw), ax - (bx + bw), by - (ay + ah), ay - (by + bh))


def draw_scene(prompt: str, seed: int) -> Image.Image:
    """A correct 32 x 32 picture of the prompt; the seed picks sizes and positions."""
    spec, rng = parse_prompt(prompt), np.random.default_rng(seed)
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for x0, y0, w, h in place_boxes(rng, spec):
        draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), fill=COLOURS[spec.colour])
    return image


# ======================================================================================================================
# The pixel checker
# ======================================================================================================================
PALETTE_NAMES = ["background", *COLOURS]
PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
MIN_BLOB = 8  # pixels: smaller specks are sampling noise, not objects (the smallest drawn object covers 27)
BAR_ASPECT = 2.0  # width / height at or above which an object is a bar (drawn: squares 1, bars 3 to 6)


@dataclass
class Blob:
    colour: str
    aspect: float  # bounding-box width / height
    centre: tuple[float, float]  # (x, y)
    area: int

    @property
    def shape(self) -> str:
        return "bar" if self.aspect >= BAR_ASPECT else "square"


def palette_labels(image: Image.Image) -> np.ndarray:
    """(32, 32) index into PALETTE_NAMES of each pixel's nearest palette colour."""
    rgb = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    return ((rgb[:, :, None, :] - PALETTE) ** 2).sum(-1).argmin(-1)


def connected_blobs(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(palette index, boolean mask) of each 4-connected region of one non-background colour (breadth-first fill)."""
    h, w = labels.shape
    seen = labels == 0
    blobs = []
    for y0, x0 in zip(*np.nonzero(~seen)):
        if seen[y0, x0]:
            continue
        colour, mask, queue = labels[y0, x0], np.zeros_like(seen), deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            mask[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and labels[ny, nx] == colour:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        blobs.append((int(colour), mask))
    return blobs


def blob(colour: int, mask: np.ndarray) -> Blob:
    ys, xs = np.nonzero(mask)
    aspect = (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)
    return Blob(PALETTE_NAMES[colour], float(aspect), (float(xs.mean()), float(ys.mean())), int(mask.sum()))


def scene(image: Image.Image) -> tuple[list[Blob], np.ndarray, int]:
    """The objects in an image (connected one-colour regions bigger than a speck), the palette labels, and how many
    foreground pixels lie in specks."""
    labels, blobs, specks = palette_labels(image), [], 0
    for colour, mask in connected_blobs(labels):
        if mask.sum() >= MIN_BLOB:
            blobs.append(blob(colour, mask))
        else:
            specks += int(mask.sum())
    return blobs, labels, specks


def on_side(side: str, centre: tuple[float, float]) -> float:
    """How far (pixels) a centre lies past the middle towards the named side; negative on the wrong side."""
    x, y = centre
    return {"left": MIDDLE - x, "right": x - MIDDLE, "top": MIDDLE - y, "bottom": y - MIDDLE}[side]


def grade_scene(prompt: str, image: Image.Image) -> tuple[dict[str, bool], float]:
    """Grade an image against each requirement of its prompt, {kind: met}, and a margin in [0, 1] that says how
    clearly it meets them (the judge breaks ties between images meeting as many requirements with it):
    - colour: every object has the named colour (and there is one);    margin: share of foreground pixels in it;
    - shape:  every object has the named shape (and there is one);     margin: how far each object's aspect is past
              the threshold BAR_ASPECT, in octaves (log2), capped at 1; and the share of foreground pixels in objects
              rather than specks;
    - count:  as many objects as named;
    - side:   (when named) every object's centre lies in that half;     margin: each centre's distance past the
              middle, over 8 pixels, capped at 1.
    Each kind is judged on its own, so "two red bars" drawn as one red bar fails count only."""
    spec = parse_prompt(prompt)
    blobs, labels, specks = scene(image)
    foreground = max(int((labels > 0).sum()), 1)
    want = PALETTE_NAMES.index(spec.colour)
    met = {"colour": bool(blobs) and all(b.colour == spec.colour for b in blobs),
           "shape": bool(blobs) and all(b.shape == spec.shape for b in blobs),
           "count": len(blobs) == spec.count}
    sign = 1 if spec.shape == "bar" else -1
    margins = [float((labels == want).sum()) / foreground, 1 - specks / foreground,
               *([min(max(sign * math.log2(b.aspect / BAR_ASPECT), 0.0), 1.0) for b in blobs] or [0.0])]
    if spec.side:
        met["side"] = bool(blobs) and all(on_side(spec.side, b.centre) > 0 for b in blobs)
        margins += [min(max(on_side(spec.side, b.centre) / 8, 0.0), 1.0) for b in blobs] or [0.0]
    return met, sum(margins) / len(margins)


def check(prompt: str, image: Image.Image) -> dict[str, bool]:
    """{kind: met} for each requirement of the prompt (see grade_scene)."""
    return grade_scene(prompt, image)[0]


def correct(prompt: str, image: Image.Image) -> bool:
    """All the prompt's requirements met."""
    return all(check(prompt, image).values())


def accuracy(prompts: list[str], images: list[Image.Image]) -> dict[str, float]:
    """Fraction of images meeting each kind of requirement (over the prompts that require it) and all of them."""
    results = [check(p, im) for p, im in zip(prompts, images)]
    out = {}
    for kind in KINDS:
        graded = [r[kind] for r in results if kind in r]
        if graded:
            out[kind] = sum(graded) / len(graded)
    out["all"] = sum(all(r.values()) for r in results) / max(len(results), 1)
    return out


def grade(prompts: list[str], images: list[Image.Image]) -> list[dict[str, float]]:
    """The trainer's --eval-fn: per image {"checker_accuracy": all requirements met, "checker_accuracy_<kind>": that
    requirement met} as 0/1, a key for each kind the prompt requires."""
    out = []
    for prompt, image in zip(prompts, images):
        met = check(prompt, image)
        out.append({"checker_accuracy": float(all(met.values())),
                    **{f"checker_accuracy_{k}": float(v) for k, v in met.items()}})
    return out


def judge(prompts: list[str], images_a: list[Image.Image], images_b: list[Image.Image]):
    """The graded pairwise toy judge, with the trainer's interface: P(a better than b) for each pair. The image that
    meets more of the prompt's requirements wins (1.0 or 0.0); between images meeting as many, the larger margin
    (grade_scene) wins; exactly equal margins are a tie, 0.5. Grading ties by the margin matters: with whole counts
    alone, often all G images of a group tie and the group teaches nothing. A group's pairs share images, so each
    distinct image is graded once. info: checker_info of the distinct images."""
    graded: dict[tuple[int, str], tuple[dict[str, bool], float]] = {}

    def key(prompt, image):
        k = (id(image), prompt)
        if k not in graded:
            graded[k] = grade_scene(prompt, image)
        met, margin = graded[k]
        return sum(met.values()), margin

    probs = []
    for prompt, a, b in zip(prompts, images_a, images_b):
        ka, kb = key(prompt, a), key(prompt, b)
        probs.append(1.0 if ka > kb else 0.0 if ka < kb else 0.5)
    return probs, checker_info(list(graded.values()))


def score(met: dict[str, bool], margin: float) -> float:
    """An image's checker score in [0, 1]: (requirements met + margin) / (requirements + 1)."""
    return (sum(met.values()) + margin) / (len(met) + 1)


def checker_info(graded: list[tuple[dict[str, bool], float]]) -> dict[str, float]:
    """What the judge and the scorer log each round: the share of the round's images meeting every requirement
    (toy_all_correct) and their mean checker score (toy_score)."""
    if not graded:
        return {}
    return {"toy_all_correct": sum(all(m.values()) for m, _ in graded) / len(graded),
            "toy_score": sum(score(m, g) for m, g in graded) / len(graded)}


def scorer(prompts: list[str], images: list[Image.Image]):
    """The pointwise twin of the judge (for --reward pointwise, the plain-GRPO baseline): each image's score(), which
    orders the images of a group as the judge does. info as the judge's."""
    graded = [grade_scene(p, im) for p, im in zip(prompts, images)]
    return [score(*g) for g in graded], checker_info(graded)


# UniGenBench offline: the toy requirements as UniGenBench sub-criteria, and the checker answering its judge requests
CRITERIA = {"colour": "Attribute - Color", "shape": "Attribute - Shape", "count": "Attribute - Quantity",
            "side": "Entity Layout - Two-Dimensional Space"}


def write_unigenbench_prompts(path: Path | str, prompts: list[str] = EVAL_PROMPTS) -> Path:
    """The prompts as a unigenbench.py prompt file (its JSON-lines record format), one checkpoint per requirement."""
    lines = []
    for index, prompt in enumerate(prompts):
        spec = parse_prompt(prompt)
        described = {"colour": spec.colour, "shape": spec.shape,
                     "count": f"{spec.count} object" + "s" * (spec.count > 1),
                     "side": SIDES.get(spec.side)}
        lines.append(json.dumps({"index": index, "prompt": prompt, "Primary Categories": "Design",
                                 "Secondary Categories": "Design Assets", "Subjects": "Other Entity",
                                 "Sentence Structure": "Descriptive", "Testpoints": [CRITERIA[k] for k in spec.kinds],
                                 "Testpoint Description": [described[k] for k in spec.kinds]}))
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def unigenbench_judge(texts: list[str], images: list[Image.Image]) -> list[str]:
    """unigenbench.py's --judge-fn: the official judge text of each image in, a reply in the official
    <analysis>[...]</analysis><score>[...]</score> format out, from the checker. The prompt and checkpoints are read
    back from the official text; a text that is not a toy-world request gets a reply without a score (a failed
    judgment)."""
    replies = []
    for text, image in zip(texts, images):
        prompt = re.search(r"<prompt>(.*?)</prompt>", text, re.DOTALL)
        names = re.search(r"<checkpoint>(.*?)</checkpoint>", text, re.DOTALL)
        try:
            met, names = check(prompt.group(1), image), ast.literal_eval(names.group(1))  # repr() of the names
            kinds = [{v: k for k, v in CRITERIA.items()}[n] for n in names]
        except (AttributeError, ValueError, KeyError, SyntaxError) as err:
            replies.append(f"not a toy-world request ({type(err).__name__}: {err})")
            continue
        analysis = [f"{k}: {'met' if met[k] else 'not met'} (pixel checker)" for k in kinds]
        replies.append(f"<analysis>{analysis!r}</analysis><score>{[int(met[k]) for k in kinds]!r}</score>")
    return replies


# ======================================================================================================================
# A tiny FLUX for the world: the real diffusers classes at toy size
# ======================================================================================================================
@dataclass(frozen=True)
class Settings:
    """Everything the pretrained model depends on; the cache folder is named after a hash of these."""
    scenes: int = 10_000       # training pictures drawn from TRAIN_PROMPTS (one random seed each)
    vae_steps: int = 400       # autoencoder optimizer steps (200: reconstruction mse 0.027, 400: 0.006)
    flux_steps: int = 4000     # rectified-flow optimizer steps of the transformer
    batch_size: int = 32       # transformer batch
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    flux_lr: float = 2e-3
    ema: float = 0.995         # the saved transformer is an exponential moving average of the trained one
    drop_prompt: float = 0.1   # share of empty prompts in pretraining, so classifier-free guidance is an option
    width: int = 128           # transformer width: heads x head dim
    seed: int = 0
    version: int = 2           # bump when the code changes what a setting means


SETTINGS = Settings()
WORDS = ["<pad>", "</s>", "<unk>", "on", "at", "the", *NUMBERS, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *SIDES]


def toy_tokenizer(max_length: int = 16):
    """Word-level tokenizer built in memory over the toy vocabulary (like pref_grpo.tiny_tokenizer): every word of the
    grammar has its own id, so the model sees "circle" and "circles" as different words, as a real tokenizer would."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    # CLIP pools its output at </s>: without it at the end the pooled text would not depend on the prompt.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length)


def build_pipeline(settings: Settings = SETTINGS):
    """A FluxPipeline with random weights: the text encoders stay random and frozen (they only have to tell the
    words apart; the transformer learns what they mean), the VAE and transformer are trained by pretrain()."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(settings.seed)
    vocab = len(WORDS)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, projection_dim=32, max_position_embeddings=16,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    # Two resolution levels: vae_scale_factor 2, so a 32 x 32 scene is a 16 x 16 x 4 latent, 64 packed tokens.
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=SIZE, use_quant_conv=False,
                        use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.0, scaling_factor=1.0)
    heads = settings.width // 32
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=32, num_attention_heads=heads, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=[8, 12, 12])
    # FLUX's own scheduler settings: the sampling shift depends on the image-token count, as for the real model.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, text_encoder_2=t5,
                        tokenizer=toy_tokenizer(), tokenizer_2=toy_tokenizer())


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1], the VAE's input range."""
    pixels = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1


def draw_dataset(settings: Settings) -> tuple[list[str], torch.Tensor]:
    """settings.scenes (prompt, picture) pairs: uniform over TRAIN_PROMPTS, every picture from its own seed."""
    rng = np.random.default_rng(settings.seed)
    prompts = [TRAIN_PROMPTS[i] for i in rng.integers(0, len(TRAIN_PROMPTS), settings.scenes)]
    return prompts, to_tensor([draw_scene(p, int(s)) for p, s in zip(prompts, rng.integers(0, 2**31, settings.scenes))])


def bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(range(total), desc=desc, disable=not progress, leave=False)


def train_vae(vae, pixels: torch.Tensor, settings: Settings, progress: bool) -> float:
    """Plain autoencoder training (reconstruction + a tiny KL so the latent stays Gaussian-ish). Then the latents are
    normalised to zero mean and unit variance through the config's shift/scaling factors, which pref_grpo.decode and
    FluxPipeline undo, so the flow model sees noise-sized latents. Returns the final reconstruction MSE."""
    gen = torch.Generator().manual_seed(settings.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    vae.train()
    loss = torch.zeros(())
    for step in bar(settings.vae_steps, "toy-world VAE", progress):
        x = pixels[torch.randint(0, len(pixels), (settings.vae_batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        loss = torch.nn.functional.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        opt.zero_grad()
        (loss + 1e-4 * kl).backward()
        for group in opt.param_groups:  # linear decay to 0: the last steps polish the edges
            group["lr"] = settings.vae_lr * (1 - step / settings.vae_steps)
        opt.step()
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x).latent_dist.mean for x in pixels[:2048].split(256)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    return loss.item()


@torch.no_grad()
def encode_latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """Scenes -> normalised, packed FLUX latents (N, 64 tokens, 16): the layout pref_grpo samples in."""
    cfg, out = pipe.vae.config, []
    for x in pixels.split(256):
        z = (pipe.vae.encode(x).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor
        out.append(pipe._pack_latents(z, *z.shape))
    return torch.cat(out)


def train_flux(pipe, prompts: list[str], latents: torch.Tensor, settings: Settings, progress: bool) -> float:
    """Rectified flow, as FLUX is trained: x_t = (1 - t) x0 + t noise, the transformer regresses v = noise - x0 at
    timestep t (pref_grpo.velocity and sde_step use exactly this convention). t is logit-normal, which puts most
    training where the sampler spends its steps (mid noise) rather than at the trivial ends. The text encoders are
    frozen, so each distinct prompt (and the empty one) is encoded once. Returns the final loss (an average)."""
    gen = torch.Generator().manual_seed(settings.seed + 2)
    names = sorted(set(prompts)) + [""]
    cond = pref_grpo.encode_prompts(pipe, names)
    index = torch.tensor([names.index(p) for p in prompts])
    _, img_ids = pref_grpo.latent_geometry(pipe, SIZE)
    transformer = pipe.transformer.requires_grad_(True).train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=settings.flux_lr, weight_decay=1e-4)
    warmup, recent = max(1, settings.flux_steps // 20), []
    # A short run ends on a noisy iterate; an exponential moving average of the weights samples much cleaner shapes.
    ema = [p.detach().clone() for p in transformer.parameters()]
    for step in (progress_bar := bar(settings.flux_steps, "toy-world FLUX", progress)):
        rows = torch.randint(0, len(latents), (settings.batch_size,), generator=gen)
        x0, which = latents[rows], index[rows].clone()
        which[torch.rand(len(rows), generator=gen) < settings.drop_prompt] = len(names) - 1  # the empty prompt
        t = torch.sigmoid(torch.randn(len(rows), generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = transformer(hidden_states=xt, timestep=t, pooled_projections=cond["pooled"][which],
                        encoder_hidden_states=cond["embeds"][which], txt_ids=cond["text_ids"], img_ids=img_ids,
                        return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        # Warm up, then cosine to 10%: a tiny model at a large constant lr ends on a noisy iterate.
        frac = (step - warmup) / max(1, settings.flux_steps - warmup)
        lr = step / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = settings.flux_lr * lr
        opt.step()
        with torch.no_grad():
            decay = min(settings.ema, (1 + step) / (10 + step))  # short memory at first: the start is random
            for e, p in zip(ema, transformer.parameters()):
                e.lerp_(p, 1 - decay)
        recent = (recent + [loss.item()])[-50:]
        if step % 20 == 0:
            progress_bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    with torch.no_grad():
        for e, p in zip(ema, transformer.parameters()):
            p.copy_(e)
    transformer.requires_grad_(False).eval()
    return sum(recent) / max(len(recent), 1)


def pretrain(settings: Settings = SETTINGS, progress: bool = True):
    """Draw the scenes, train the VAE, then the transformer. Returns (pipeline, summary dict)."""
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()
    pipe = build_pipeline(settings)
    for module in (pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False).eval()
    prompts, pixels = draw_dataset(settings)
    vae_mse = train_vae(pipe.vae, pixels, settings, progress)
    pipe.vae.requires_grad_(False)
    t1 = time.perf_counter()
    flux_loss = train_flux(pipe, prompts, encode_latents(pipe, pixels), settings, progress)
    summary = {"vae_mse": round(vae_mse, 5), "flux_loss": round(flux_loss, 4),
               "vae_seconds": round(t1 - t0, 1), "flux_seconds": round(time.perf_counter() - t1, 1),
               "transformer_params": sum(p.numel() for p in pipe.transformer.parameters())}
    return pipe, summary


# ======================================================================================================================
# The cache: pretrain once, then load through pref_grpo.load_pipeline like any FLUX folder
# ======================================================================================================================
MANIFEST = "toy_world.json"


def cache_root() -> Path:
    if os.environ.get("PREF_GRPO_CACHE"):
        return Path(os.environ["PREF_GRPO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pref_grpo"


def settings_hash(settings: Settings) -> str:
    blob = json.dumps({"settings": dataclasses.asdict(settings), "train": TRAIN_PROMPTS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_folder(settings: Settings = SETTINGS) -> Path:
    return cache_root() / f"toy-world-{settings_hash(settings)}"


def _file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def verify(folder: Path) -> None:
    """Refuse a damaged cache with one line: the manifest written last lists every file with its sha256."""
    def refuse(why: str):
        raise SystemExit(f"error: the cached toy-world model {folder} is damaged ({why}); delete that folder and "
                         f"run again to retrain it")

    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        expected = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        refuse(f"{MANIFEST} missing or unreadable")
    found = _file_digests(folder)
    for name, digest in expected.items():
        if name not in found:
            refuse(f"{name} is missing")
        if found[name] != digest:
            refuse(f"{name} does not match its checksum")


def check_round_trip(pipe, folder: Path) -> None:
    """The saved folder must load through the trainer's loader and give the same tokens and text features."""
    loaded = pref_grpo.load_pipeline(str(folder), "cpu")
    probe = ["two green bars at the bottom", "a yellow square", ""]
    for name in ("tokenizer", "tokenizer_2"):
        a, b = getattr(pipe, name), getattr(loaded, name)
        if a(probe)["input_ids"] != b(probe)["input_ids"] or a.model_max_length != b.model_max_length:
            raise RuntimeError(f"{name} does not round-trip through save_pretrained/from_pretrained")
    before, after = pref_grpo.encode_prompts(pipe, probe), pref_grpo.encode_prompts(loaded, probe)
    if not all(torch.allclose(before[k], after[k]) for k in ("embeds", "pooled")):
        raise RuntimeError("text features differ after save_pretrained/from_pretrained")


def pretrained_model(progress: bool = True, settings: Settings = SETTINGS) -> Path:
    """The folder of the pretrained toy FLUX; pretrains it first on a cache miss (20 minutes measured with the default
    settings on 2 CPU cores shared with another test run). Written to a temporary folder and renamed, so an
    interrupted run leaves no half model behind. Load it with pref_grpo.load_pipeline(str(folder))."""
    folder = model_folder(settings)
    if folder.exists():
        verify(folder)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    pipe, summary = pretrain(settings, progress)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp)
        check_round_trip(pipe, tmp)
        manifest = {"settings": dataclasses.asdict(settings), "summary": summary, "files": _file_digests(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: keep its copy
            if not folder.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"toy world: pretrained in {summary['vae_seconds'] + summary['flux_seconds']:.0f} s (VAE "
              f"{summary['vae_seconds']:.0f} s, mse {summary['vae_mse']:.4f}; FLUX {summary['flux_seconds']:.0f} s, "
              f"{summary['transformer_params'] / 1e6:.2f}M params, loss {summary['flux_loss']:.3f}) -> {folder}")
    return folder


# ======================================================================================================================
# Evaluation and the RL demo's settings
# ======================================================================================================================
# The RL demo on this world, a preset of pref_grpo (`python pref_grpo.py` with no --model runs --preset toy_world:DEMO):
# the world's model, prompts, judge, scorer and checker by name, and the RL values measured to learn
# (docs/toy_world.md).
DEMO = dict(model="toy_world:pretrained_model", prompts="toy_world:TRAIN_PROMPTS",
            eval_prompts="toy_world:EVAL_PROMPTS",
            judge_fn="toy_world:judge", scorer_fn="toy_world:scorer", eval_fn="toy_world:grade",
            resolution=32, sample_steps=8, shift=None, max_sequence_length=16,
            group_size=8, prompts_per_step=4, lora_rank=16, lora_alpha=32.0, lr=3e-4, accum=8,
            # SDE noise on 2 consecutive steps only, strong, every transition of them trained: the reward's differences
            # are credited to few random draws (with SDE on every step, eta 0.3, nothing was learnt)
            sde_window=2, eta=0.7, train_fraction=1.0,
            # Flow-GRPO's KL to the base model (its value, 0.04): over 3 seeds it turned gains of +7, +0, +10 points
            # into +10, +10, +7 (docs/toy_world.md), holding the policy near the pretrained one between eval checks
            kl_beta=0.04,
            train_steps=480, save_every=80, sample_every=40, eval_every=120,
            eval_count=len(EVAL_PROMPTS), eval_seeds=18)  # 14 held-out prompts x 18 seeds = 252 images


def evaluate(pipe, prompts: list[str] = EVAL_PROMPTS, seeds: int = 8, steps: int | None = None,
             cfg_scale: float | None = None, first_seed: int = 10**6) -> dict[str, float]:
    """Accuracy of the deterministic sampler on prompts x `seeds` seeds that no training run draws (default sampling:
    the demo's steps and classifier-free guidance)."""
    ps = [p for p in prompts for _ in range(seeds)]
    images = pref_grpo.generate_images(pipe, ps, [first_seed + k % seeds for k in range(len(ps))],
                                       steps=steps or DEMO["sample_steps"], resolution=SIZE, batch_size=64,
                                       cfg_scale=cfg_scale or DEMO.get("cfg_scale", 1.0))
    return accuracy(ps, images)


def main() -> None:
    folder = pretrained_model()
    pipe = pref_grpo.load_pipeline(str(folder), "cpu")
    for name, prompts in (("eval", EVAL_PROMPTS), ("train", TRAIN_PROMPTS)):
        acc = evaluate(pipe, prompts, seeds=8 if name == "eval" else 2)
        print(f"{name} prompts: " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
