"""Pointwise vs pairwise reward on the toy world: plain GRPO on a score against Pref-GRPO on win rates, one checker.

    python benchmarks/pointwise_vs_pairwise.py   # 2 rewards x 3 seeds x the demo's 480 rounds, one run at a time

writes docs/pointwise_vs_pairwise.png (curves over rounds + held-out samples), and under runs/pointwise_vs_pairwise/
one run directory per (reward, seed) (metrics.jsonl, sample grids, eval/) and summary.json. Quick look:

    python benchmarks/pointwise_vs_pairwise.py --seeds 1 --train-steps 20 --out runs/pvp-quick \\
        --plot runs/pvp-quick/plot.png
    python benchmarks/pointwise_vs_pairwise.py --plot-only   # redraw the plot and summary.json from finished runs

Flags this script does not know go to every run's pref_grpo.parse_args (e.g. --train-steps, --lr, --eval-seeds).

Every run is the demo (`python pref_grpo.py`, the preset toy_world:DEMO) with one flag changed or not:
  * pairwise (Pref-GRPO, the demo itself): toy_world.judge compares two images of a group (more requirements met
    wins, then the larger checker margin; exact ties 0.5); each image's reward is its win rate in the group.
  * pointwise (plain GRPO, `--reward pointwise`): toy_world.scorer scores each image alone, (requirements met +
    margin) / (requirements + 1), which orders a group exactly as the judge does; the scores are the reward.
Both are z-scored inside the group by the same code; only what gets z-scored differs: a score, whose gaps keep their
sizes, or a win rate, which is the image's rank in its group. The ground truth is the checker's all-correct verdict on
held-out prompts and seeds, which neither reward sees (they see the training prompts' samples and margins).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # pref_grpo.py and toy_world.py live in the repo root

import argparse
import contextlib
import json
import math
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageDraw

REWARDS = ("pairwise", "pointwise")
COLOURS = {"pairwise": (31, 119, 180), "pointwise": (230, 97, 1)}
KINDS = ("colour", "shape", "count", "side")


# ======================================================================================================================
# The rewards, as the demo has them, plus one number about each round's groups
# ======================================================================================================================
def tied_groups(graded: list[tuple[dict, float]], size: int) -> float:
    """Share of groups (consecutive blocks of `size` graded images) whose images all meet as many requirements: their
    whole reward spread, and after the z-score a full-size advantage, comes from the checker's margin alone."""
    met = [sum(m.values()) for m, _ in graded]
    blocks = [met[k:k + size] for k in range(0, len(met), size)]
    return sum(len(set(b)) == 1 for b in blocks) / max(len(blocks), 1)


