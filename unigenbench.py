"""UniGenBench: does a text-to-image model draw what the prompt asks for? (Pref-GRPO, arXiv 2508.20751)

Each prompt carries 1-10 checkpoints ("two pandas" -> Attribute - Quantity) that a multimodal judge scores 0 or 1 per
image (the official judge prompt and parsing); overall = the mean of the 10 primary dimensions. Each step resumes:

  python unigenbench.py generate --model black-forest-labs/FLUX.1-dev --prompts test_prompts_en.csv --out runs/ugb/base
  vllm serve CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1 --served-model-name QwenVL --port 8000   # the judge
  python unigenbench.py evaluate --images runs/ugb/base --prompts test_prompts_en.csv --judge-url http://HOST:8000/v1
  python unigenbench.py report runs/ugb/base/results.jsonl [runs/ugb/trained/results.jsonl ...]

  python unigenbench.py generate --model tiny --out runs/ugb/tiny        # a smoke test: tiny random FLUX, a minute
  python unigenbench.py evaluate --images DIR --judge-local CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1  # or
  python unigenbench.py evaluate --images DIR --judge-fn my_judges:judge    # your fn(texts, images) -> replies
Needs pref_grpo.py beside it for generate and --judge-local, and prompts.jsonl (the default --prompts) for our prompts.
"""
from __future__ import annotations

import argparse
import ast
import base64
import csv
import hashlib
import http.client
import importlib
import io
import json
import os
import re
import sys
import threading
import urllib.request
import warnings
from collections import defaultdict, namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.jsonl")


# ======== The official judge input, verbatim (byte for byte, leading spaces included) from CodeGoat24/UniGenBench
# eval/src/eval_common.py at commit 49d0bce: SYSTEM_PROMPT_EN_TEMPLATE / SYSTEM_PROMPT_ZH_TEMPLATE, EXPLANATION_DICT_EN /
# EXPLANATION_DICT_ZH and the blocks' headers ("Defination" sic). UniGenBench, Copyright (C) 2025 Tencent, licensed
# under CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). The UniGenBench eval models were trained on this input.
TEMPLATE_EN = ("You are a precise and objective English-language image description system. I will provide you with a prompt for image generation, as well as the corresponding generated image. You will be given a set of evaluation criteria (checkpoints) and their explanations that define the relevance between the prompt and the image. You must evaluate whether the generated image fulfills the requirements implied by each checkpoint in the prompt.\n\n"
               "            For each image, follow the steps below in order:\n\n"
               "            1. The prompt for the generated image is: 「{prompt}」. You are to analyze the image content in detail from the angles specified in {testpoint}. Detailed definitions of these checkpoints are provided here: {explanation}. The specific description of each checkpoint in the context of the prompt is: {test_explanation}. You must analyze whether the image meets the requirements for each checkpoint individually.\n\n"
               "            2. Based on the above analysis, determine whether the generated image satisfies each checkpoint in terms of its visual alignment with the prompt. If the image meets the requirements of a checkpoint, assign a score of 1 to that checkpoint; otherwise, assign a score of 0.\n\n"
               "            Constraints:\n"
               "            - Only describe content that is directly visible; do not interpret, speculate, or infer any background story.\n"
               "            - Focus solely on visually verifiable details.\n"
               "            - Omit any uncertain or ambiguous elements.\n"
               "            - Even if mentioned in the input, do not describe abstract entities, emotions, or speculative ideas.\n\n"
               "            Please strictly follow the output format below:\n\n"
               "            <description>\n"
               "                <prompt>{prompt}</prompt>\n"
               "                <checkpoint>{testpoint}</checkpoint>\n"
               "                <analysis>A list using square brackets `[]`, where each element is a string of detailed analysis corresponding to one checkpoint, as required in Step 1. **Ensure the list length matches the number of checkpoints**. Each element should be a string representing the analysis for that specific checkpoint.</analysis>\n"
               "                <score>A list using square brackets `[]`, where each element is a binary score (0 or 1) corresponding to a checkpoint, as required in Step 2. **Ensure the list length matches the number of checkpoints**. Each element should be either 0 or 1, indicating whether the checkpoint was satisfied.</score>\n"
               "            </description>\n"
               "            ")
TEMPLATE_ZH = ("你是一个精确且客观的中文图像描述系统。我会给你一段生成图像的提示词，以及对应的生成图像，同时对于生成图像与提示词之间相关性的考点及对应说明，你需要逐个考点来判断生成的图像是否遵从了提示词中所包含的对应考点要求。\n\n"
               "        针对每张图像，你需要按照顺序完成如下的任务：\n"
               "        1. 这张生成图像对应的提示词为「{prompt}」，你需要根据{testpoint}中的这些角度逐个对图像内容进行更进一步的详细分析，考点的详细说明如下：{explanation}，各个考点在这条prompt中对应的描述说明如下：{test_explanation}, 你需要根据考点逐一判断生成图像是否满足了考点对应的要求\n"
               "        2. 综合上述回答，你需要逐个考点判断生成的图像在考点关注维度上是否符合输入的prompt，如果满足要求则该考点得分为1，否则为0\n\n"
               "        约束条件：\n"
               "        - 仅描述直接可见的内容；不要进行解读、推测或暗示背景故事。\n"
               "        - 专注于能够确定性陈述的视觉细节。\n"
               "        - 省略不确定或不清晰的细节。\n"
               "        - 即使输入中存在，也不要描述抽象实体、情感或推测。\n\n"
               "        请严格遵循以下输出格式：\n\n"
               "        <description>\n"
               "            <prompt>{prompt}</prompt>\n"
               "            <checkpoint>{testpoint}</checkpoint>\n"
               "            <analysis>按照步骤1对于给定考点进行逐项详细分析，格式为一个方括号列表，**确保列表的长度与考点的数量相等**，每个元素为一个字符串，表示对于对应考点的分析</analysis>\n"
               "            <score>按照步骤2逐个对考点进行打分，格式为一个方括号列表，**确保列表的长度与考点的数量相等**，每个元素为0或者1，表示对应考点是否完成</score>\n"
               "        </description>\n"
               "        ")
