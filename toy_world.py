"""A toy world small enough to watch Pref-GRPO learn on a laptop CPU: 32 x 32 scenes of coloured shapes, prompts whose
requirements are known exactly, a pixel checker that grades an image against its prompt, a pairwise judge built on
that checker, and a tiny FLUX pretrained on the world once (minutes on 2 CPU cores) and cached on disk.

The world:  circles, squares and upright triangles in red, green, blue or yellow on a white background. Prompts:
  "a red circle"                      requires colour, shape, count (exactly one object)
  "a blue square on the left"         ... and side (the object's centre in the named half)
  "two yellow triangles"              colour, shape, count (exactly two)
  "a red circle and a green square"   colour, shape (bound to its colour), count
TRAIN_PROMPTS and EVAL_PROMPTS are disjoint; the model is pretrained and RL-trained on TRAIN_PROMPTS only, so
EVAL_PROMPTS measure whether what it learnt carries over to new combinations of the same words.

Usage:
  python toy_world.py                  # pretrain (first time only, then cached) and grade the model on EVAL_PROMPTS

  import pref_grpo, toy_world
  folder = toy_world.pretrained_model()               # a FluxPipeline folder; trains on a cache miss
  pipe = pref_grpo.load_pipeline(str(folder))         # the same loading code as a real FLUX
  images = pref_grpo.generate_images(pipe, prompts, seeds, steps=toy_world.DEMO["sample_steps"], resolution=32)
  toy_world.accuracy(prompts, images)                 # {"colour": 0.95, "shape": 0.5, ..., "all": 0.22}
  pref_grpo.train(args, judge=toy_world.judge)        # the RL demo, with the flags in toy_world.DEMO

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
BACKGROUND = (255, 255, 255)
# Saturated and far apart in RGB, so the nearest palette colour of a slightly blurry generated pixel is unambiguous.
COLOURS = {"red": (255, 0, 0), "green": (0, 204, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ["circle", "square", "triangle"]
SIDES = ["left", "right"]
NUMBERS = {"two": 2}  # "three" was dropped: at 32 px three shapes are too cramped to learn in minutes
KINDS = ["colour", "shape", "count", "side"]


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: one (colour, shape) per object, and the side they must be on (or None)."""
    objects: tuple[tuple[str, str], ...]
    side: str | None = None

    @property
    def kinds(self) -> list[str]:
        return ["colour", "shape", "count"] + (["side"] if self.side else [])


def prompt_text(spec: Spec) -> str:
    """The one English sentence for a spec (the inverse of parse_prompt)."""
    (c, s), n = spec.objects[0], len(spec.objects)
    if n == 2 and spec.objects[1] != spec.objects[0]:
        return f"a {c} {s} and a {spec.objects[1][0]} {spec.objects[1][1]}"
    if n > 1:
        return f"{next(w for w, k in NUMBERS.items() if k == n)} {c} {s}s"
    return f"a {c} {s}" + (f" on the {spec.side}" if spec.side else "")


_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_GRAMMAR = [  # (pattern, how its groups become a Spec)
    (rf"a ({_C}) ({_S}) on the (left|right)", lambda g: Spec(((g[0], g[1]),), g[2])),
    (rf"a ({_C}) ({_S}) and a ({_C}) ({_S})", lambda g: Spec(((g[0], g[1]), (g[2], g[3])))),
    (rf"({'|'.join(NUMBERS)}) ({_C}) ({_S})s", lambda g: Spec(((g[1], g[2]),) * NUMBERS[g[0]])),
    (rf"a ({_C}) ({_S})", lambda g: Spec(((g[0], g[1]),))),
]


def parse_prompt(prompt: str) -> Spec:
    """Any sentence of the toy grammar -> its Spec (so prompts read from a file are graded too)."""
    text = " ".join(prompt.lower().split())
    for pattern, build in _GRAMMAR:
        m = re.fullmatch(pattern, text)
        if m:
            return build(m.groups())
    raise ValueError(f"not a toy-world prompt: {prompt!r}")


