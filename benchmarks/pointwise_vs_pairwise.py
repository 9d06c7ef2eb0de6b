"""Pointwise vs pairwise reward on the tiny offline model: a miniature of Pref-GRPO's "illusory advantage" experiment.

    python benchmarks/pointwise_vs_pairwise.py   # 2 rewards x 3 seeds x 120 steps, 2 processes: minutes on 2 CPU cores

writes docs/pointwise_vs_pairwise.png (curves over steps + held-out samples), and under runs/pointwise_vs_pairwise/
one run directory per (reward, seed) (metrics.jsonl, sample grids, eval/) and summary.json. Quick look:

    python benchmarks/pointwise_vs_pairwise.py --seeds 1 --steps 20 --out runs/pvp-quick --plot runs/pvp-quick/plot.png
    python benchmarks/pointwise_vs_pairwise.py --plot-only   # redraw the plot and summary.json from finished runs

The toy (the README section "Pointwise vs pairwise" says it at length; a toy, not evidence about real reward models):
  * one judge opinion per image:  q = closeness to the prompt's colour + FLAW_WEIGHT * flaw(image),
    closeness = 1 - colour_distance / sqrt(3) in [0, 1]; the flaw (`--flaw`) is brightness (mean luminance, the
    default: the analogue of over-saturated images that score well) or contrast (pixel std).
  * pointwise scorer (`--reward pointwise`): sees one image alone and reports q with measurement noise (std
    POINT_NOISE, in units of q), squeezed into the narrow band SCORE_BAND, as MLLM scorers give near-identical
    scores to a group.
  * pairwise judge (the default reward): sees two images side by side and says which is better, from the same opinion
    q with the same flaw weight, but less noise (std PAIR_NOISE per image, fresh for every pair). Assumption: a
    relative judgment is less noisy than an absolute one.
  * ground truth, which neither judge sees: the colour distance (`pref_grpo.colour_distance`), and the flaw
    feature staying near its starting level.
The policy is the trainer's `--model tiny` (a random tiny FLUX) with its `demo` preset, at 16 px.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pref_grpo.py lives in the repo root

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageDraw

FLAW = "brightness"
"""what the judges like besides the right colour: `brightness` (mean luminance) or `contrast` (pixel std)"""
FLAW_WEIGHT = 1.0
"""how much the judges' opinion likes the flaw, the same for the pointwise scorer and the pairwise judge"""
POINT_NOISE = 0.01
"""std of the pointwise scorer's measurement noise, in units of the opinion q (about a group's spread of q)"""
PAIR_NOISE = 0.005
"""std of the pairwise judge's noise on each image's perceived opinion, drawn afresh for every compared pair"""
SCORE_BAND = (0.25, 0.35)
"""the pointwise scores' range (q from 0 to its largest possible value is mapped linearly onto it)"""

REWARDS = ("pairwise", "pointwise")
COLOURS = {"pairwise": (31, 119, 180), "pointwise": (230, 97, 1)}


# ======================================================================================================================
# The toy judges
# ======================================================================================================================
def closeness(prompt: str, image: Image.Image) -> float:
    """1 - colour distance / sqrt(3): 1 when the mean colour is the prompt's colour, 0 at the opposite corner."""
    import pref_grpo as pg

    return 1 - pg.colour_distance(prompt, image) / math.sqrt(3)


def contrast(image: Image.Image) -> float:
    """Pixel contrast: the std of the pixel values over the image, averaged over R, G, B (in [0, 0.5])."""
    return float((np.asarray(image.convert("RGB"), dtype=np.float64) / 255).std(axis=(0, 1)).mean())


def brightness(image: Image.Image) -> float:
    """Mean luminance (ITU-R BT.601 weights) in [0, 1]; a pure red image has 0.299, a pure yellow one 0.886."""
    return float((np.asarray(image.convert("RGB"), dtype=np.float64) / 255 @ np.array([0.299, 0.587, 0.114])).mean())