EXPLANATIONS_EN = {
    "Relationship - Comparison": "Comparison of attributes between two entities",
    "Relationship - Composition": "An entity is composed of one or more other entities",
    "Relationship - Inclusion": "A container contains an entity; the container can also be a plane, e.g., a snake in a painting on a wall",
    "Relationship - Similarity": "Existence of similarities between different entities",
    "Compound - Imagination": "Things that are impossible in real life",
    "Compound - Feature Matching": "Different entities possess different types of attribute features",
    "Attribute - Size": "Assessment of the subject's size, height, length, thickness, width, or tallness/shortness",
    "Attribute - Expression": "Distinguishing expressions from facial actions; expressions must convey a clear emotion",
    "Attribute - Quantity": "Focuses on the challenge of depicting three or more items accurately",
    "Attribute - Material": "Evaluation of different material types and textures",
    "Attribute - Color": "Assessment of different colors", "Attribute - Shape": "Assessment of different shapes",
    "Entity Layout - Two-Dimensional Space": "Arrangement and positioning of entities in two-dimensional space",
    "Entity Layout - Three-Dimensional Space": "Arrangement and positioning of entities in three-dimensional space",
    "Action - Full-body (Character/Anthropomorphic)": "Full-body actions by characters or anthropomorphized entities, such as running, diving, breakdancing, swinging, or hanging upside down",
    "Action - Hand (Character/Anthropomorphic)": "Focuses on hand structure—checking if fingers are missing, broken, or distorted",
    "Action - Animal": "Actions performed by animals",
    "Action - Contact Interaction": "Physical interactions between entities",
    "Action - Non-contact Interaction": "For example, two people making eye contact—testing if the model can accurately depict such interactions",
    "Action - State": "A sustained state of an entity, typically expressed with a verb",
    "Grammar - Negation": "Tests the model's understanding of negation grammar",
    "Grammar - Pronoun Reference": "Tests if the model can resolve ambiguous pronoun references correctly",
    "Grammar - Consistency": "Evaluation of shared attributes among entities",
    "World Knowledge": "Covers knowledge of celebrities, architecture, basic domain knowledge, and internet slang. Celebrities with modern copyright risk should be avoided",
    "Style": "Art, painting, photography, design styles, and corresponding artist names",
    "Text Generation": "The text content model needed to accurately generate without any omissions or extra words",
    "Logical Reasoning": "Requires the model to deeply understand the intent and perform reasoning"}
EXPLANATIONS_ZH = {
    "关系-比较关系": "两者的属性对比", "关系-构成关系": "一个实体由另一种或几种实体构成", "关系-包含关系": "容器对实体的包含关系，容器也可以是平面的，比如：墙上的画里有一只蛇",
    "关系-相似关系": "不同实体中存在的相似关系", "复合考点-想象力": "现实生活中不可能发生的事情", "复合考点-不同实体特征匹配": "不同实体拥有不同类的属性特征", "实体布局-三维空间": "对于三维空间实体的摆放布局",
    "实体布局-二维空间": "对于二维空间实体的摆放布局", "属性-大小": "对主体 大小/高低/长短/粗细/宽窄/高矮", "属性-表情": "区分表情和脸部动作，脸部动作组成表情，但表情是一定要体现出某种情绪的。",
    "属性-数量": "重点考察三个或三个以上的数字难点", "属性-材质": "考察不同材质", "属性-颜色": "考察不同颜色", "属性-形状": "考察不同形状",
    "动作-人物/拟人全身动作": "人物或拟人全身性的动作，比如奔跑、跳水、跳街舞、荡秋千、倒挂金钩等", "动作-人物/拟人手部动作": "针对手部结构的考点，考核手指是否有缺失、崩坏等问题", "动作-动物动作": "动物的动作",
    "动作-实体间有接触互动": "各种实体间的有接触互动", "动作-实体间无接触互动": "比如两个人对视，考核模型能否把对视关系画对", "动作-状态": "实体持续的状态，一般是一个动词。",
    "语法-否定": "考察模型对于否定语法的掌握程度", "语法-代词指代": "这里的代词通常是有一些迷惑性的，考察模型能否正确对应", "语法-统一性": "实体共同属性的考察",
    "世界知识": "名人、建筑、基础的领域知识、网络流行语。其中名人不要使用当代有版权风险的名人", "风格": "艺术、绘画、摄影、设计风格，及对应艺术家名称", "逻辑推理": "需要模型深入理解意图并进行一定的推理",
    "文本生成": "考察模型能否准确生成不同语言，字体和长、短文字"}
HEADERS = {"en": ("Checkpoints Defination", "Checkpoints Description"), "zh": ("考点说明", "考点描述说明")}


# ======== Taxonomy: 27 sub-criteria in 10 primary dimensions (leaderboard order); 5 themes with 20 sub-themes
Criterion = namedtuple("Criterion", "primary zh")  # its primary dimension, its name in the zh files and zh prompt
ZH_NAMES = {  # the 27 sub-criteria in leaderboard order, with their Chinese names
    "Style": "风格", "World Knowledge": "世界知识", "Attribute - Color": "属性-颜色", "Attribute - Expression": "属性-表情",
    "Attribute - Material": "属性-材质", "Attribute - Quantity": "属性-数量", "Attribute - Shape": "属性-形状",
    "Attribute - Size": "属性-大小", "Action - Animal": "动作-动物动作", "Action - Contact Interaction": "动作-实体间有接触互动",
    "Action - Full-body (Character/Anthropomorphic)": "动作-人物/拟人全身动作",
    "Action - Hand (Character/Anthropomorphic)": "动作-人物/拟人手部动作", "Action - Non-contact Interaction": "动作-实体间无接触互动",
    "Action - State": "动作-状态", "Relationship - Comparison": "关系-比较关系", "Relationship - Composition": "关系-构成关系",
    "Relationship - Inclusion": "关系-包含关系", "Relationship - Similarity": "关系-相似关系",
    "Compound - Feature Matching": "复合考点-不同实体特征匹配", "Compound - Imagination": "复合考点-想象力", "Grammar - Consistency": "语法-统一性",
    "Grammar - Negation": "语法-否定", "Grammar - Pronoun Reference": "语法-代词指代",
    "Entity Layout - Three-Dimensional Space": "实体布局-三维空间", "Entity Layout - Two-Dimensional Space": "实体布局-二维空间",
    "Logical Reasoning": "逻辑推理", "Text Generation": "文本生成"}
SHORT = {"Entity Layout": "Layout", "Text Generation": "Text"}  # the leaderboard's column names
SUB_CRITERIA = {name: Criterion(SHORT.get(p := name.split(" - ")[0], p), zh) for name, zh in ZH_NAMES.items()}
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
    "Film & Story": {"Animation": "动画", "Realism": "写实", "Sci-Fi": "科幻"}}