def all_prompts() -> list[str]:
    """Every prompt of the grammar, in a fixed order: 12 single, 24 sided, 12 counted, 36 two-colour pairs."""
    single = [Spec(((c, s),)) for c in COLOURS for s in SHAPES]
    sided = [Spec(((c, s),), side) for c in COLOURS for s in SHAPES for side in SIDES]
    counted = [Spec(((c, s),) * n) for n in NUMBERS.values() for c in COLOURS for s in SHAPES]
    names = list(COLOURS)  # one word order per pair (colours in palette order): 36 pairs, not 72
    pairs = [Spec(((c1, s1), (c2, s2))) for c1 in COLOURS for s1 in SHAPES for c2 in COLOURS for s2 in SHAPES
             if names.index(c1) < names.index(c2) and s1 != s2]
    return [prompt_text(s) for s in single + sided + counted + pairs]


def split_prompts(eval_every: int = 5, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold out one prompt in `eval_every` of each template (seeded shuffle), so the eval set covers every kind of
    requirement while each held-out prompt is a new combination of words the training prompts all use."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    templates: dict[str, list[str]] = {}
    for p in all_prompts():
        spec = parse_prompt(p)
        key = "sided" if spec.side else "pair" if len(set(spec.objects)) > 1 else str(len(spec.objects))
        templates.setdefault(key, []).append(p)
    for key, ps in templates.items():
        order = rng.permutation(len(ps))
        held += [ps[i] for i in sorted(order[:max(1, len(ps) // eval_every)])]
        train += [ps[i] for i in sorted(order[max(1, len(ps) // eval_every):])]
    return train, held


TRAIN_PROMPTS, EVAL_PROMPTS = split_prompts()


# ======================================================================================================================
# Drawing a scene
# ======================================================================================================================
def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, x0: int, y0: int, size: int) -> None:
    """One filled, axis-aligned shape in the box [x0, x0 + size) x [y0, y0 + size); triangles point up."""
    box = (x0, y0, x0 + size - 1, y0 + size - 1)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1), (x0 + (size - 1) / 2, y0)], fill=fill)


def place_boxes(rng: np.random.Generator, n: int, side: str | None) -> list[tuple[int, int, int]]:
    """n non-overlapping boxes (x0, y0, size) with a 2-pixel gap, so touching shapes never merge into one blob.
    A sided box lies wholly in its half, with a margin from the middle so the side is never a judgement call."""
    lo, hi = (11, 13) if n > 1 else (12, 14) if side else (14, 18)  # big enough to show their shape
    for _ in range(1000):
        boxes = []
        for _ in range(n):
            size = int(rng.integers(lo, hi + 1))
            x_min, x_max = 1, SIZE - 1 - size
            if side == "left":
                x_max = SIZE // 2 - 1 - size
            elif side == "right":
                x_min = SIZE // 2 + 1
            box = (int(rng.integers(x_min, x_max + 1)), int(rng.integers(1, SIZE - size)), size)
            if all(_gap(box, b) >= 2 for b in boxes):
                boxes.append(box)
            else:
                break
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} shapes")  # unreachable at these sizes


def _gap(a, b) -> int:
    """Empty pixels between two boxes (the larger of the horizontal and vertical gaps; negative if they overlap)."""
    (ax, ay, asz), (bx, by, bsz) = a, b
    return max(bx - (ax + asz), ax - (bx + bsz), by - (ay + asz), ay - (by + bsz))


def draw_scene(prompt: str, seed: int) -> Image.Image:
    """A correct 32 x 32 picture of the prompt; the seed picks sizes and positions (and the order of the objects)."""
    spec, rng = parse_prompt(prompt), np.random.default_rng(seed)
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    objects = [spec.objects[i] for i in rng.permutation(len(spec.objects))]
    for (colour, shape), (x0, y0, size) in zip(objects, place_boxes(rng, len(objects), spec.side)):
        draw_shape(draw, shape, colour, x0, y0, size)
    return image


# ======================================================================================================================
# The pixel checker
# ======================================================================================================================
PALETTE_NAMES = ["background", *COLOURS]
PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
MIN_BLOB = 8  # pixels: smaller specks are sampling noise, not objects (the smallest drawn shape covers ~40)


@dataclass
class Blob:
    colour: str
    shape: str
    centre_x: float
    area: int


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


def blob_shape(mask: np.ndarray) -> str:
    """Shape from the outline, two numbers that separate the three shapes whatever their size:
    - fill ratio, area / bounding-box area: a square fills its box (1.0), a circle pi/4 (0.79), a triangle 1/2;
    - how low the mass sits in the box, (centroid row - top) / height: 1/2 for a circle or square, 2/3 for an
      upright triangle (whose mass is near its base). A blurry triangle can fill its box like a circle, but it
      cannot move its centroid up."""
    ys, xs = np.nonzero(mask)
    top, height, width = ys.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(ys) / (height * width)
    low = (ys.mean() - top + 0.5) / height
    if low > 0.59:
        return "triangle"
    return "square" if fill > 0.9 else "circle"


def find_blobs(image: Image.Image) -> list[Blob]:
    """The objects in an image: connected single-colour regions bigger than a speck."""
    return [Blob(PALETTE_NAMES[c], blob_shape(m), float(np.nonzero(m)[1].mean()), int(m.sum()))
            for c, m in connected_blobs(palette_labels(image)) if m.sum() >= MIN_BLOB]


def check(prompt: str, image: Image.Image) -> dict[str, bool]:
    """Grade an image against each requirement of its prompt, {kind: met}:
    - colour: the objects' colours are exactly the named ones (no other colour, none missing);
    - shape:  the objects' shapes are exactly the named ones, and with two colours each colour has its own shape;
    - count:  as many objects as the prompt names ("a" is one, "and" two);
    - side:   (only when named) every object's centre lies in that half.
    Each kind is judged on its own, so "two red circles" drawn as one red circle fails count only."""
    spec, blobs = parse_prompt(prompt), find_blobs(image)
    want_colours, want_shapes = {c for c, _ in spec.objects}, {s for _, s in spec.objects}
    bound = dict(spec.objects) if len(want_colours) > 1 else {}  # colour -> its shape, for two-colour prompts
    result = {
        "colour": {b.colour for b in blobs} == want_colours,
        "shape": {b.shape for b in blobs} == want_shapes and all(b.shape == bound[b.colour] for b in blobs
                                                                 if b.colour in bound),
        "count": len(blobs) == len(spec.objects),
    }
    if spec.side:
        middle = (SIZE - 1) / 2
        result["side"] = bool(blobs) and all((b.centre_x < middle) == (spec.side == "left") for b in blobs)
    return result


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


def judge(prompts: list[str], images_a: list[Image.Image], images_b: list[Image.Image]):
    """The pairwise toy judge, with the trainer's interface: P(a better than b) for each pair, 1.0, 0.0 or 0.5 (a
    tie), from the number of the prompt's requirements each image meets. A group's pairs share images, so each
    distinct image is checked once. info: the fraction of the distinct images that meet every requirement."""
    met: dict[tuple[int, str], dict[str, bool]] = {}

    def graded(prompt, image):
        key = (id(image), prompt)
        if key not in met:
            met[key] = check(prompt, image)
        return met[key]

    probs = []
    for prompt, a, b in zip(prompts, images_a, images_b):
        sa, sb = sum(graded(prompt, a).values()), sum(graded(prompt, b).values())
        probs.append(1.0 if sa > sb else 0.0 if sa < sb else 0.5)
    info = {"toy_all_correct": sum(all(r.values()) for r in met.values()) / len(met)} if met else {}
    return probs, info


def scorer(prompts: list[str], images: list[Image.Image]):
    """The pointwise twin of the judge (for --reward pointwise, the plain-GRPO baseline): each image's score is the
    share of its prompt's requirements it meets, in [0, 1]. info: the fraction meeting every requirement."""
    results = [check(p, im) for p, im in zip(prompts, images)]
    scores = [sum(r.values()) / len(r) for r in results]
    return scores, ({"toy_all_correct": sum(all(r.values()) for r in results) / len(results)} if results else {})


# UniGenBench offline: the toy requirements as UniGenBench sub-criteria, and the checker answering its judge requests
CRITERIA = {"colour": "Attribute - Color", "shape": "Attribute - Shape", "count": "Attribute - Quantity",
            "side": "Entity Layout - Two-Dimensional Space"}


def write_unigenbench_prompts(path: Path | str, prompts: list[str] = EVAL_PROMPTS) -> Path:
    """The prompts as a unigenbench.py prompt file (its JSON-lines record format), one checkpoint per requirement."""
    lines = []
    for index, prompt in enumerate(prompts):
        spec = parse_prompt(prompt)
        described = {"colour": " and ".join(dict.fromkeys(c for c, _ in spec.objects)),
                     "shape": " and ".join(dict.fromkeys(s for _, s in spec.objects)),
                     "count": f"{len(spec.objects)} object" + "s" * (len(spec.objects) > 1),
                     "side": f"on the {spec.side}"}
        lines.append(json.dumps({"index": index, "prompt": prompt, "Primary Categories": "Design",
                                 "Secondary Categories": "Design Assets", "Subjects": "Other Entity",
                                 "Sentence Structure": "Descriptive", "Testpoints": [CRITERIA[k] for k in spec.kinds],
                                 "Testpoint Description": [described[k] for k in spec.kinds]}))
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def unigenbench_judge(requests):
    """unigenbench.py's judge interface, [(judge text, image)] -> [(reply, error, retriable)], answered by the checker
    in the official reply format. The prompt and checkpoints are read back from the official judge text."""
    out = []
    for text, image in requests:
        prompt = re.search(r"<prompt>(.*?)</prompt>", text, re.DOTALL)
        names = re.search(r"<checkpoint>(.*?)</checkpoint>", text, re.DOTALL)
        try:
            met, names = check(prompt.group(1), image), ast.literal_eval(names.group(1))  # repr() of the names
            kinds = [{v: k for k, v in CRITERIA.items()}[n] for n in names]
        except (AttributeError, ValueError, KeyError, SyntaxError) as err:
            out.append((None, f"not a toy-world request ({type(err).__name__}: {err})", False))
            continue
        analysis = [f"{k}: {'met' if met[k] else 'not met'} (pixel checker)" for k in kinds]
        out.append((f"<analysis>{analysis!r}</analysis><score>{[int(met[k]) for k in kinds]!r}</score>", None, True))
    return out


unigenbench_judge.where = "--judge-local toy (the toy world's pixel checker)"


# ======================================================================================================================
# A tiny FLUX for the world: the real diffusers classes at toy size
# ======================================================================================================================
@dataclass(frozen=True)
class Settings:
    """Everything the pretrained model depends on; the cache folder is named after a hash of these."""
    scenes: int = 10_000       # training pictures drawn from TRAIN_PROMPTS (one random seed each)
    vae_steps: int = 200       # autoencoder optimizer steps
    flux_steps: int = 2000     # rectified-flow optimizer steps of the transformer
    batch_size: int = 32       # transformer batch
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    flux_lr: float = 2e-3
    ema: float = 0.995         # the saved transformer is an exponential moving average of the trained one
    drop_prompt: float = 0.1   # share of empty prompts in pretraining, so classifier-free guidance is an option
    width: int = 128           # transformer width: heads x head dim
    seed: int = 0
    version: int = 1           # bump when the code changes what a setting means


SETTINGS = Settings()
WORDS = ["<pad>", "</s>", "<unk>", "a", "and", "on", "the", *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *SIDES,
         *NUMBERS]


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
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1


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
    probe = ["a red circle and a green square", "two yellow triangles", ""]
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
# the world's model, prompts, judge and checker by name, and the RL values.
DEMO = dict(model="toy_world:pretrained_model", prompts="toy_world:TRAIN_PROMPTS", eval_prompts="toy_world:EVAL_PROMPTS",
            judge_fn="toy_world:judge", scorer_fn="toy_world:scorer", eval_fn="toy_world:grade", resolution=32,
            sample_steps=8, shift=None, group_size=8, prompts_per_step=4, lr=3e-4, accum=8, lora_rank=16,
            lora_alpha=32.0, max_sequence_length=16, train_steps=120, save_every=40, sample_every=20, eval_every=40,
            eval_seeds=4, eval_count=15, eta=0.3)


def grade(prompts: list[str], images: list[Image.Image]) -> list[dict[str, float]]:
    """pref_grpo's --eval-fn: per image, all requirements met (checker_accuracy) and each kind its prompt requires."""
    return [{"checker_accuracy": float(all(r.values())), **{f"checker_accuracy_{k}": float(v) for k, v in r.items()}}
            for r in (check(p, im) for p, im in zip(prompts, images))]


def demo_argv(model: Path | str, prompts_file: Path | str, **overrides) -> list[str]:
    """pref_grpo command-line flags for the demo (DEMO, overridden by keyword), ready for pref_grpo.parse_args."""
    argv = ["--model", str(model), "--prompts", str(prompts_file)]
    for name, value in {**DEMO, **overrides}.items():
        flag = "--" + name.replace("_", "-")
        argv += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return argv


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