FLAWS = {"brightness": (brightness, 1.0), "contrast": (contrast, 0.5)}  # name: (feature, its largest value)


def opinion(prompt: str, image: Image.Image, flaw_weight: float = FLAW_WEIGHT, flaw: str = FLAW) -> float:
    """The judges' underlying opinion of one image: the right colour, plus the flaw (they also like `flaw`)."""
    return closeness(prompt, image) + flaw_weight * FLAWS[flaw][0](image)


def image_noise(prompt: str, image: Image.Image) -> float:
    """A standard normal draw fixed by the image's pixels and prompt: a scorer at temperature 0 gives the same image
    the same score every time, yet its error looks random from one image to the next."""
    digest = hashlib.blake2b(prompt.encode() + image.tobytes(), digest_size=8).digest()
    return float(np.random.default_rng(int.from_bytes(digest, "little")).standard_normal())


def image_stats(prompts, images, flaw_weight: float, flaw: str) -> dict:
    """What the judge saw, averaged over the distinct images of a call; lands in metrics.jsonl through the info dict."""
    seen = {}
    for p, im in zip(prompts, images):
        seen.setdefault(id(im), (p, im))
    import pref_grpo as pg

    q = [opinion(p, im, flaw_weight, flaw) for p, im in seen.values()]
    f = [FLAWS[flaw][0](im) for _, im in seen.values()]
    d = [pg.colour_distance(p, im) for p, im in seen.values()]
    return {"toy_opinion": float(np.mean(q)), "toy_flaw": float(np.mean(f)), "colour_distance": float(np.mean(d))}


def against_opinion(reward_gap: float, opinion_gap: float) -> float:
    """1 if a reward orders two images against the judge's own noise-free opinion, 0 if with it, 0.5 on a tie."""
    product = reward_gap * opinion_gap
    return 0.5 if product == 0 else float(product < 0)


def make_pointwise_scorer(flaw_weight: float = FLAW_WEIGHT, noise: float = POINT_NOISE, band=SCORE_BAND,
                          flaw: str = FLAW, group_size: int | None = None):
    """(prompts, images) -> (scores, info): each image judged alone, score = band(q + noise), in the narrow band.
    Given the trainer's group size, info also has `toy_flipped`: the share of a group's pairs that the scores order
    against the noise-free opinion, i.e. how much of the z-scored advantage is noise."""
    lo, hi = band
    top = 1 + flaw_weight * FLAWS[flaw][1]  # the largest opinion an image can get

    def scorer(prompts, images):
        q = [opinion(p, im, flaw_weight, flaw) for p, im in zip(prompts, images)]
        scores = [min(hi, max(lo, lo + (hi - lo) * (x + noise * image_noise(p, im)) / top))
                  for x, p, im in zip(q, prompts, images)]
        info = image_stats(prompts, images, flaw_weight, flaw)
        if group_size:
            pairs = [(g + i, g + j) for g in range(0, len(q), group_size) for i in range(group_size)
                     for j in range(i + 1, group_size)]
            flipped = [against_opinion(scores[i] - scores[j], q[i] - q[j]) for i, j in pairs]
            info["toy_flipped"] = float(np.mean(flipped))
        return scores, info

    scorer.flaw, scorer.flaw_weight, scorer.noise, scorer.band = flaw, flaw_weight, noise, band
    return scorer


def comparison_noise(prompt: str, a: Image.Image, b: Image.Image) -> tuple[float, float]:
    """Two standard normal draws, one per image, fixed by the pair (in either order): each comparison the judge makes
    misperceives both images afresh, and asking again about the same pair, A/B swapped, gives the same answer.
    An image compared with an identical copy is a tie."""
    first, second = sorted([a.tobytes(), b.tobytes()])
    if first == second:
        return 0.0, 0.0
    digest = hashlib.blake2b(prompt.encode() + first + second, digest_size=8).digest()
    e1, e2 = np.random.default_rng(int.from_bytes(digest, "little")).standard_normal(2)
    return (float(e1), float(e2)) if a.tobytes() == first else (float(e2), float(e1))