# Older rows of the official CSVs use other labels; these are the ones a case-insensitive match does not catch.
SUBTHEME_ALIASES = {"sculptural art": "Sculptural (Three-dimensional) Art", "space design": "Spatial Design",
                    "three-dimensional art": "Sculptural (Three-dimensional) Art", "mapping-content mapping":
                    "Content Illustration", "creativity divergence-imagination divergence": "Imaginative Thinking"}
SUBJECTS_ZH = {"人物": "Character", "动物": "Animal", "其他实体": "Other Entity", "场景": "Scene", "拟人": "Anthropomorphic"}
KEYS_ZH = {"一级垂类": "Primary Categories", "二级垂类": "Secondary Categories", "主体": "Subjects",  # zh JSON keys
           "句式": "Sentence Structure", "考点": "Testpoints", "考点对应描述": "Testpoint Description"}


# ======== Prompts: the official CSVs (en/zh, short/long) and our JSON records, read into one normalised form
# checkpoints: (sub-criterion, the part of the prompt it tests); lang "zh" (prompt_zh, 考点 keys): the zh judge prompt.
BenchPrompt = namedtuple("BenchPrompt", "index prompt theme subtheme subject checkpoints lang", defaults=["en"])


class PromptSet(list):  # the prompts of one file, and its name (generate records it, so a wrong --prompts is caught)
    name = ""


def to_bench_prompt(index: int, text: str, sub_dims, where: str, zh: bool = False) -> BenchPrompt:
    """Names (English or Chinese, any spacing and case) -> the taxonomy's; an unknown sub-theme label is kept as is."""
    fields = {KEYS_ZH.get(k, k): v for k, v in sub_dims.items()} if isinstance(sub_dims, dict) else {}
    names, descriptions = fields.get("Testpoints"), fields.get("Testpoint Description")
    if not (isinstance(text, str) and text.strip() and isinstance(names, list) and isinstance(descriptions, list)
            and names and len(names) == len(descriptions)):
        sys.exit(f"error: {where}: needs a prompt and non-empty Testpoints / Testpoint Description of equal length")
    key = lambda label: re.sub(r"\s+", "", str(label)).lower()  # noqa: E731
    criteria = {key(n): n for n in SUB_CRITERIA} | {key(c.zh): n for n, c in SUB_CRITERIA.items()}
    if unknown := [n for n in names if key(n) not in criteria]:
        sys.exit(f"error: {where}: unknown checkpoint {unknown[0]!r} (not one of the 27 UniGenBench sub-criteria)")
    theme = str(fields.get("Primary Categories", "")).strip()
    theme = ({t.lower(): t for t in THEMES_ZH} | {zh: t for t, zh in THEMES_ZH.items()}).get(theme.lower(), theme)
    label = raw = str(fields.get("Secondary Categories", "")).strip()
    for prefix in (theme, THEMES_ZH.get(theme, theme)):  # "Art-Graphic Art", "艺术-平面艺术": drop the theme
        label = label[len(prefix) + 1:] if label.lower().startswith(prefix.lower() + "-") else label
    labels = {k.lower(): name for name, zh in SUBTHEMES.get(theme, {}).items() for k in (name, zh)} | SUBTHEME_ALIASES
    subtheme, subject = labels.get(label.lower(), raw), str(fields.get("Subjects", "")).strip()
    return BenchPrompt(index, text, theme, subtheme, SUBJECTS_ZH.get(subject, subject),
                       tuple((criteria[key(n)], str(d)) for n, d in zip(names, descriptions)),
                       "zh" if zh or "考点" in sub_dims else "en")


def read_rows(path: Path, text: str):
    """(index, prompt, sub_dims, where, zh) per JSON record (one a line, or a list of them) or official CSV row."""
    if text.lstrip()[:1] in ("[", "{"):
        try:  # a JSON list of records: one record a line from here on, as in a JSON-lines file
            text = "\n".join(map(json.dumps, json.loads(text))) if text.lstrip()[0] == "[" else text
        except json.JSONDecodeError as e:
            sys.exit(f"error: {path}:{e.lineno}: not a JSON list of prompt records ({e.msg})")
        for no, line in enumerate(text.splitlines(), 1):  # (line `no`, or record `no` of a list)
            try:
                if line.strip() and (row := json.loads(line)) is not None:
                    yield int(row["index"]), row.get("prompt"), row.get("sub_dims", row), f"{path.name}:{no}", 0
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                sys.exit(f"error: {path}:{no}: not a prompt record ({type(e).__name__}: {e})")
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    text_col = next((c for c in ("prompt_en", "prompt_zh", "prompt") if c in (columns := reader.fieldnames or [])), None)
    if "index" not in columns or not text_col or not (dims := next((c for c in columns if c.startswith("sub_dims")), 0)):
        sys.exit(f"error: {path}: expected JSON prompt records or an official CSV (columns index, prompt_en|prompt_zh, "
                 f"sub_dims_en|sub_dims_zh); got columns {columns}")
    for row in reader:
        if not (row["index"] or "").strip().isdigit() or row[dims] is None:
            sys.exit(f"error: {path}:{reader.line_num}: malformed row (index {row['index']!r})")
        where = f"{path.name} index {row['index']}"
        try:
            try:
                sub_dims = json.loads(row[dims])
            except json.JSONDecodeError:  # en_long index 509 lacks a comma between two strings (the official crashes)
                sub_dims = json.loads(re.sub(r'"\s+"', '", "', row[dims]))
                warnings.warn(f"{where}: repaired a missing comma in the checkpoint JSON")
        except json.JSONDecodeError as e:
            sys.exit(f"error: {where}: the checkpoint JSON is malformed ({e.msg} at char {e.pos})")
        yield int(row["index"]), row[text_col], sub_dims, where, text_col == "prompt_zh"


def load_prompts(path: str | os.PathLike = DEFAULT_PROMPTS) -> PromptSet:
    """The format is told by content, not by the file's extension; a BOM and CRLF line ends are dropped."""
    if not (path := Path(path)).is_file():
        sys.exit(f"error: --prompts {path}: " + ("a folder, not a prompt file" if path.is_dir() else "no such file" + (
            " (the default, beside unigenbench.py): pass an official UniGenBench CSV" * (path == DEFAULT_PROMPTS))))
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": the CSV reader sees quoted line breaks
            prompts = PromptSet(to_bench_prompt(*row) for row in read_rows(path, f.read()))
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: --prompts {path}: cannot read it as UTF-8 text ({type(e).__name__})")
    if not prompts or len({p.index for p in prompts}) != len(prompts):
        sys.exit(f"error: {path}: no prompts, or a repeated index (image files are named by index)")
    prompts.name = path.name
    return prompts


