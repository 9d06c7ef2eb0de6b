"""UniGenBench: does a text-to-image model draw what the prompt asks for? (Pref-GRPO, arXiv 2508.20751)

Every benchmark prompt carries 1-10 checkpoints ("two pandas" -> Attribute - Quantity, "ink painting" -> Style).
A multimodal judge looks at each generated image and scores every checkpoint 0 or 1. Accuracy is pooled per
sub-criterion (27), primary dimension (10) and theme (5); the overall score is the mean of the 10 primaries.

Three steps, each resumable (run the same command again after a crash and it continues where it stopped):

  python unigenbench.py generate --model black-forest-labs/FLUX.1-dev --out runs/ugb/base [--lora CHECKPOINT_DIR]
  python unigenbench.py evaluate --images runs/ugb/base --judge-url http://localhost:8000/v1 --judge-model ugb-judge
  python unigenbench.py report runs/ugb/base/results.jsonl [runs/ugb/trained/results.jsonl ...]

--prompts picks the prompt set for generate and evaluate: our prompts.jsonl (default) or an official UniGenBench
CSV (test_prompts_en.csv, _en_long, _zh, _zh_long). evaluate --judge-local NAME runs a Qwen2.5-VL judge in-process.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.jsonl")


# ======================================================================================================================
# Taxonomy: 27 sub-criteria in 10 primary dimensions; 5 themes with 20 sub-themes
# ======================================================================================================================
class Criterion(NamedTuple):
    primary: str      # the primary dimension it is pooled into
    zh: str           # its name in the Chinese prompt files
    definition: str   # one line, shown to the judge next to each checkpoint


SUB_CRITERIA: dict[str, Criterion] = {
    "Style": Criterion(
        "Style", "风格", "the image uses the named medium, art or design style, or photographic look"),
    "World Knowledge": Criterion(
        "World Knowledge", "世界知识", "real landmarks, famous people or works, and cultural facts are depicted correctly"),
    "Attribute - Color": Criterion(
        "Attribute", "属性-颜色", "each object has the colour the prompt gives it"),
    "Attribute - Expression": Criterion(
        "Attribute", "属性-表情", "faces show the emotion asked for, not just some movement of the face"),
    "Attribute - Material": Criterion(
        "Attribute", "属性-材质", "objects look made of the stated material, with its texture"),
    "Attribute - Quantity": Criterion(
        "Attribute", "属性-数量", "the number of each counted object is exactly right"),
    "Attribute - Shape": Criterion(
        "Attribute", "属性-形状", "objects have the outline or form the prompt states"),
    "Attribute - Size": Criterion(
        "Attribute", "属性-大小", "sizes, heights, lengths or widths are as described"),
    "Action - Animal": Criterion(
        "Action", "动作-动物动作", "animals perform the stated action or hold the stated pose"),
    "Action - Contact Interaction": Criterion(
        "Action", "动作-实体间有接触互动", "entities that should touch (hold, push, hug) really do, the right way round"),
    "Action - Full-body (Character/Anthropomorphic)": Criterion(
        "Action", "动作-人物/拟人全身动作", "a person or humanlike figure makes the stated whole-body movement or pose"),
    "Action - Hand (Character/Anthropomorphic)": Criterion(
        "Action", "动作-人物/拟人手部动作", "the hand action is right and hands are whole, with no missing or fused fingers"),
    "Action - Non-contact Interaction": Criterion(
        "Action", "动作-实体间无接触互动", "entities relate without touching (look at, point at, chase) as stated"),
    "Action - State": Criterion(
        "Action", "动作-状态", "an entity is in the ongoing condition its verb names, such as asleep or floating"),
    "Relationship - Comparison": Criterion(
        "Relationship", "关系-比较关系", "a stated comparison between entities (bigger, taller, ahead of) holds"),
    "Relationship - Composition": Criterion(
        "Relationship", "关系-构成关系", "an object is built out of the stated parts or substance"),
    "Relationship - Inclusion": Criterion(
        "Relationship", "关系-包含关系", "something is inside the stated container, which may be flat, like a picture"),
    "Relationship - Similarity": Criterion(
        "Relationship", "关系-相似关系", "one thing resembles or is shaped like another as stated"),
    "Compound - Feature Matching": Criterion(
        "Compound", "复合考点-不同实体特征匹配", "each of several entities has its own attributes, none swapped or blended"),
    "Compound - Imagination": Criterion(
        "Compound", "复合考点-想象力", "an impossible or fantastical idea is shown as described"),
    "Grammar - Consistency": Criterion(
        "Grammar", "语法-统一性", "an attribute said to be shared (all, both, matching) is on every entity sharing it"),
    "Grammar - Negation": Criterion(
        "Grammar", "语法-否定", "whatever the prompt excludes (no, without, not) is absent"),
    "Grammar - Pronoun Reference": Criterion(
        "Grammar", "语法-代词指代", "pronouns (it, her, them) go with the entity they refer to"),
    "Entity Layout - Three-Dimensional Space": Criterion(
        "Layout", "实体布局-三维空间", "depth arrangement is right: in front of, behind, on top of, beneath"),
    "Entity Layout - Two-Dimensional Space": Criterion(
        "Layout", "实体布局-二维空间", "positions in the picture plane are right: left/right, top/bottom, rows, grids"),
    "Logical Reasoning": Criterion(
        "Logical Reasoning", "逻辑推理", "what the prompt implies without saying (cause, physics, time) is drawn right"),
    "Text Generation": Criterion(
        "Text", "文本生成", "the quoted text is legible and spelled exactly, with nothing missing or added"),
}
PRIMARIES = list(dict.fromkeys(c.primary for c in SUB_CRITERIA.values()))  # the 10, in leaderboard order

THEMES_ZH = {"Art": "艺术", "Illustration": "配图", "Creative Divergence": "创意发散", "Design": "设计", "Film & Story": "影视故事"}
SUBTHEMES = {  # theme -> {canonical sub-theme: its label in the zh files}
    "Art": {"Graphic Art": "平面艺术", "Photography Art": "摄影艺术", "Sculptural (Three-dimensional) Art": "立体艺术",
            "Other": "其他"},
    "Illustration": {"Content Illustration": "内容配图", "Copywriting Illustration": "文案配图"},
    "Creative Divergence": {"Imaginative Thinking": "想象力发散", "Other": "其他"},
    "Design": {"Advertising/E-commerce Design": "广告/电商设计", "Design Assets": "设计素材", "Fashion Design": "服装设计",
               "Game Design": "游戏设计", "IP Design": "ip设计", "Logo/Icon Design": "logo/icon设计",
               "Poster Design": "海报设计", "Spatial Design": "空间设计", "UI Design": "软件界面设计"},
    "Film & Story": {"Animation": "动画", "Realism": "写实", "Sci-Fi": "科幻"},
}
# Older rows of the official CSVs use other labels; these are the ones a case-insensitive match does not catch.
SUBTHEME_ALIASES = {"sculptural art": "Sculptural (Three-dimensional) Art",
                    "three-dimensional art": "Sculptural (Three-dimensional) Art", "space design": "Spatial Design",
                    "mapping-content mapping": "Content Illustration",
                    "creativity divergence-imagination divergence": "Imaginative Thinking"}
SUBJECTS_ZH = {"人物": "Character", "动物": "Animal", "其他实体": "Other Entity", "场景": "Scene", "拟人": "Anthropomorphic"}
KEYS_ZH = {"一级垂类": "Primary Categories", "二级垂类": "Secondary Categories", "主体": "Subjects",  # zh JSON keys
           "句式": "Sentence Structure", "考点": "Testpoints", "考点对应描述": "Testpoint Description"}


def _key(name: str) -> str:
    return re.sub(r"\s+", "", name).lower()  # "Attribute - Color", "attribute-color" and "属性-颜色" all match


_CRITERION_BY_KEY = {_key(n): n for n in SUB_CRITERIA} | {_key(c.zh): n for n, c in SUB_CRITERIA.items()}


def canonical_criterion(name: str, where: str) -> str:
    """English or Chinese checkpoint name -> one of the 27 English sub-criteria."""
    if _key(name) not in _CRITERION_BY_KEY:
        raise SystemExit(f"{where}: unknown checkpoint {name!r} (not one of the 27 UniGenBench sub-criteria)")
    return _CRITERION_BY_KEY[_key(name)]


def normalise_theme(raw: str) -> str:
    by_label = {t.lower(): t for t in THEMES_ZH} | {zh: t for t, zh in THEMES_ZH.items()}
    return by_label.get(raw.strip().lower(), raw.strip())


def normalise_subtheme(theme: str, raw: str) -> str:
    label = raw.strip()
    for prefix in (theme, THEMES_ZH.get(theme, theme)):  # "Art-Graphic Art", "艺术-平面艺术": drop the theme
        if label.lower().startswith(prefix.lower() + "-"):
            label = label[len(prefix) + 1:]
    names = SUBTHEMES.get(theme, {})
    by_label = {n.lower(): n for n in names} | {zh.lower(): n for n, zh in names.items()} | SUBTHEME_ALIASES
    return by_label.get(label.lower(), raw.strip())  # an unknown label is kept: it names rows, it scores nothing


# ======================================================================================================================
# Prompts: the official CSVs (en/zh, short/long) and our JSON-lines file, read into one normalised form
# ======================================================================================================================
@dataclass(frozen=True)
class BenchPrompt:
    index: int
    prompt: str
    theme: str
    subtheme: str
    subject: str
    checkpoints: tuple[tuple[str, str], ...]  # (English sub-criterion, the part of the prompt it tests)


def parse_sub_dims(text: str, where: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    # en_long index 509 lacks a comma between two strings ("Grammar - Negation" "Attribute - Color"), and the
    # official script crashes on it. Insert the comma and say so, rather than drop the prompt.
    try:
        data = json.loads(re.sub(r'"\s+"', '", "', text))
    except json.JSONDecodeError as e:
        raise SystemExit(f"{where}: the checkpoint JSON is malformed ({e.msg} at char {e.pos})") from None
    warnings.warn(f"{where}: repaired a missing comma in the checkpoint JSON", stacklevel=2)
    return data


def to_bench_prompt(index: int, text: str, sub_dims, where: str) -> BenchPrompt:
    fields = {KEYS_ZH.get(k, k): v for k, v in sub_dims.items()} if isinstance(sub_dims, dict) else {}
    names, descriptions = fields.get("Testpoints"), fields.get("Testpoint Description")
    if not (isinstance(text, str) and text.strip() and isinstance(names, list) and isinstance(descriptions, list)
            and names and len(names) == len(descriptions)):
        raise SystemExit(f"{where}: needs a prompt and non-empty Testpoints / Testpoint Description lists of equal length")
    theme = normalise_theme(str(fields.get("Primary Categories", "")))
    subject = str(fields.get("Subjects", "")).strip()
    return BenchPrompt(index, text, theme, normalise_subtheme(theme, str(fields.get("Secondary Categories", ""))),
                       SUBJECTS_ZH.get(subject, subject),
                       tuple((canonical_criterion(str(n), where), str(d)) for n, d in zip(names, descriptions)))


def _read_csv(path: Path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        text_col = next((c for c in ("prompt_en", "prompt_zh", "prompt") if c in columns), None)
        dims_col = next((c for c in ("sub_dims_en", "sub_dims_zh", "sub_dims") if c in columns), None)
        if "index" not in columns or not text_col or not dims_col:
            raise SystemExit(f"{path}: expected columns index, prompt_en|prompt_zh, sub_dims_en|sub_dims_zh; got {columns}")
        for row in reader:
            if not (row["index"] or "").strip().isdigit() or row[dims_col] is None:
                raise SystemExit(f"{path}:{reader.line_num}: malformed row (index {row['index']!r})")
            where = f"{path.name} index {row['index']}"
            yield int(row["index"]), row[text_col], parse_sub_dims(row[dims_col], where), where


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    index = int(row["index"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise SystemExit(f"{path}:{line_no}: not a prompt record ({type(e).__name__}: {e})") from None
                yield index, row.get("prompt"), row.get("sub_dims", row), f"{path.name}:{line_no} (index {index})"


def load_prompts(path: str | os.PathLike = DEFAULT_PROMPTS) -> list[BenchPrompt]:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"prompts file not found: {path}")
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)
    prompts = [to_bench_prompt(index, text, dims, where) for index, text, dims, where in rows]
    indices = [p.index for p in prompts]
    if not prompts or len(set(indices)) != len(indices):
        raise SystemExit(f"{path}: no prompts, or a repeated index (image files are named by index)")
    return prompts


def prompts_fingerprint(prompts: list[BenchPrompt]) -> str:
    return hashlib.sha1("\n".join(f"{p.index}\t{p.prompt}" for p in prompts).encode()).hexdigest()[:12]


# ======================================================================================================================
# generate: N images per prompt, a fixed seed per (prompt, image); images already on disk are kept
# ======================================================================================================================
def image_path(folder: str | os.PathLike, index: int, j: int) -> Path:
    return Path(folder) / f"{index}_{j}.png"


def image_seed(index: int, j: int, base: int = 0) -> int:
    return base + 1000 * index + j  # distinct for every (prompt, image) while n <= 1000


def _batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _check_settings(folder: Path, settings: dict) -> None:
    """Resuming into a folder made with another model, LoRA or prompt set would silently blend two runs: refuse."""
    path = folder / "generate.json"
    if path.exists() and any(folder.glob("*.png")):
        old = json.loads(path.read_text())
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise SystemExit(f"{folder} holds images made with other settings ({', '.join(changed)}); use another --out")
    path.write_text(json.dumps(settings, indent=1))


def generate(prompts: list[BenchPrompt], out: str | os.PathLike, model: str, *, n: int = 4, lora: str | None = None,
             steps: int = 28, resolution: int = 512, guidance: float = 3.5, batch_size: int = 4, seed: int = 0) -> int:
    """Write OUT/{index}_{j}.png for every prompt and j < n that is not there yet. Returns how many were made."""
    if not 1 <= n <= 1000:
        raise SystemExit(f"--n must be between 1 and 1000, got {n}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora = str(Path(lora).resolve()) if lora else None  # the same checkpoint, however the path is written
    _check_settings(out, dict(model=model, lora=lora, steps=steps, resolution=resolution, guidance=guidance, seed=seed,
                              prompts=prompts_fingerprint(prompts)))
    todo = [(p, j) for p in prompts for j in range(n) if not image_path(out, p.index, j).exists()]
    print(f"generate: {len(prompts) * n - len(todo)} images already in {out}, {len(todo)} to make")
    if not todo:
        return 0
    import pref_grpo  # late import: torch and diffusers load slowly, and evaluate / report do not need them

    pipe = pref_grpo.load_pipeline(model)
    if lora:
        pipe.load_lora_weights(lora)
    with tqdm(total=len(todo), desc="generate", unit="img") as bar:
        for chunk in _batched(todo, batch_size):
            seeds = [image_seed(p.index, j, seed) for p, j in chunk]
            images = pref_grpo.generate_images(pipe, [p.prompt for p, _ in chunk], seeds, steps=steps,
                                               resolution=resolution, guidance=guidance)
            for (p, j), image in zip(chunk, images):
                final = image_path(out, p.index, j)
                partial = final.with_name(final.name + ".part")
                image.save(partial, format="PNG")
                os.replace(partial, final)  # a kill never leaves a truncated PNG that the next run would skip
            bar.update(len(chunk))
    return len(todo)


# ======================================================================================================================
# evaluate: one judge call per image with all its checkpoints; one JSON line per image, appended as it is done
# ======================================================================================================================
INSTRUCTION = """You are checking how faithfully a generated image follows the text prompt it was made from.