def make_pairwise_judge(flaw_weight: float = FLAW_WEIGHT, noise: float = PAIR_NOISE, flaw: str = FLAW):
    """(prompts, images_a, images_b) -> (1 / 0 / 0.5 per pair, info): a hard verdict, A beats B when the judge's
    perceived opinion of A is higher; each image is perceived as q + noise * N(0, 1), drawn afresh for every pair.
    info's `toy_flipped`: the share of verdicts against the noise-free opinion."""

    def judge(prompts, images_a, images_b):
        probs, flipped = [], []
        for p, a, b in zip(prompts, images_a, images_b):
            ea, eb = comparison_noise(p, a, b)
            q_gap = opinion(p, a, flaw_weight, flaw) - opinion(p, b, flaw_weight, flaw)
            perceived_gap = q_gap + noise * (ea - eb)
            probs.append(0.5 if perceived_gap == 0 else float(perceived_gap > 0))
            flipped.append(against_opinion(probs[-1] - 0.5, q_gap))
        info = image_stats(list(prompts) * 2, list(images_a) + list(images_b), flaw_weight, flaw)
        return probs, {**info, "toy_flipped": float(np.mean(flipped)) if flipped else 0.0}

    judge.flaw, judge.flaw_weight, judge.noise = flaw, flaw_weight, noise
    return judge


# ======================================================================================================================
# Runs
# ======================================================================================================================
def one_thread() -> None:
    """Worker start-up: one torch thread per run (more oversubscribes the cores), no progress bars in the logs."""
    os.environ["OMP_NUM_THREADS"], os.environ["TQDM_DISABLE"] = "1", "1"
    import torch

    torch.set_num_threads(1)