def prompts_fingerprint(prompts: list[BenchPrompt]) -> str:
    return hashlib.sha1("\n".join(f"{p.index}\t{p.prompt}" for p in prompts).encode()).hexdigest()[:12]


def judge_prompt(p: BenchPrompt) -> str:
    """The judge's text exactly as the official eval builds it, in the prompt set's language."""
    names = [SUB_CRITERIA[name].zh if p.lang == "zh" else name for name, _ in p.checkpoints]
    explanations, (head, desc_head) = EXPLANATIONS_ZH if p.lang == "zh" else EXPLANATIONS_EN, HEADERS[p.lang]
    return (TEMPLATE_ZH if p.lang == "zh" else TEMPLATE_EN).format(
        prompt=p.prompt, testpoint=repr(names),
        explanation=head + ":「" + "".join(f"\n{n}: {explanations[n]}" for n in names) + "\n」",
        test_explanation=desc_head + ":「" + "".join(f"\n{n}: {d}" for n, (_, d) in zip(names, p.checkpoints)) + "\n」")


def parse_reply(reply: str, n: int) -> tuple[list[int] | None, list | None, str | None]:
    """The official parse: the first <analysis>(.*?)</analysis>, <score>(.*?)</score>, Python lists of n; pass: == 1."""
    found = [re.search(rf"<{tag}>(.*?)</{tag}>", reply, re.DOTALL) for tag in ("analysis", "score")]
    if not all(found):
        return None, None, "unparsable reply: no <analysis>...</analysis> or no <score>...</score>"
    try:
        analysis, scores = (ast.literal_eval(m.group(1).strip()) for m in found)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None, None, "unparsable reply: <analysis> or <score> is not a Python list"
    if not (isinstance(analysis, list) and isinstance(scores, list) and len(analysis) == len(scores) == n):
        got = [len(x) if isinstance(x, list) else type(x).__name__ for x in (analysis, scores)]
        return None, None, f"unparsable reply: expected {n} analyses and {n} scores, got {got[0]} and {got[1]}"
    return [int(s == 1) for s in scores], analysis, None


# ======== The judge: an OpenAI-compatible server (vLLM), a function of your own, or a Qwen-VL in this process
# judge([(text, image, n checkpoints)]) yields (position, (reply, scores, analysis, error, attempts)) as judgments end.
# The HTTP client copies pref_grpo.py's on purpose: evaluate and report need neither torch nor pref_grpo.py.
RETRY_BACKOFF_S, MAX_BACKOFF_S = 2.0, 10.0  # wait before attempt 2, doubling up to the official client's cap


def scrub(text, key_env: str) -> str:  # what users see and results keep: one line, never the key (servers echo)
    key = os.environ.get(key_env)
    return " ".join((str(text).replace(key, "***") if key else str(text)).split())[:300]


def server_judge(url: str, model: str = "QwenVL", *, key_env: str = "OPENAI_API_KEY", workers: int = 8, retries: int = 10,
                 timeout: float = 300.0, max_tokens: int = 4096, temperature: float | None = None):
    """The official request (one user message: the image, JPEG quality 95 base64, then the text; max_tokens 4096) and no
    sampling field (the official `"do_sample": false` is one vLLM ignores: docs/unigenbench.md); checks the server."""
    key, url = os.environ.get(key_env), url.rstrip("/")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/models", headers=headers), timeout=30) as r:
            served = [m["id"] for m in json.loads(r.read())["data"]]
    except urllib.request.HTTPError as e:
        hint = (f" (check ${key_env}, see --judge-api-key-env)" if e.code in (401, 403) else
                " (is --judge-url missing /v1?)" if e.code == 404 and not url.endswith("/v1") else "")
        sys.exit(scrub(f"error: --judge-url {url} answered HTTP {e.code} on /models{hint}", key_env))
    except (OSError, http.client.HTTPException) as e:
        sys.exit(scrub(f"error: --judge-url: judge server {url} is not reachable: {getattr(e, 'reason', e)}", key_env))
    except (ValueError, LookupError, TypeError):
        served = []  # a reachable server with an odd /models reply is still usable
    if served and model not in served:
        sys.exit(scrub(f"error: --judge-model {model!r} is not served by {url}; it serves: {', '.join(served)}", key_env))
    def ask(text, image, n, stop):  # up to 1 + `retries` POSTs until a reply parses (official: 11)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=95)
        content = [{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(
            buf.getvalue()).decode()}}, {"type": "text", "text": text}]
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                           **({} if temperature is None else {"temperature": temperature})}).encode()
        for attempt in range(1, retries + 2):
            reply, retriable, scores, analysis = None, True, None, None
            try:
                req = urllib.request.Request(url + "/chat/completions", body, headers, method="POST")
                with urllib.request.urlopen(req, timeout=timeout) as resp:  # the timeout bounds connect and every read
                    reply = str(json.loads(resp.read())["choices"][0]["message"]["content"])
                scores, analysis, error = parse_reply(reply, n)
            except urllib.request.HTTPError as e:  # 5xx, 408 and 429 may pass on a later try; other 4xx are rejected again
                error, retriable = f"HTTP {e.code}", e.code >= 500 or e.code in (408, 429)
            except (OSError, http.client.HTTPException) as e:
                why = getattr(e, "reason", e)
                error = f"timeout after {timeout:g} s" if isinstance(why, TimeoutError) else f"connection failed: {why}"
            except (ValueError, LookupError, TypeError) as e:
                error = f"unreadable server reply ({type(e).__name__})"
            backoff = min(RETRY_BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S) if reply is None else 0  # let it recover
            if scores is not None or not retriable or attempt > retries or stop.wait(backoff):
                return reply, scores, analysis, scrub(error, key_env) if error else None, attempt
    def judge(requests, pool=ThreadPoolExecutor(max(1, workers))):  # one pool for the judge's life
        stop = threading.Event()
        futures = {pool.submit(ask, *r, stop): i for i, r in enumerate(requests)}
        try:
            yield from ((futures[f], f.result()) for f in as_completed(futures))
        finally:  # stopped early (Ctrl-C, a broken judge): requests not sent are dropped, retries end
            stop.set()
            for f in futures:
                f.cancel()
    judge.where = f"--judge-url {url}"
    return judge