def tracked(reward: str, group_size: int):
    """toy_world's judge (pairwise) or scorer (pointwise), logging `toy_tied_groups` besides their own numbers. The
    trainer asks for a group's pairs (or images) together, group after group, so a group is a block of the call."""
    import toy_world as tw

    if reward == "pointwise":
        def scorer(prompts, images):
            scores, info = tw.scorer(prompts, images)
            graded = [tw.grade_scene(p, im) for p, im in zip(prompts, images)]
            return scores, {**info, "toy_tied_groups": tied_groups(graded, group_size)}
        return scorer

    pairs = group_size * (group_size - 1) // 2

    def judge(prompts, images_a, images_b):
        probs, info = tw.judge(prompts, images_a, images_b)
        graded = []
        for k in range(0, len(prompts), pairs):  # each group's distinct images, in first-seen order
            seen = {}
            for p, a, b in zip(prompts[k:k + pairs], images_a[k:k + pairs], images_b[k:k + pairs]):
                for im in (a, b):
                    seen.setdefault(id(im), (p, im))
            graded += [tw.grade_scene(p, im) for p, im in seen.values()]
        return probs, {**info, "toy_tied_groups": tied_groups(graded, group_size)}
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
    """One training run: the demo preset, this reward, this seed; its output goes to log.txt."""
    import pref_grpo as pg

    run_dir = Path(task["dir"])
    shutil.rmtree(run_dir, ignore_errors=True)  # train() refuses a folder that holds a run: start clean
    args = pg.parse_args(["--preset", "toy_world:DEMO", "--reward", task["reward"], "--seed", str(task["seed"]),
                          "--output-dir", str(run_dir), "--eval-every", str(task["eval_every"]), *task["flags"]])
    run_dir.mkdir(parents=True)
    with open(run_dir / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        pg.train(args, judge=tracked(task["reward"], args.group_size))
    return collect(task)


def collect(task: dict) -> dict:
    """A finished run's held-out results (eval/eval.json) with its settings."""
    path = Path(task["dir"]) / "eval" / "eval.json"
    if not path.is_file():
        raise SystemExit(f"error: {task['dir']} has no finished run (eval/eval.json)")
    return {**task, **json.loads(path.read_text())}


def read_metrics(run_dir: Path) -> dict[str, np.ndarray]:
    """metrics.jsonl -> {metric: values over rounds} (NaN where a round lacks it, e.g. eval_* between evaluations)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: np.array([r.get(k, np.nan) for r in rows], dtype=float) for k in keys}


def make_tasks(cfg: argparse.Namespace) -> list[dict]:
    """Every (reward, seed), pairwise and pointwise of one seed next to each other."""
    return [{"reward": r, "seed": s, "dir": str(Path(cfg.out) / f"{r}-seed{s}"), "eval_every": cfg.eval_every,
             "flags": cfg.trainer_flags} for s in range(cfg.seeds) for r in REWARDS]


def run_all(cfg: argparse.Namespace) -> list[dict]:
    """Train every run, `cfg.jobs` at a time (one thread each), or with --plot-only read the finished ones."""
    tasks = make_tasks(cfg)
    if cfg.plot_only:
        return [collect(t) for t in tasks]
    import toy_world as tw

    tw.pretrained_model()  # once, before the workers start: each would otherwise pretrain its own copy
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
    """Per reward: held-out results (initial, final, per kind) and the means of the first and last `tail` rounds of the
    training numbers; each as the mean, min and max over seeds, and the per-seed values."""
    out = {}
    for r in REWARDS:
        runs = [x for x in results if x["reward"] == r]
        per_seed = {f"{k}_{when}": [x[f"{k}_{when}"] for x in runs] for when in ("initial", "final")
                    for k in ["checker_accuracy", *(f"checker_accuracy_{kind}" for kind in KINDS)]}
        per_seed["win_rate_final_vs_initial"] = [x["win_rate_final_vs_initial"] for x in runs]
        for x, m in zip(runs, (read_metrics(Path(x["dir"])) for x in runs)):
            for key in ("toy_all_correct", "toy_score", "reward_group_std", "toy_tied_groups", "adv_abs_mean"):
                per_seed.setdefault(f"train_{key}_first{tail}", []).append(float(np.nanmean(m[key][:tail])))
                per_seed.setdefault(f"train_{key}_last{tail}", []).append(float(np.nanmean(m[key][-tail:])))
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
    """One line chart in `box` (x0, y0, x1, y1): series = {reward: [per-seed (rounds, values)]}; thin lines per seed,
    a thick line for the mean over seeds."""
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 52, x1 - 12, y0 + 36, y1 - 22
    d.text((x0 + 52, y0 + 4), title, fill="black")
    f = (lambda v: np.log10(np.maximum(v, 1e-12))) if log else (lambda v: v)
    curves = [(x, f(y)) for cs in series.values() for x, y in cs]
    last = max(x.max() for x, _ in curves)
    vals = np.concatenate([y for _, y in curves])
    lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
    pad = (hi - lo) * 0.05 or 0.01
    lo, hi = lo - pad, hi + pad
    X = lambda i: left + (right - left) * i / max(last, 1)
    Y = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)
    d.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    ticks = [t for t in range(math.floor(lo), math.ceil(hi) + 1) if lo <= t <= hi] if log else nice_ticks(lo, hi)
    for t in ticks:
        d.line((left, Y(t), right, Y(t)), fill=(225, 225, 225))
        label = f"1e{t:d}" if log else f"{t:.3g}"
        d.text((left - 6 - 6 * len(label), Y(t) - 6), label, fill="black")
    for t in nice_ticks(0, last, 6):
        d.text((X(t) - 8, bottom + 4), f"{int(t)}", fill="black")
    d.text((left - 40, bottom + 4), "round", fill=(90, 90, 90))
    for reward, cs in series.items():
        colour = COLOURS[reward]
        faint = tuple(int(c + (255 - c) * 0.6) for c in colour)
        for x, y in cs:
            d.line([(X(i), Y(v)) for i, v in zip(x, f(y))], fill=faint, width=1)
        mean = np.mean([f(y) for _, y in cs], axis=0)
        d.line([(X(i), Y(v)) for i, v in zip(cs[0][0], mean)], fill=colour, width=3)


def image_row(paths: list[Path], scale: int) -> Image.Image:
    """The images side by side, each enlarged `scale` times (nearest neighbour: the pixels stay visible)."""
    imgs = [Image.open(p).convert("RGB") for p in paths]
    w, h = imgs[0].width * scale, imgs[0].height * scale
    row = Image.new("RGB", (w * len(imgs), h), "white")
    for k, im in enumerate(imgs):
        row.paste(im.resize((w, h), Image.NEAREST), (k * w, 0))
    return row


def curve(m: dict, key: str, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(rounds, values) of a metric: every round smoothed, or, for eval_* (logged every --eval-every rounds), the
    rounds that have it, after round 0's value (eval_* start from the initial policy's, eval.json's *_initial)."""
    if key.startswith("eval_"):
        rows = ~np.isnan(m[key])
        return np.concatenate([[0], m["step"][rows]]), np.concatenate([[m["initial"]], m[key][rows]])
    return m["step"], smooth(m[key], window)


def draw_plot(results: list[dict], cfg: argparse.Namespace, path: Path) -> None:
    """3 x 2 cells: five panels of curves over rounds (every seed thin, the mean thick) and a key; then held-out images
    (the first seed of each held-out prompt) of the initial policy and of every final policy."""
    W, PW, PH = 1200, 400, 280
    metrics = {}
    for x in results:
        m = read_metrics(Path(x["dir"]))
        m["initial"] = x["checker_accuracy_initial"]
        metrics.setdefault(x["reward"], []).append(m)
    panels = [("ground truth: held-out images meeting every\nrequirement (prompts and seeds never trained on)",
               "eval_checker_accuracy", False),
              ("training samples meeting every requirement", "toy_all_correct", False),
              ("the proxy: mean checker score of the training\nsamples, (requirements met + margin) / (n + 1)",
               "toy_score", False),
              ("within-group std of the reward that gets\nz-scored (log scale)", "reward_group_std", True),
              ("groups whose images all meet as many\nrequirements (spread from the margin alone)", "toy_tied_groups",
               False)]
    seeds = json.loads((Path(results[0]["dir"]) / "args.json").read_text())["eval_seeds"]
    pick = lambda folder: sorted(folder.glob("*.png"))[::seeds]  # noqa: E731  one image per held-out prompt
    rows = [("initial policy", pick(Path(results[0]["dir"]) / "eval" / "before"))]
    rows += [(f"{x['reward']} seed {x['seed']}", pick(Path(x["dir"]) / "eval" / "after")) for x in results]
    scale = max(1, min(3, (W - 130) // (32 * max(len(p) for _, p in rows))))
    strips = [(label, image_row(p, scale)) for label, p in rows]
    img = Image.new("RGB", (W, 28 + 2 * PH + 30 + sum(s.height + 4 for _, s in strips) + 10), "white")
    d = ImageDraw.Draw(img)
    rounds = int(max(m["step"].max() for ms in metrics.values() for m in ms))
    d.text((10, 8), f"Pointwise (plain GRPO on checker scores) vs pairwise (Pref-GRPO on win rates) on the toy world: "
                    f"{cfg.seeds} seeds each, {rounds} rounds, training curves smoothed over {cfg.smooth} rounds",
           fill="black")
    for k, (title, key, log) in enumerate(panels):
        box = (PW * (k % 3), 28 + PH * (k // 3), PW * (k % 3) + PW, 28 + PH * (k // 3) + PH)
        draw_panel(img, box, title, {r: [curve(m, key, cfg.smooth) for m in ms] for r, ms in metrics.items()}, log)
    x0, y = 2 * PW + 30, 28 + PH + 40
    for r in REWARDS:
        d.line((x0, y + 7, x0 + 30, y + 7), fill=COLOURS[r], width=3)
        d.text((x0 + 36, y), "pairwise: win rates (the demo, Pref-GRPO)" if r == "pairwise" else
               "pointwise: checker scores (--reward pointwise)", fill="black")
        y += 20
    d.text((x0, y + 6), "thin lines: seeds; thick: their mean\n\nboth rewards order a group the same way:\n"
                        "requirements met, then the checker's margin", fill="black")
    y = 28 + 2 * PH + 8
    d.text((10, y), "held-out images (the first held-out seed of each held-out prompt): the initial policy, then each "
                    "final policy", fill="black")
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Other flags go to every run's trainer.")
    p.add_argument("--seeds", type=int, default=3, help="seeds per reward (0, 1, ...)")
    p.add_argument("--eval-every", type=int, default=60, help="held-out evaluation every N rounds (curve points)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each")
    p.add_argument("--smooth", type=int, default=40, help="moving-average window of the plotted training curves")
    p.add_argument("--plot-only", action="store_true", help="redraw the plot and summary from the runs in --out")
    p.add_argument("--out", default="runs/pointwise_vs_pairwise", help="directory for the runs and summary.json")
    p.add_argument("--plot", default="docs/pointwise_vs_pairwise.png", help="where the PNG goes")
    cfg, cfg.trainer_flags = p.parse_known_args(argv)
    return cfg


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    results = run_all(cfg)
    rounds = len(read_metrics(Path(results[0]["dir"]))["step"])
    tail = max(1, min(cfg.smooth, rounds))
    summary = {"settings": vars(cfg), "rewards": summarize(results, tail)}
    if len({round(x["checker_accuracy_initial"], 9) for x in results}) > 1:
        print("warning: the runs' held-out images of the initial policy differ: they did not all start from the same "
              "model; rerun before comparing them")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    draw_plot(results, cfg, Path(cfg.plot))
    print(f"mean [min, max] over {cfg.seeds} seeds; held-out: initial -> final policy; "
          f"training: first -> last {tail} rounds")
    rows = [(f"held-out all correct{' (' + k + ')' if k else ''}", f"checker_accuracy{'_' + k if k else ''}_initial",
             f"checker_accuracy{'_' + k if k else ''}_final") for k in ("", *KINDS)]
    rows += [(f"training: {label}", f"train_{key}_first{tail}", f"train_{key}_last{tail}") for label, key in [
        ("samples all correct", "toy_all_correct"), ("mean checker score (the proxy)", "toy_score"),
        ("within-group reward std", "reward_group_std"), ("groups tied on requirements", "toy_tied_groups")]]
    for label, first, last in rows:
        print(label)
        for r, s in summary["rewards"].items():
            print(f"  {r:10s} {s[first]['mean']:.4g} -> {s[last]['mean']:.4g} [{s[last]['min']:.4g}, "
                  f"{s[last]['max']:.4g}]")
    print(f"plot: {cfg.plot}   runs and summary.json: {cfg.out}")
    return summary


if __name__ == "__main__":
    main()