def run_one(task: dict) -> dict:
    """One training run: `pref_grpo.train` with this script's judge for its reward; its output goes to log.txt."""
    import pref_grpo as pg

    run_dir = Path(task["dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # train() appends to metrics.jsonl: start clean
    run_dir.mkdir(parents=True)
    args = pg.parse_args(["--model", "tiny", "--reward", task["reward"], "--seed", str(task["seed"]),
                          "--output-dir", str(run_dir),
                          "--train-steps", str(task["steps"]), "--resolution", str(task["resolution"]),
                          "--sample-every", str(task["steps"]), "--save-every", str(task["steps"]), "--device", "cpu"])
    judge = (make_pairwise_judge(task["flaw_weight"], task["pair_noise"], task["flaw"]) if task["reward"] == "pairwise"
             else make_pointwise_scorer(task["flaw_weight"], task["point_noise"], flaw=task["flaw"],
                                        group_size=args.group_size))
    with open(run_dir / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        pg.train(args, judge=judge)
    return collect(task)


def collect(task: dict) -> dict:
    """A finished run's held-out results (eval/eval.json), plus the held-out images' flaw feature (the second check)."""
    run_dir = Path(task["dir"])
    if not (run_dir / "eval" / "eval.json").is_file():
        raise SystemExit(f"error: {run_dir} has no finished run (eval/eval.json)")
    import pref_grpo as pg

    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    args = json.loads((run_dir / "args.json").read_text())  # the held-out images: eval prompts x eval seeds, in order
    prompts = [p for p in pg.TINY_PROMPTS[:args["eval_count"]] for _ in range(args["eval_seeds"])]
    for which, when in (("before", "initial"), ("after", "final")):
        images = [Image.open(f) for f in sorted((run_dir / "eval" / which).glob("*.png"))]
        assert len(images) == len(prompts), (run_dir, which)
        result[f"flaw_{when}"] = float(np.mean([FLAWS[task["flaw"]][0](im) for im in images]))
        result[f"colour_distance_{when}"] = float(np.mean([pg.colour_distance(p, im)
                                                           for p, im in zip(prompts, images)]))
    return {**task, **result}


def read_metrics(run_dir: Path) -> dict[str, np.ndarray]:
    """metrics.jsonl -> {metric: values over steps}."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {k: np.array([r.get(k, np.nan) for r in rows], dtype=float) for k in rows[0]}


def make_tasks(cfg: argparse.Namespace) -> list[dict]:
    """Every (reward, seed), pairwise and pointwise of one seed next to each other."""
    return [{"reward": r, "seed": s, "dir": str(Path(cfg.out) / f"{r}-seed{s}"), "steps": cfg.steps,
             "resolution": cfg.resolution, "flaw": cfg.flaw, "flaw_weight": cfg.flaw_weight,
             "point_noise": cfg.point_noise, "pair_noise": cfg.pair_noise} for s in range(cfg.seeds) for r in REWARDS]


def run_all(cfg: argparse.Namespace) -> list[dict]:
    """Train every run, `cfg.jobs` at a time (one thread each), or with --plot-only read the finished ones."""
    tasks = make_tasks(cfg)
    if cfg.plot_only:
        return [collect(t) for t in tasks]
    if cfg.jobs == 1:
        return [run_one(t) for t in tasks]
    with ProcessPoolExecutor(cfg.jobs, mp_context=get_context("spawn"), initializer=one_thread,
                             max_tasks_per_child=1) as pool:
        return list(pool.map(run_one, tasks))


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is)."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), window)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def summarize(results: list[dict], tail: int) -> dict:
    """Per reward: the held-out results and the means of the first and last `tail` training steps; each as the
    mean, min and max over seeds, and the per-seed values."""
    out = {}
    for r in REWARDS:
        runs = [x for x in results if x["reward"] == r]
        metrics = [read_metrics(Path(x["dir"])) for x in runs]
        per_seed = {"colour_distance_initial": [x["colour_distance_initial"] for x in runs],
                    "colour_distance_final": [x["colour_distance_final"] for x in runs],
                    "flaw_initial": [x["flaw_initial"] for x in runs],
                    "flaw_final": [x["flaw_final"] for x in runs],
                    "win_rate_final_vs_initial": [x["win_rate_final_vs_initial"] for x in runs]}
        for key in ("reward_group_std", "toy_flipped", "adv_abs_mean", "toy_opinion", "colour_distance", "toy_flaw"):
            per_seed[f"train_{key}_first{tail}"] = [float(np.nanmean(m[key][:tail])) for m in metrics]
            per_seed[f"train_{key}_last{tail}"] = [float(np.nanmean(m[key][-tail:])) for m in metrics]
        out[r] = {k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)), "seeds": v}
                  for k, v in per_seed.items()}
    return out


# ======================================================================================================================
# The plot, drawn with PIL
# ======================================================================================================================
def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [t for t in np.arange(math.ceil(lo / step) * step, hi + step / 2, step) if lo - 1e-12 <= t <= hi + 1e-12]


def draw_panel(img: Image.Image, box, title: str, series: dict, log: bool = False) -> None:
    """One line chart in `box` (x0, y0, x1, y1): series = {reward: [per-seed curves]}; thin lines per seed, a thick
    line for the mean over seeds."""
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 52, x1 - 12, y0 + 36, y1 - 22
    d.text((x0 + 52, y0 + 4), title, fill="black")
    curves = [c for cs in series.values() for c in cs]
    steps = max(len(c) for c in curves)
    f = (lambda v: np.log10(np.maximum(v, 1e-12))) if log else (lambda v: v)
    vals = np.concatenate([f(c) for c in curves])
    lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
    pad = (hi - lo) * 0.05 or 0.01
    lo, hi = lo - pad, hi + pad
    X = lambda i: left + (right - left) * i / max(steps - 1, 1)
    Y = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)
    d.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    ticks = [t for t in range(math.floor(lo), math.ceil(hi) + 1) if lo <= t <= hi] if log else nice_ticks(lo, hi)
    for t in ticks:
        d.line((left, Y(t), right, Y(t)), fill=(225, 225, 225))
        label = f"1e{t:d}" if log else f"{t:.3g}"
        d.text((left - 6 - 6 * len(label), Y(t) - 6), label, fill="black")
    for t in nice_ticks(1, steps, 6):
        d.text((X(t - 1) - 8, bottom + 4), f"{int(t)}", fill="black")
    d.text((left - 34, bottom + 4), "step", fill=(90, 90, 90))
    for reward, cs in series.items():
        colour = COLOURS[reward]
        faint = tuple(int(c + (255 - c) * 0.6) for c in colour)
        for c in cs:
            d.line([(X(i), Y(v)) for i, v in enumerate(f(c))], fill=faint, width=1)
        mean = np.mean([f(c) for c in cs], axis=0)
        d.line([(X(i), Y(v)) for i, v in enumerate(mean)], fill=colour, width=3)


def image_row(paths: list[Path], scale: int) -> Image.Image:
    """The images side by side, each enlarged `scale` times (nearest neighbour: the pixels stay visible)."""
    imgs = [Image.open(p).convert("RGB") for p in paths]
    w, h = imgs[0].width * scale, imgs[0].height * scale
    row = Image.new("RGB", (w * len(imgs), h), "white")
    for k, im in enumerate(imgs):
        row.paste(im.resize((w, h), Image.NEAREST), (k * w, 0))
    return row


def draw_plot(results: list[dict], cfg: argparse.Namespace, path: Path) -> None:
    """3 x 2 cells: five panels of curves over training steps (smoothed, every seed thin, the mean thick) and a key;
    then the held-out images of the initial policy and of every final policy (the same prompts and seeds)."""
    W, PW, PH = 1200, 400, 280
    metrics = {r: [read_metrics(Path(x["dir"])) for x in results if x["reward"] == r] for r in REWARDS}
    panels = [(f"proxy: the judges' opinion q\n(closeness + {cfg.flaw_weight:g} x {cfg.flaw}; higher = liked)",
               "toy_opinion", False),
              ("ground truth: colour distance to the prompt's\ncolour (lower is better)", "colour_distance", False),
              (f"the flaw: {cfg.flaw}\n(the judges like it; it is no part of the ground truth)", "toy_flaw", False),
              ("within-group std of the reward\nthat gets z-scored (log scale)", "reward_group_std", True),
              ("share of a group's pairs the reward orders\nagainst the judge's noise-free opinion", "toy_flipped",
               False)]
    rows = [("initial policy", sorted((Path(results[0]["dir"]) / "eval" / "before").glob("*.png")))]
    for x in results:
        rows.append((f"{x['reward']} seed {x['seed']}", sorted((Path(x["dir"]) / "eval" / "after").glob("*.png"))))
    scale = max(1, min(4, (W - 130) // (16 * max(len(p) for _, p in rows))))
    strips = [(label, image_row(p, scale)) for label, p in rows]
    img = Image.new("RGB", (W, 28 + 2 * PH + 30 + sum(s.height + 4 for _, s in strips) + 10), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"Pointwise (z-scored scores) vs pairwise (z-scored win rates) on the tiny offline FLUX: "
                    f"{cfg.seeds} seeds each, {cfg.steps} steps, curves smoothed over {cfg.smooth} steps", fill="black")
    for k, (title, key, log) in enumerate(panels):
        box = (PW * (k % 3), 28 + PH * (k // 3), PW * (k % 3) + PW, 28 + PH * (k // 3) + PH)
        draw_panel(img, box, title, {r: [smooth(m[key], cfg.smooth) for m in ms] for r, ms in metrics.items()}, log)
    x0, y = 2 * PW + 30, 28 + PH + 40
    for r in REWARDS:
        d.line((x0, y + 7, x0 + 30, y + 7), fill=COLOURS[r], width=3)
        d.text((x0 + 36, y), "pairwise: win rates, side-by-side judge" if r == "pairwise" else
               "pointwise: scores of the absolute scorer", fill="black")
        y += 20
    d.text((x0, y + 6), "thin lines: seeds; thick: their mean\n\n"
                        f"toy judges, one opinion, one flaw ({cfg.flaw_weight:g} x {cfg.flaw}):\n"
                        f"pointwise noise {cfg.point_noise}, scores in {SCORE_BAND[0]}-{SCORE_BAND[1]}\n"
                        f"pairwise noise {cfg.pair_noise} per image per comparison\n\n"
                        "a toy: not evidence about real reward models", fill="black")
    y = 28 + 2 * PH + 8
    d.text((10, y), "held-out images (seeds never trained on; the tiny model's prompts are its training prompts): the "
                    "initial policy, then each final policy", fill="black")
    y += 20
    for label, strip in strips:
        d.text((8, y + strip.height // 2 - 6), label, fill=COLOURS.get(label.split()[0], (0, 0, 0)))
        img.paste(strip, (120, y))
        y += strip.height + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


# ======================================================================================================================
# Entry point
# ======================================================================================================================
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120, help="training steps of every run")
    p.add_argument("--seeds", type=int, default=3, help="seeds per reward (0, 1, ...)")
    p.add_argument("--resolution", type=int, default=16, help="image size in pixels")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    p.add_argument("--flaw", choices=sorted(FLAWS), default=FLAW, help="what both judges like besides the colour")
    p.add_argument("--flaw-weight", type=float, default=FLAW_WEIGHT, help="how much both judges like the flaw")
    p.add_argument("--point-noise", type=float, default=POINT_NOISE, help="pointwise scorer's noise std (q units)")
    p.add_argument("--pair-noise", type=float, default=PAIR_NOISE,
                   help="pairwise judge's noise std per image per comparison (q units)")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window of the plotted curves")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot and summary from the runs in --out")
    p.add_argument("--out", default="runs/pointwise_vs_pairwise", help="directory for the runs and summary.json")
    p.add_argument("--plot", default="docs/pointwise_vs_pairwise.png", help="where the PNG goes")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    results = run_all(cfg)
    tail = max(1, min(cfg.smooth, cfg.steps))
    summary = {"settings": vars(cfg) | {"score_band": SCORE_BAND}, "rewards": summarize(results, tail)}
    if len({round(x["colour_distance_initial"], 9) for x in results}) > 1:
        print("warning: the runs' held-out images of the initial policy differ: they did not all start from the same "
              "model (was pref_grpo.py edited while they ran?); rerun before comparing them")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    draw_plot(results, cfg, Path(cfg.plot))
    print(f"mean [min, max] over {cfg.seeds} seeds; held-out: initial -> final policy; "
          f"training: first -> last {tail} steps")
    rows = [("held-out colour distance (ground truth, lower is better)", "colour_distance_initial",
             "colour_distance_final"),
            (f"held-out {cfg.flaw} (the flaw)", "flaw_initial", "flaw_final"),
            ("training: judges' opinion q (proxy)", f"train_toy_opinion_first{tail}", f"train_toy_opinion_last{tail}"),
            ("training: within-group reward std", f"train_reward_group_std_first{tail}",
             f"train_reward_group_std_last{tail}"),
            ("training: pairs ordered against q", f"train_toy_flipped_first{tail}", f"train_toy_flipped_last{tail}")]
    for label, first, last in rows:
        print(label)
        for r, s in summary["rewards"].items():
            lo, hi = s[last]["min"], s[last]["max"]
            print(f"  {r:10s} {s[first]['mean']:.4g} -> {s[last]['mean']:.4g} [{lo:.4g}, {hi:.4g}]")
    print(f"plot: {cfg.plot}   runs and summary.json: {cfg.out}")
    return summary


if __name__ == "__main__":
    main()