def function_judge(flag: str, spec: str, max_tokens: int = 4096):
    """--judge-fn module:function (yours: fn(texts, images) -> one reply per image), or --judge-local (a Qwen-VL)."""
    if flag == "--judge-local":
        import pref_grpo  # late import: torch and transformers load slowly, and the other judges do not need them
        vlm = pref_grpo.load_local_vlm(spec, what=flag)
        def fn(texts, images):
            return pref_grpo.local_chat(vlm, [(t, [i]) for t, i in zip(texts, images)], max_tokens=max_tokens)
    else:
        module, _, name = spec.partition(":")
        sys.path[:0] = [] if os.getcwd() in sys.path else [os.getcwd()]
        try:
            if not callable(fn := getattr(importlib.import_module(module), name)):
                raise TypeError(f"{name} is a {type(fn).__name__}, not a function")
        except (ImportError, ValueError, AttributeError, TypeError) as e:
            sys.exit(f"error: {flag} {spec}: {e} (expected module:function, e.g. my_judges:judge)")

    def judge(requests):
        replies = fn([t for t, _, _ in requests], [i for _, i, _ in requests])
        if len(replies := list(replies) if isinstance(replies, (list, tuple)) else [replies]) != len(requests):
            sys.exit(f"error: {flag} {spec} returned {len(replies)} replies for {len(requests)} images, not one each")
        return enumerate((str(r), *parse_reply(str(r), n), 1) for r, (_, _, n) in zip(replies, requests))
    judge.where = f"{flag} {spec}"
    return judge


# ======== generate: n images per prompt with the official FLUX.1-dev settings; images already on disk are kept
def image_path(folder: str | os.PathLike, index: int, j: int, suffix: str = "png") -> Path:
    return Path(folder) / f"{index}_{j}.{suffix}"


def generation_dtype(device: str, dtype: str = "fp16") -> str:
    """fp16 on CUDA as the official (inference/flux_en_multi_node_inference.py, lines 66-75), or bf16; CPU: float32."""
    return {"fp16": "float16", "bf16": "bfloat16"}[dtype] if device == "cuda" else "float32"


def check_writable(path: Path, flag: str, folder: bool = False) -> None:
    """Checked before any model loads: no file where a folder goes (or the reverse), and write access."""
    if path.exists() and path.is_dir() != folder:
        sys.exit(f"error: {flag} {path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}")
    base = next(p for p in (path, *path.resolve().parents) if p.exists())
    if why := "a file" if base != path and not base.is_dir() else None if os.access(base, os.W_OK) else "read-only":
        sys.exit(f"error: {flag} {path}: cannot write there ({base} is {why})")


def generate(prompts: list[BenchPrompt], out: str | os.PathLike, model: str, *, n: int = 4, lora: str | None = None,
             steps: int | None = None, resolution: int | None = None, guidance: float = 3.5, batch_size: int = 4,
             seed: int = 3407, max_sequence_length: int = 512, dtype: str = "fp16", cfg_scale: float = 1.0) -> int:
    """OUT/{index}_{j}.png for each prompt and j < n not there yet, image j with seed `seed + j` (as the official)."""
    steps, resolution = steps or (4 if model == "tiny" else 30), resolution or (32 if model == "tiny" else 1024)
    check_writable(out := Path(out), "--out", folder=True)
    if lora and not (Path(lora) / "pytorch_lora_weights.safetensors").is_file():
        sys.exit(f"error: --lora {lora}: not a checkpoint folder holding pytorch_lora_weights.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(model=model, lora=str(Path(lora).resolve()) if lora else None, steps=steps, resolution=resolution,
                    guidance=guidance, cfg_scale=cfg_scale, seed=seed, max_sequence_length=max_sequence_length,
                    shift="the model's own", dtype=dtype, n=n, prompts=prompts_fingerprint(prompts),
                    prompt_set=getattr(prompts, "name", "?"))
    old = json.loads((out / "generate.json").read_text()) if (out / "generate.json").exists() else {}
    if (changed := [k for k in settings if old and k not in ("n", "prompt_set") and old.get(k) != settings[k]]) and any(
            out.glob("*.png")):  # resuming would silently blend two runs
        sys.exit(f"error: --out {out} holds images made with other settings ({', '.join(changed)}); use another --out")
    (out / "generate.json").write_text(json.dumps(settings, indent=1))
    todo = [(p, j) for p in prompts for j in range(n) if not image_path(out, p.index, j).exists()]
    print(f"generate: {len(prompts) * n - len(todo)} images already in {out}, {len(todo)} to make "
          f"({resolution} px, {steps} steps, guidance {guidance:g}, seeds {seed}..{seed + n - 1})")
    if not todo:
        return 0
    import torch  # late imports: torch and diffusers load slowly, and evaluate / report do not need them
    import pref_grpo
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pref_grpo.load_pipeline(model, device, getattr(torch, generation_dtype(device, dtype)))
    pipe.load_lora_weights(settings["lora"]) if lora else None
    for start in tqdm(range(0, len(todo), batch_size), desc="generate", unit="batch"):
        chunk = todo[start:start + batch_size]
        images = pref_grpo.generate_images(pipe, [p.prompt for p, _ in chunk], [seed + j for _, j in chunk],
                                           steps=steps, resolution=resolution, guidance=guidance, shift=None,
                                           max_sequence_length=max_sequence_length, batch_size=len(chunk), cfg_scale=cfg_scale)
        for (p, j), image in zip(chunk, images):  # via a .part file: a kill never leaves a truncated PNG behind
            image.save(part := f"{image_path(out, p.index, j)}.part", format="PNG")
            os.replace(part, image_path(out, p.index, j))
    return len(todo)


# ======== evaluate: one request per image with all its checkpoints; one JSON line per image, appended as it is done
def read_results(path: Path, what: str = "--results") -> dict[tuple[int, int], dict]:
    """Records by (index, image). A later line for the same image replaces an earlier one (see --retry-failed)."""
    if (path := Path(path)).is_dir():
        sys.exit(f"error: {what} {path} is a folder, not a results file (results.jsonl)")
    try:
        records, lines = {}, path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"error: {what} {path}: cannot read it ({type(e).__name__}: {e})")
    for line_no, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            records[(int(record["index"]), int(record["image"]))] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if line.strip():  # a kill can cut the last line short; that image is judged again
                warnings.warn(f"{path}:{line_no}: skipping an unreadable line")
    return records