Prompt: "{prompt}"

Check the image against each numbered checkpoint below. A checkpoint names a criterion, says what the criterion \
means, and quotes the part of the prompt it is about.
{checkpoints}

Judge only what you can see. Score a checkpoint 1 if the image clearly satisfies it, and 0 if it does not, \
satisfies it only in part, or you cannot tell.

Answer in exactly this format, where s1, s2, ... are the scores of checkpoints 1, 2, ..., each 0 or 1:
<analysis>one short sentence per checkpoint, in order</analysis>
<score>[{example}]</score>
The list must hold exactly {n} scores."""

SCORE_RE = re.compile(r"<score>\s*\[([^\[\]]*)\]", re.IGNORECASE)
ANALYSIS_RE = re.compile(r"<analysis>(.*?)</analysis>", re.IGNORECASE | re.DOTALL)


def judge_instruction(p: BenchPrompt) -> str:
    lines = [f'{i}. {name}: {SUB_CRITERIA[name].definition}. In this prompt: "{description}"'
             for i, (name, description) in enumerate(p.checkpoints, start=1)]
    n = len(p.checkpoints)
    return INSTRUCTION.format(prompt=p.prompt, checkpoints="\n".join(lines), n=n,
                              example=", ".join(f"s{i}" for i in range(1, n + 1)))


def parse_reply(reply: str | None, n: int) -> tuple[list[int] | None, str, str | None]:
    """(scores, analysis, error). scores is None, and error says why, unless the reply holds exactly n scores of 0/1."""
    if reply is None:
        return None, "", "no reply from the judge (the request failed after its retries)"
    analysis = ANALYSIS_RE.search(reply)
    analysis = analysis.group(1).strip() if analysis else reply.split("<score>")[0].strip()
    found = SCORE_RE.findall(reply)
    if not found:
        return None, analysis, "no <score>[...] list in the reply"
    items = [item.strip() for item in found[-1].split(",")]  # if the judge wrote several lists, its last one counts
    if any(item not in ("0", "1") for item in items):
        return None, analysis, f"scores must be 0 or 1, got [{found[-1].strip()}]"
    if len(items) != n:
        return None, analysis, f"expected {n} scores, got {len(items)}"
    return [int(item) for item in items], analysis, None


def server_judge(url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", workers: int = 8,
                 timeout: float = 120.0, retries: int = 3, max_tokens: int = 1024):
    """A judge behind an OpenAI-compatible endpoint (vLLM, a hosted MLLM). Fails fast when the server is not up."""
    import mllm

    try:
        mllm.check_server(url, api_key_env=api_key_env)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None  # already one line, naming the server

    def judge(requests, temperature=0.0):
        replies, _ = mllm.server_chat(requests, url, model, max_tokens=max_tokens, temperature=temperature,
                                      workers=workers, timeout=timeout, retries=retries, api_key_env=api_key_env)
        return replies
    return judge


def local_judge(name_or_path: str, *, max_tokens: int = 1024, batch_size: int = 8):
    """A Qwen2.5-VL judge in this process; "tiny" builds a random one offline (its replies are noise: tests only)."""
    import mllm

    vlm = mllm.tiny_vlm() if name_or_path == "tiny" else mllm.load_local_vlm(name_or_path)

    def judge(requests, temperature=0.0):  # local decoding is greedy, so the temperature of a retry is not used
        return mllm.local_chat(vlm, requests, max_tokens=max_tokens, batch_size=batch_size)
    return judge


def read_results(path: Path) -> dict[tuple[int, int], dict]:
    """Records by (index, image). A later line for the same image replaces an earlier one (see --retry-failed)."""
    records = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                try:
                    record = json.loads(line)
                    records[(int(record["index"]), int(record["image"]))] = record
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    if line.strip():  # a kill can cut the last line short; that image is judged again
                        warnings.warn(f"{path}:{line_no}: skipping an unreadable line")
    return records


def require_images(folder: str | os.PathLike, prompts: list[BenchPrompt], n: int) -> None:
    missing = [image_path(folder, p.index, j).name for p in prompts for j in range(n)
               if not image_path(folder, p.index, j).exists()]
    if missing:
        raise SystemExit(f"{len(missing)} of {len(prompts) * n} images missing in {folder} (first: "
                         f"{', '.join(missing[:5])}); run generate with the same --prompts and --n first")


def _judge_chunk(chunk: list[tuple[BenchPrompt, int]], folder: Path, judge, parse_retries: int) -> list[dict]:
    from PIL import Image

    requests = []
    for p, j in chunk:
        with Image.open(image_path(folder, p.index, j)) as im:
            requests.append((judge_instruction(p), [im.convert("RGB")]))
    outcome, pending = [None] * len(chunk), list(range(len(chunk)))
    for attempt in range(1 + parse_retries):
        # A retry samples at some temperature: at 0 the judge would only repeat its malformed reply.
        replies = judge([requests[i] for i in pending], temperature=0.0 if attempt == 0 else 0.7)
        if len(replies) != len(pending):  # zip would silently drop images
            raise RuntimeError(f"the judge returned {len(replies)} replies for {len(pending)} requests")
        for i, reply in zip(pending, replies):
            outcome[i] = (reply, *parse_reply(reply, len(chunk[i][0].checkpoints)), attempt + 1)
        # Ask again when the reply was malformed; a request that failed was already retried by the client.
        pending = [i for i in pending if outcome[i][3] and outcome[i][0] is not None]
        if not pending:
            break
    return [dict(index=p.index, image=j, file=image_path(folder, p.index, j).name, prompt=p.prompt, theme=p.theme,
                 subtheme=p.subtheme, checkpoints=[list(c) for c in p.checkpoints], scores=scores, error=error,
                 analysis=analysis, attempts=attempts, reply=reply)
            for (p, j), (reply, scores, analysis, error, attempts) in zip(chunk, outcome)]


def evaluate(prompts: list[BenchPrompt], images: str | os.PathLike, results: str | os.PathLike, judge, *, n: int = 4,
             chunk: int = 32, parse_retries: int = 2, retry_failed: bool = False) -> dict:
    """Judge every image that RESULTS does not hold yet, appending one JSON line per image. Returns this run's counts.
    `judge(requests, temperature) -> replies` takes mllm-style (text, [image]) requests; None means a failed request."""
    images, results = Path(images), Path(results)
    require_images(images, prompts, n)
    settings = images / "generate.json"
    if settings.exists() and json.loads(settings.read_text()).get("prompts") != prompts_fingerprint(prompts):
        raise SystemExit(f"the images in {images} were generated from other prompts; pass the same --prompts")
    done = read_results(results)
    by_index = {p.index: p.prompt for p in prompts}
    clash = [i for (i, _), record in done.items() if i in by_index and record.get("prompt") != by_index[i]]
    if clash:
        raise SystemExit(f"{results} holds judgments of other prompts (index {clash[0]}); use another --results")
    todo = [(p, j) for p in prompts for j in range(n)
            if (p.index, j) not in done or (retry_failed and done[(p.index, j)].get("scores") is None)]
    print(f"evaluate: {len(prompts) * n - len(todo)} images already judged, {len(todo)} to go -> {results}")
    results.parent.mkdir(parents=True, exist_ok=True)
    if results.exists() and results.stat().st_size:
        with open(results, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")  # end the line a kill cut short, so the next record starts a line of its own
    counts = {"judged": 0, "failed": 0}
    with open(results, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc="evaluate", unit="img") as bar:
        for part in _batched(todo, chunk):
            for record in _judge_chunk(part, images, judge, parse_retries):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()  # on disk image by image: a killed run loses at most the chunk in flight
                counts["failed" if record["scores"] is None else "judged"] += 1
            bar.update(len(part))
    if counts["failed"]:
        print(f"evaluate: {counts['failed']} judgments failed; they are recorded, left out of the accuracy and "
              "counted in the report. Rerun with --retry-failed to ask again.")
    return counts


# ======================================================================================================================
# report: pooled accuracy per sub-criterion, primary dimension and theme; overall = mean of the 10 primaries
# ======================================================================================================================
def load_result_records(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    records = list(read_results(path).values())
    if not records:
        raise SystemExit(f"no judge results in {path}")
    for r in records:
        names, scores = [c[0] for c in r.get("checkpoints", [])], r.get("scores")
        if any(name not in SUB_CRITERIA for name in names) or "theme" not in r or (
                scores is not None and (len(scores) != len(names) or any(s not in (0, 1) for s in scores))):
            raise SystemExit(f"{path}: malformed record for image {r.get('file', r.get('index'))}")
    return records


def summarize(records: list[dict]) -> dict:
    """Pooled accuracy of a group = its correct checkpoints / all its checkpoints, over every judged image. So each
    checkpoint weighs the same: a rare sub-criterion moves its primary less than a mean of sub-criterion means would.
    Failed judgments are counted and left out."""
    tallies = {"sub_criteria": defaultdict(lambda: [0, 0]), "primary": defaultdict(lambda: [0, 0]),
               "themes": defaultdict(lambda: [0, 0])}
    failed = 0
    for record in records:
        if record["scores"] is None:
            failed += 1
            continue
        for (name, _), score in zip(record["checkpoints"], record["scores"]):
            for table, key in ("sub_criteria", name), ("primary", SUB_CRITERIA[name].primary), ("themes", record["theme"]):
                tallies[table][key][0] += score
                tallies[table][key][1] += 1
    order = {"sub_criteria": list(SUB_CRITERIA), "primary": PRIMARIES, "themes": list(THEMES_ZH)}
    summary = {"images": len(records), "judged": len(records) - failed, "failed": failed}
    for table, counts in tallies.items():
        keys = [k for k in order[table] if k in counts] + sorted(k for k in counts if k not in order[table])
        summary[table] = {k: {"accuracy": 100.0 * counts[k][0] / counts[k][1], "correct": counts[k][0],
                              "checkpoints": counts[k][1]} for k in keys}
    primaries = [v["accuracy"] for v in summary["primary"].values()]
    summary["overall"] = sum(primaries) / len(primaries) if primaries else None
    summary["primaries_scored"] = len(primaries)  # under 10, the overall is not comparable with published numbers
    return summary


def markdown_table(summaries: dict[str, dict]) -> str:
    """One accuracy column per run and, with two or more runs, a delta column per run against the first (the base)."""
    names = list(summaries)
    head = ["Dimension", *names, *[f"Δ {name}" for name in names[1:]]]

    def row(label, get):
        values = [get(s) for s in summaries.values()]
        cells = ["n/a" if v is None else f"{v:.2f}" for v in values]
        cells += ["n/a" if v is None or values[0] is None else f"{v - values[0]:+.2f}" for v in values[1:]]
        return f"| {label} | " + " | ".join(cells) + " |"

    def rows(labels_and_getters):  # rows nobody has data for (a small prompt subset) are left out
        return [row(label, get) for label, get in labels_and_getters if any(get(s) is not None for s in summaries.values())]

    def accuracy(table, key):
        return lambda s: s[table][key]["accuracy"] if key in s[table] else None

    counts = [f"{s['images']} ({s['failed']} failed)" for s in summaries.values()] + [""] * (len(names) - 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| Images (failed judgments, not scored) | " + " | ".join(counts) + " |",
             row("**Overall**", lambda s: s["overall"])]
    for primary in PRIMARIES:
        lines.append(row(f"**{primary}**", accuracy("primary", primary)))
        subs = [name for name, c in SUB_CRITERIA.items() if c.primary == primary]
        lines += rows((f"&nbsp;&nbsp;{sub}", accuracy("sub_criteria", sub)) for sub in subs if len(subs) > 1)
    themes = dict.fromkeys(t for s in summaries.values() for t in s["themes"])
    lines += rows((f"Theme: {theme}", accuracy("themes", theme)) for theme in themes)
    partial = [name for name, s in summaries.items() if s["primaries_scored"] < len(PRIMARIES)]
    if partial:
        lines.append(f"\nThe overall of {', '.join(partial)} averages fewer than {len(PRIMARIES)} primary dimensions.")
    return "\n".join(lines) + "\n"


def report(paths: list[str], names: list[str] | None = None, out: str | None = None) -> dict[str, dict]:
    """Summarize each results file; write OUT.json and OUT.md (default: report.* or compare.* beside the first)."""
    if names and len(names) != len(paths):
        raise SystemExit(f"--names has {len(names)} entries for {len(paths)} results files")
    names = names or [Path(p).resolve().parent.name for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]  # two runs in folders of the same name: the paths tell them apart
    summaries = {name: summarize(load_result_records(p)) for name, p in zip(names, paths)}
    out = str(out or Path(paths[0]).parent / ("report" if len(paths) == 1 else "compare"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summaries)
    Path(out + ".json").write_text(json.dumps(summaries, indent=1, ensure_ascii=False), encoding="utf-8")
    Path(out + ".md").write_text("# UniGenBench\n\n" + table, encoding="utf-8")
    print(f"{table}\nwrote {out}.json and {out}.md")
    return summaries


# ======================================================================================================================
# Command line
# ======================================================================================================================
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    g = commands.add_parser("generate", help="N images per prompt into OUT/{index}_{j}.png")
    g.add_argument("--model", required=True, help='FLUX model id or folder; "tiny" for a random test model')
    g.add_argument("--out", required=True)
    g.add_argument("--lora", help="LoRA checkpoint folder from training (a pytorch_lora_weights.safetensors inside)")
    for flag, default in ("--steps", 28), ("--resolution", 512), ("--batch-size", 4), ("--seed", 0):
        g.add_argument(flag, type=int, default=default)
    g.add_argument("--guidance", type=float, default=3.5)

    e = commands.add_parser("evaluate", help="judge every image, appending to --results (default IMAGES/results.jsonl)")
    e.add_argument("--images", required=True)
    e.add_argument("--results")
    judges = e.add_mutually_exclusive_group(required=True)
    judges.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    judges.add_argument("--judge-local", help='Qwen2.5-VL model id or folder, run in-process; "tiny" for a random one')
    e.add_argument("--judge-model", help="the model name the server expects (required with --judge-url)")
    e.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable that holds the API key")
    for flag, default in (("--workers", 8), ("--retries", 3), ("--max-tokens", 1024), ("--chunk", 32),
                          ("--parse-retries", 2), ("--batch-size", 8)):
        e.add_argument(flag, type=int, default=default)
    e.add_argument("--timeout", type=float, default=120.0)
    e.add_argument("--retry-failed", action="store_true", help="judge again the images whose judgment failed")

    for sub in g, e:
        sub.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompts.jsonl or an official UniGenBench CSV")
        sub.add_argument("--n", type=int, default=4, help="images per prompt")

    r = commands.add_parser("report", help="accuracy tables; several results files side by side, with deltas")
    r.add_argument("results", nargs="+")
    r.add_argument("--names", nargs="+", help="column names (default: the folder name of each results file)")
    r.add_argument("--out", help="output path without extension; .json and .md are written")

    args = parser.parse_args(argv)
    if args.command == "generate":
        generate(load_prompts(args.prompts), args.out, args.model, n=args.n, lora=args.lora, steps=args.steps,
                 resolution=args.resolution, guidance=args.guidance, batch_size=args.batch_size, seed=args.seed)
    elif args.command == "evaluate":
        if args.judge_url and not args.judge_model:
            parser.error("--judge-model is required with --judge-url")
        prompts = load_prompts(args.prompts)
        require_images(args.images, prompts, args.n)  # before a judge model takes minutes to load
        judge = (server_judge(args.judge_url, args.judge_model, api_key_env=args.api_key_env, workers=args.workers,
                              timeout=args.timeout, retries=args.retries, max_tokens=args.max_tokens)
                 if args.judge_url else local_judge(args.judge_local, max_tokens=args.max_tokens,
                                                    batch_size=args.batch_size))
        evaluate(prompts, args.images, args.results or Path(args.images) / "results.jsonl", judge, n=args.n,
                 chunk=args.chunk, retry_failed=args.retry_failed,
                 parse_retries=args.parse_retries if args.judge_url else 0)  # greedy local decoding would only repeat
    else:
        report(args.results, args.names, args.out)


if __name__ == "__main__":
    main()