def check_images(folder: str | os.PathLike, prompts: list[BenchPrompt], n: int, suffix: str = "png") -> None:
    """Every image there, and made from these prompts (generate.json records the prompt set a folder was made from)."""
    if not (folder := Path(folder)).is_dir():
        sys.exit(f"error: --images {folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    made = json.loads((folder / "generate.json").read_text()) if (folder / "generate.json").exists() else {}
    if made.get("prompts") not in (None, prompts_fingerprint(prompts)):
        sys.exit(f"error: the images in {folder} were generated from the prompt set {made.get('prompt_set')}, not "
                 f"from {getattr(prompts, 'name', 'these prompts')}: pass that file as --prompts")
    if missing := [image_path(folder, p.index, j, suffix).name for p in prompts for j in range(n)
                   if not image_path(folder, p.index, j, suffix).exists()]:
        other = [s for s in ("png", "jpg", "jpeg", "webp") if (folder / missing[0]).with_suffix("." + s).exists()]
        hint = f"found {Path(missing[0]).stem}.{other[0]}: pass --image-suffix {other[0]}" if other else "run generate first"
        sys.exit(f"error: {len(missing)} of {len(prompts) * n} images missing in {folder} (first: "
                 f"{', '.join(missing[:5])}); {hint}")


def judge_images(todo: list[tuple[BenchPrompt, int]], folder: Path, judge, suffix: str):
    """Each image's record as soon as it is judged (its reply parsed, or not after the last attempt), or unreadable."""
    from PIL import Image

    def record(k, reply=None, scores=None, analysis=None, error=None, tries=0):
        (p, j), file = todo[k], image_path(folder, todo[k][0].index, todo[k][1], suffix).name
        return dict(index=p.index, image=j, file=file, prompt=p.prompt, lang=p.lang, theme=p.theme, subtheme=p.subtheme,
                    checkpoints=[list(c) for c in p.checkpoints], scores=scores, error=error, attempts=tries,
                    analysis=analysis, reply=reply)
    loaded = []  # (position in todo, image)
    for k, (p, j) in enumerate(todo):
        try:
            with Image.open(image_path(folder, p.index, j, suffix)) as im:
                loaded.append((k, im.convert("RGB")))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # truncated, corrupt, not an image
            yield record(k, error=" ".join(f"unreadable image {p.index}_{j}.{suffix}: {e}".split())[:300])
    requests = [(judge_prompt(todo[k][0]), image, len(todo[k][0].checkpoints)) for k, image in loaded]
    yield from (record(loaded[position][0], *outcome) for position, outcome in (judge(requests) if loaded else ()))


def evaluate(prompts: list[BenchPrompt], images: str | os.PathLike, results: str | os.PathLike, judge, *, n: int = 4,
             chunk: int = 32, retry_failed: bool = False, suffix: str = "png", stop_after: int = 16) -> dict:
    """Judge the images RESULTS lacks, one JSON line each; the first `stop_after` all failed: the judge is broken, stop."""
    images, results = Path(images), Path(results)
    check_images(images, prompts, n, suffix)
    done, by_index, fingerprint = read_results(results), {p.index: p.prompt for p in prompts}, prompts_fingerprint(prompts)
    if clash := [i for (i, _), r in done.items() if r.get("prompt_set", fingerprint) != fingerprint
                 or (i in by_index and r.get("prompt") != by_index[i])]:
        sys.exit(f"error: --results {results} holds judgments of another prompt set (index {clash[0]}); use another one")
    keys = [(p.index, j) for p in prompts for j in range(n)]
    failed = {key for key in keys if key in done and done[key].get("scores") is None}
    todo = [(p, j) for p in prompts for j in range(n) if (p.index, j) not in done or retry_failed and (p.index, j) in failed]
    print(f"evaluate: {len(keys) - len(todo)} images already judged, {len(todo)} to go -> {results}")
    if failed:
        print(f"evaluate: {len(failed)} images failed in an earlier run; "
              + ("judging them again" if retry_failed else "--retry-failed judges them again"))
    results.parent.mkdir(parents=True, exist_ok=True)
    cut = (size := results.stat().st_size if results.exists() else 0) and not results.read_bytes().endswith(b"\n")
    counts, asked, interrupted = {"judged": 0, "failed": 0}, 0, None
    with open(results, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc="evaluate", unit="img") as bar:
        out.write("\n" if cut else "")  # end the line a kill cut short, so the next record starts a line of its own
        try:
            for start in range(0, len(todo), chunk):
                for record in judge_images(todo[start:start + chunk], images, judge, suffix):
                    counts["failed" if record["scores"] is None else "judged"] += 1
                    out.write(json.dumps(record | {"prompt_set": fingerprint, "expected": len(keys)},
                                         ensure_ascii=False) + "\n")
                    out.flush()  # on disk image by image: a kill -9 loses only the images in flight
                    if not counts["judged"] and (asked := asked + bool(record["attempts"])) >= stop_after:
                        out.truncate(size + bool(cut))  # an unreadable image (0 attempts) says nothing of the judge
                        sys.exit(f"error: the first {asked} judgments all failed (last: {record['error']}); is the "
                                 f"judge at {getattr(judge, 'where', '?')} working? Stopped, nothing recorded")
                    bar.update()
        except KeyboardInterrupt as stop:
            interrupted = stop
    if interrupted:
        print(f"evaluate: interrupted; the {sum(counts.values())} judgments of this run that finished are in {results}"
              "; the same command goes on from there", file=sys.stderr)
        raise interrupted
    if counts["failed"]:
        print(f"evaluate: {counts['failed']} failed (each with its reason in {results}); --retry-failed asks again")
    return counts


# ======== report: pooled accuracy per sub-criterion, primary dimension and theme; overall = mean of the 10 primaries
def load_result_records(path: str | os.PathLike) -> list[dict]:
    if not (records := list(read_results(Path(path), "report").values())):
        sys.exit(f"error: no judge results in {path}")
    if len(sets := sorted({r["prompt_set"] for r in records if "prompt_set" in r})) > 1:  # coverage is per set
        sys.exit(f"error: {path} holds judgments of {len(sets)} prompt sets ({', '.join(sets)}); pooled, they would "
                 "read as one run: judge each set into its own --results")
    for r in records:
        names, scores = [c[0] for c in r.get("checkpoints", [])], r.get("scores")
        if any(name not in SUB_CRITERIA for name in names) or "theme" not in r or (
                scores is not None and (len(scores) != len(names) or any(s not in (0, 1) for s in scores))):
            sys.exit(f"error: {path}: malformed record for image {r.get('file', r.get('index'))}")
    return records


def summarize(records: list[dict]) -> dict:
    """Pooled accuracy (official): correct / all checkpoints of a group; failed judgments counted, not scored."""
    tallies = {table: defaultdict(lambda: [0, 0]) for table in ("sub_criteria", "primary", "themes")}
    judged = [r for r in records if r["scores"] is not None]
    for record in judged:
        for (name, _), score in zip(record["checkpoints"], record["scores"]):
            for table, key in ("sub_criteria", name), ("primary", SUB_CRITERIA[name].primary), ("themes", record["theme"]):
                tallies[table][key][0] += score
                tallies[table][key][1] += 1
    order = {"sub_criteria": list(SUB_CRITERIA), "primary": PRIMARIES, "themes": list(THEMES_ZH)}
    expected = max([r.get("expected") or 0 for r in records] + [len(records)])
    summary = {"images": len(records), "judged": len(judged), "failed": len(records) - len(judged),
               "expected": expected, "coverage": 100.0 * len(judged) / expected,
               "prompt_sets": sorted({r.get("prompt_set", "?") for r in records}),
               "judged_images": sorted([r["index"], r["image"]] for r in judged)}
    for table, counts in tallies.items():
        keys = [k for k in order[table] if k in counts] + sorted(k for k in counts if k not in order[table])
        summary[table] = {k: {"accuracy": 100.0 * counts[k][0] / counts[k][1], "correct": counts[k][0],
                              "checkpoints": counts[k][1]} for k in keys}
    primaries = [v["accuracy"] for v in summary["primary"].values()]  # under 10, not comparable with published numbers
    summary |= {"overall": sum(primaries) / len(primaries) if primaries else None, "primaries_scored": len(primaries)}
    return summary


def markdown_table(summaries: dict[str, dict]) -> str:
    """One accuracy column per run and, with two or more runs, a delta column per run against the first (the base)."""
    names, runs = list(summaries), list(summaries.values())

    def row(label, get):
        values = [get(s) for s in runs]
        cells = ["n/a" if v is None else f"{v:.2f}" for v in values]
        cells += ["n/a" if v is None or values[0] is None else f"{v - values[0]:+.2f}" for v in values[1:]]
        return f"| {label} | " + " | ".join(cells) + " |" if any(v is not None for v in values) else None

    accuracy = lambda table, key: lambda s: s[table][key]["accuracy"] if key in s[table] else None  # noqa: E731
    text = lambda label, f: f"| {label} | " + " | ".join([f(s) for s in runs] + [""] * (len(runs) - 1)) + " |"  # noqa: E731
    lines = ["| Dimension | " + " | ".join(names + [f"Δ {name}" for name in names[1:]]) + " |",
             "|" + "---|" * 2 * len(names),
             text("Images (failed judgments, not scored)", lambda s: f"{s['images']} ({s['failed']} failed)"),
             text("Coverage (judged / expected images)",
                  lambda s: f"{s['judged']}/{s['expected']} ({s['coverage']:.1f}%)"),
             row("**Overall**", lambda s: s["overall"])]
    for primary in PRIMARIES:  # rows nobody has data for (a small prompt subset) are left out
        subs = [name for name, c in SUB_CRITERIA.items() if c.primary == primary]
        lines += [row(f"**{primary}**", accuracy("primary", primary))] + [
            row(f"&nbsp;&nbsp;{sub}", accuracy("sub_criteria", sub)) for sub in subs if len(subs) > 1]
    lines += [row(f"Theme: {t}", accuracy("themes", t)) for t in dict.fromkeys(t for s in runs for t in s["themes"])]
    if partial := [name for name, s in summaries.items() if s["primaries_scored"] < len(PRIMARIES)]:
        lines.append(f"\nThe overall of {', '.join(partial)} averages fewer than {len(PRIMARIES)} primary dimensions.")
    return "\n".join(line for line in lines if line) + "\n"


def report(paths: list[str], names: list[str] | None = None, out: str | None = None) -> dict[str, dict]:
    """Summarize each results file; write OUT.json and OUT.md (default: report.* or compare.* beside the first)."""
    if names and len(names) != len(paths):
        sys.exit(f"error: --names has {len(names)} entries for {len(paths)} results files")
    if len(set(names := names or [Path(p).resolve().parent.name for p in paths])) < len(names):
        names = [str(p) for p in paths]  # two runs in folders of the same name: the paths tell them apart
    out = str(out or Path(paths[0]).parent / ("report" if len(paths) == 1 else "compare"))
    check_writable(Path(out + ".md"), "--out")
    summaries = {name: summarize(load_result_records(p)) for name, p in zip(names, paths)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    # Deltas mean something only between complete runs that judged the same images of the same prompt set.
    notes = [f"warning: {name} is incomplete: {s['judged']} of {s['expected']} images judged ({s['failed']} failed, "
             f"{s['expected'] - s['images']} not judged yet)" for name, s in summaries.items() if s["coverage"] < 100]
    notes += ["warning: the runs were judged on different prompt sets"] * (len({tuple(s["prompt_sets"]) for s in
                                                                                summaries.values()}) > 1)
    (base, first), *others = [(name, {tuple(k) for k in s["judged_images"]}) for name, s in summaries.items()]
    notes += [f"warning: {name} and {base} cover different images ({len(keys ^ first)} judged in only one); their "
              "deltas compare different samples" for name, keys in others if keys != first]
    table, notes = markdown_table(summaries), "".join(f"\n{note}" for note in notes)
    Path(out + ".json").write_text(json.dumps(summaries, indent=1, ensure_ascii=False), encoding="utf-8")
    Path(out + ".md").write_text("# UniGenBench\n\n" + table + notes + "\n", encoding="utf-8")
    print(f"{table}{notes}\nwrote {out}.json and {out}.md")
    return summaries


# ======== Command line: each flag once, with its default and its range, checked as it is parsed (one line naming it)
def add_flags(parser, flags) -> None:
    """(flag, default, help[, argparse keywords][, range "[lo,hi)", ends closed [] or open ()]): help, default, check."""
    def in_range(interval: str, kind):
        def parse(text: str):
            lo, hi, v = *(float(x) for x in interval[1:-1].split(",")), kind(text)
            if not lo <= v <= hi or (v, interval[0]) == (lo, "(") or (v, interval[-1]) == (hi, ")"):
                raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
            return v
        parse.__name__ = kind.__name__  # a ValueError reads "invalid int value: 'two'"
        return parse
    for flag, default, text, *more in flags:
        kw = {"required": True} if default == "required" else {"action": "store_true"} if default is False else {
            "default": default, **({"type": type(default)} if default is not None else {})}
        for extra in more:  # a range makes the type check it
            kw |= extra if isinstance(extra, dict) else {"type": in_range(extra, kw.get("type", int))}
            text += "" if isinstance(extra, dict) else f"; in {extra}"
        suffix = "" if re.search("default:|required", text) else "; default: %(default)s"
        parser.add_argument(flag, help=text + ("; required" if default == "required" else suffix), **kw)


def main(argv: list[str] | None = None) -> None:
    about, _, more = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=about, epilog=more, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,evaluate,report}")
    g = commands.add_parser("generate", help="n images per prompt into OUT/{index}_{j}.png (official FLUX settings)")
    e = commands.add_parser("evaluate", help="judge every image, appending to --results (one JSON line per image)")
    r = commands.add_parser("report", help="accuracy tables; several results files side by side, with deltas")
    for p in parser, g, e, r:  # a bad flag: one line, not a usage block
        p.error = lambda message, p=p: sys.exit(f"error: {p.prog}: {message} (see --help)")
    add_flags(g, [
        ("--model", "required", "FLUX.1, SD3, Qwen-Image, Z-Image or FLUX.2 [klein] hub id or folder; tiny: a test"),
        ("--out", "required", "folder for the images and generate.json"), ("--lora", None, "trained LoRA checkpoint folder"),
        ("--resolution", None, "image side; default: 1024 (official), 32 with tiny", {"type": int}, "[16,8192]"),
        ("--steps", None, "sampling steps; default: 30 (official), 4 with tiny", {"type": int}, "[1,inf)"),
        ("--guidance", 3.5, "FLUX.1 guidance (official)", "[0,inf)"), ("--max-sequence-length", 512, "T5 tokens", "[1,512]"),
        ("--cfg-scale", 1.0, "true classifier-free guidance; 1: off (FLUX.1, official)", "[1,inf)"),
        ("--seed", 3407, "image j: SEED + j (official)", "[0,4294967295]"), ("--batch-size", 4, "images a call", "[1,inf)"),
        ("--dtype", "fp16", "on CUDA: fp16 as the official inference, or bf16 (CPU: float32)",
         {"choices": ("fp16", "bf16")})])
    add_flags(e, [
        ("--images", "required", "folder of {index}_{j} images"), ("--results", None, "default: IMAGES/results.jsonl"),
        ("--judge-model", "QwenVL", "the name the server serves (vLLM --served-model-name; QwenVL as the official)"),
        ("--judge-api-key-env", "OPENAI_API_KEY", "environment variable holding the server's API key (never printed)"),
        ("--judge-retries", 10, "requests after the first while replies do not parse (official: 10, so 11); "
         "--judge-url only", "[0,inf)"),
        ("--judge-temperature", None, "sent with each request (0: greedy); default: none, the server's own sampling, as "
         "the official request gets", {"type": float}, "[0,inf)"),
        ("--judge-max-tokens", 4096, "reply length limit (official)", "[1,inf)"),
        ("--judge-workers", 8, "requests in flight", "[1,inf)"),
        ("--judge-timeout", 300.0, "seconds per request", "(0,inf)"),
        ("--chunk", 32, "images sent to the judge at a time", "[1,inf)"),
        ("--image-suffix", "png", "image file type in --images", {"choices": ["png", "jpg", "jpeg", "webp"]}),
        ("--retry-failed", False, "judge again the images whose judgment failed; default: off")])
    judges = [("--judge-url", "OpenAI-compatible base URL ending in /v1 (vLLM: http://HOST:8000/v1)"),
              ("--judge-fn", "yours, module:function (working directory or installed): fn(texts, images) -> replies"),
              ("--judge-local", "Qwen-VL hub id (CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1) or folder, run here")]
    add_flags(e.add_mutually_exclusive_group(required=True), [
        (flag, None, f"{what}; one of {', '.join(f for f, _ in judges)} is required") for flag, what in judges])
    for sub in g, e:
        add_flags(sub, [("--prompts", str(DEFAULT_PROMPTS), "an official UniGenBench CSV (test_prompts_en.csv, _en_long, "
                         "_zh, _zh_long) or JSON prompt records; default: prompts.jsonl beside this file"),
                        ("--n", 4, "images per prompt (official)", "[1,inf)")])
    r.add_argument("results", nargs="+", help="results.jsonl files; the first is the base of the deltas")
    add_flags(r, [("--names", None, "column names; default: the folder name of each results file", {"nargs": "+"}),
                  ("--out", None, "path without extension (.json, .md); default: report or compare beside the first")])
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            generate(load_prompts(args.prompts), args.out, args.model, **{k: getattr(args, k) for k in (
                "n", "lora", "steps", "resolution", "guidance", "batch_size", "seed", "max_sequence_length", "dtype",
                "cfg_scale")})
        elif args.command == "evaluate":
            prompts, results = load_prompts(args.prompts), Path(args.results or Path(args.images) / "results.jsonl")
            check_images(args.images, prompts, args.n, args.image_suffix)  # before a judge model takes minutes to load
            check_writable(results, "--results")
            judge = (server_judge(args.judge_url, args.judge_model, key_env=args.judge_api_key_env, **{k: getattr(
                args, "judge_" + k) for k in ("retries", "timeout", "workers", "max_tokens", "temperature")})
                     if args.judge_url else function_judge("--judge-fn", args.judge_fn) if args.judge_fn else
                     function_judge("--judge-local", args.judge_local, args.judge_max_tokens))
            evaluate(prompts, args.images, results, judge, n=args.n, chunk=args.chunk, suffix=args.image_suffix,
                     retry_failed=args.retry_failed)
        else:
            report(args.results, args.names, args.out)
    except KeyboardInterrupt:  # evaluate has said what it kept; generate keeps every image it finished
        print("\ninterrupted; every image written is kept" * (args.command == "generate"), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # not sys.exit, which would wait for judge requests in flight whose replies nobody reads


if __name__ == "__main__":
    main()
