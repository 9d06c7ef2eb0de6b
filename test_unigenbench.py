"""Tests for unigenbench.py: CPU only, nothing downloaded (tiny random models in an offline HF cache, judge servers on
127.0.0.1 answering from a script)."""
import ast
import base64
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unigenbench as ugb
from conftest import HUB_IDS, JSONHandler, offline_env

HERE = Path(__file__).parent
DATA = HERE.parent / "shared" / "unigenbench-data"
PROTOCOLS = HERE.parent / "shared" / "judge-protocols"
OFFICIAL = {"test_prompts_en.csv": "en", "test_prompts_en_long.csv": "en_long", "test_prompts_zh.csv": "zh",
            "test_prompts_zh_long.csv": "zh_long", "prefgrpo_unigenbench_test_data.csv": "prefgrpo_paper_en"}
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="official UniGenBench data not found beside the repo")
needs_protocols = pytest.mark.skipif(not PROTOCOLS.is_dir(), reason="judge protocols not found beside the repo")
SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "min_p", "do_sample", "seed", "repetition_penalty"}


@pytest.fixture(scope="module")
def taxonomy():
    return json.loads((DATA / "unigenbench_taxonomy_derived.json").read_text(encoding="utf-8"))


def load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ugb.load_prompts(path)


def cli(*args, cwd=HERE, env=None, script=HERE / "unigenbench.py", timeout=300):
    """The script as a user runs it: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(rc, err, *culprits):
    assert rc != 0 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:"), err
    for culprit in culprits:
        assert culprit in last, (culprit, last)


# ----------------------------------------------------------------------------------------------- prompt files
def raw_checkpoint_counts(path: Path) -> list[int]:
    """Checkpoints per row, counted without JSON (so the row with the missing comma counts too)."""
    counts = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            found = re.search(r'"(?:Testpoints|考点)":\s*\[(.*?)\]', row[2])
            if found:
                counts.append(len(re.findall(r'"[^"]*"', found.group(1))))
    return counts


@needs_data
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_csv_loads_completely(name, taxonomy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompts = ugb.load_prompts(DATA / name)
    assert [p.index for p in prompts] == list(range(600)) and prompts.name == name
    assert {p.lang for p in prompts} == {"zh" if "_zh" in name else "en"}
    raw = raw_checkpoint_counts(DATA / name)
    assert [len(p.checkpoints) for p in prompts] == raw
    assert sum(raw) == taxonomy["total_testpoints"][OFFICIAL[name]]
    assert all(n in ugb.SUB_CRITERIA for p in prompts for n, _ in p.checkpoints)
    # Chinese names map to the same 27 English sub-criteria: the count of each matches the taxonomy's (which counts
    # checkpoints: two en_long prompts test one sub-criterion twice).
    per_criterion = Counter(n for p in prompts for n, _ in p.checkpoints)
    for dim in taxonomy["evaluation_dimensions"]:
        for sub in dim["sub_dimensions"]:
            assert per_criterion[sub["name_en"]] == sub["prompts_with_testpoint"][OFFICIAL[name]], sub["name_en"]
    # Raw sub-theme labels (29 in English, Chinese ones too) normalise to the 20 sub-themes of the taxonomy.
    expected = {(t["theme_en"], s["subtheme"]): s["count_en_short"] for t in taxonomy["prompt_themes"]
                for s in t["subthemes"]}
    assert Counter((p.theme, p.subtheme) for p in prompts) == expected
    assert Counter(p.subject for p in prompts) == taxonomy["subjects_en_short"]
    messages = [str(w.message) for w in caught]
    assert messages == (["test_prompts_en_long.csv index 509: repaired a missing comma in the checkpoint JSON"]
                        if name == "test_prompts_en_long.csv" else [])


@needs_data
def test_en_long_row_509_is_repaired():
    with pytest.warns(UserWarning, match="index 509"):
        prompts = ugb.load_prompts(DATA / "test_prompts_en_long.csv")
    names = [n for n, _ in prompts[509].checkpoints]
    i = names.index("Grammar - Negation")
    assert names[i + 1] == "Attribute - Color"
    assert len(names) == raw_checkpoint_counts(DATA / "test_prompts_en_long.csv")[509]


@needs_data
def test_zh_and_en_files_agree_checkpoint_by_checkpoint():
    en, zh = load_quietly(DATA / "test_prompts_en.csv"), load_quietly(DATA / "test_prompts_zh.csv")
    assert [[n for n, _ in p.checkpoints] for p in en] == [[n for n, _ in p.checkpoints] for p in zh]
    assert [(p.theme, p.subtheme) for p in en] == [(p.theme, p.subtheme) for p in zh]


@needs_data
def test_our_prompts_cover_everything_and_are_our_own(taxonomy):
    prompts = ugb.load_prompts()  # the default: prompts.jsonl
    assert len(prompts) >= 60 and {p.lang for p in prompts} == {"en"}
    assert {p.theme for p in prompts} == set(ugb.THEMES_ZH)
    subthemes = {(t["theme_en"], s["subtheme"]) for t in taxonomy["prompt_themes"] for s in t["subthemes"]}
    assert {(p.theme, p.subtheme) for p in prompts} == subthemes and len(subthemes) == 20
    assert {n for p in prompts for n, _ in p.checkpoints} == set(ugb.SUB_CRITERIA)
    for p in prompts:  # each description is the part of our prompt that its checkpoint tests
        assert all(d.lower() in p.prompt.lower() for _, d in p.checkpoints), p.index
    official = set()
    for name in OFFICIAL:
        with open(DATA / name, newline="", encoding="utf-8") as f:
            official |= {" ".join(row[1].lower().split()) for row in csv.reader(f)}
    assert not [p.index for p in prompts if " ".join(p.prompt.lower().split()) in official]


@needs_data
def test_criteria_table_matches_the_taxonomy(taxonomy):
    assert len(ugb.SUB_CRITERIA) == 27 and len(ugb.PRIMARIES) == 10
    for dim in taxonomy["evaluation_dimensions"]:
        for sub in dim["sub_dimensions"]:
            ours = ugb.SUB_CRITERIA[sub["name_en"]]
            assert (ours.primary, ours.zh) == (dim["primary_en"], sub["name_zh"])
            assert ugb.EXPLANATIONS_EN[sub["name_en"]] == sub["definition_en"]


@pytest.mark.parametrize("content, error", [
    ("not json at all", "expected JSON prompt records or an official CSV"),  # read by content, whatever the file's name
    ('{"index": 0, "prompt": "a cat"', "bad.jsonl:1: not a prompt record"),
    ('[{"index": 0, "prompt": "a cat"', "bad.jsonl:2: not a JSON list of prompt records"),
    ('{"index": 0, "prompt": "a cat", "Testpoints": ["Style"], "Testpoint Description": []}', "equal length"),
    ('{"index": 0, "prompt": "a cat", "Testpoints": ["Colour"], "Testpoint Description": ["a"]}', "unknown checkpoint"),
])
def test_bad_prompt_files_give_one_line_errors(tmp_path, content, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(SystemExit, match=error) as e:
        ugb.load_prompts(path)
    assert "\n" not in str(e.value) and "bad.jsonl" in str(e.value)
    broken = tmp_path / "broken.csv"
    broken.write_text('index,prompt_en,sub_dims_en\n0,a cat,"{""Testpoints"": [""Style""" ""x""]"\n')
    with pytest.raises(SystemExit, match="malformed"):
        ugb.load_prompts(broken)


def test_prompt_files_are_read_by_content_not_by_extension(tmp_path):
    lines = ugb.DEFAULT_PROMPTS.read_text(encoding="utf-8").splitlines()[:3]
    expected, rows = ugb.load_prompts()[:3], [json.loads(line) for line in lines]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\r\n")
    writer.writerows([["index", "prompt_en", "sub_dims_en"]] + [[r["index"], r["prompt"], json.dumps(
        {k: v for k, v in r.items() if k not in ("index", "prompt")})] for r in rows])
    variants = {"upper.JSONL": "\r\n".join(lines), "lines.json": "\n".join(lines) + "\n",
                "list.json": json.dumps(rows, indent=1), "bom-crlf.jsonl": "\ufeff" + "\r\n".join(lines) + "\r\n",
                "official.CSV": "\ufeff" + table.getvalue(), "official.txt": table.getvalue()}
    for name, text in variants.items():
        (tmp_path / name).write_text(text, encoding="utf-8", newline="")  # CRLF kept as written
        got = ugb.load_prompts(tmp_path / name)
        assert list(got) == list(expected) and got.name == name, name


# ------------------------------------------------------------------------------- the official judge input and parse
@needs_protocols
def test_templates_and_explanations_are_the_official_ones_byte_for_byte():
    config = json.loads((PROTOCOLS / "unigenbench_judge_config.json").read_text(encoding="utf-8"))
    for lang, template in ("en", ugb.TEMPLATE_EN), ("zh", ugb.TEMPLATE_ZH):
        assert template == (PROTOCOLS / f"unigenbench_judge_{lang}.txt").read_text(encoding="utf-8")
        assert ugb.HEADERS[lang] == (config[lang]["checkpoint_header"], config[lang]["checkpoint_desc_header"])
    assert list(ugb.EXPLANATIONS_EN.items()) == list(config["en"]["explanations"].items())
    assert list(ugb.EXPLANATIONS_ZH.items()) == list(config["zh"]["explanations"].items())
    assert {c.zh for c in ugb.SUB_CRITERIA.values()} == set(ugb.EXPLANATIONS_ZH)
    assert set(ugb.SUB_CRITERIA) == set(ugb.EXPLANATIONS_EN)
    source = (HERE / "unigenbench.py").read_text(encoding="utf-8")
    assert "CodeGoat24/UniGenBench" in source and "49d0bce" in source and "CC BY 4.0" in source


@needs_data
@needs_protocols
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_judge_prompt_for_index_0_is_the_official_example(lang):
    prompts = ugb.load_prompts(DATA / f"test_prompts_{lang}.csv")
    expected = (PROTOCOLS / f"unigenbench_judge_{lang}_example_index0.txt").read_text(encoding="utf-8")
    assert ugb.judge_prompt(prompts[0]).encode() == expected.encode()


def test_our_prompts_use_the_english_template():
    p = ugb.load_prompts()[0]
    text = ugb.judge_prompt(p)
    assert text.startswith("You are a precise and objective English-language image description system.")
    assert f"<checkpoint>{[n for n, _ in p.checkpoints]!r}</checkpoint>" in text
    assert f"\n{p.checkpoints[0][0]}: {ugb.EXPLANATIONS_EN[p.checkpoints[0][0]]}" in text


def official_reply(scores, analyses=None):
    analyses = analyses if analyses is not None else [f"checkpoint {k} looked at" for k in range(len(scores))]
    return f"<description>\n<analysis>{analyses!r}</analysis>\n<score>{scores!r}</score>\n</description>"


@pytest.mark.parametrize("reply, n, scores, error", [
    (official_reply([1, 0]), 2, [1, 0], None),
    ("Sure.\n<analysis>['a', 'b', 'c']</analysis>\n<score>[1, 1, 0]</score> done", 3, [1, 1, 0], None),
    ("<analysis>\n ['x'] \n</analysis><score>\n[1]\n</score>", 1, [1], None),            # DOTALL, stripped
    ("<analysis>['a', 'b']</analysis><score>[1, 2]</score>", 2, [1, 0], None),           # passes only when == 1
    ("<analysis>['a', 'b']</analysis><score>[1.0, True]</score>", 2, [1, 1], None),      # 1.0 == 1, True == 1
    ("<analysis>['a']</analysis><score>[0]</score> then <analysis>['b', 'c']</analysis><score>[1, 1]</score>",
     1, [0], None),                                                                      # the first match counts
    ("<analysis>['a', 'b']</analysis><score>[1, 0]</score>", 3, None, "expected 3 analyses and 3 scores, got 2 and 2"),
    ("<analysis>['a', 'b', 'c']</analysis><score>[1, 0]</score>", 3, None, "got 3 and 2"),
    ("<analysis>looks fine</analysis><score>[1]</score>", 1, None, "not a Python list"),  # not a literal
    ("<analysis>'a'</analysis><score>[1]</score>", 1, None, "got str and 1"),
    ("<analysis>['a']</analysis><score>1</score>", 1, None, "got 1 and int"),
    ("<ANALYSIS>['a']</ANALYSIS><SCORE>[1]</SCORE>", 1, None, "no <analysis>"),          # case-sensitive, as official
    ("<analysis>['a']</analysis><score>[1]", 1, None, "no <score>"),                     # no closing tag
    ("The image matches. Scores: 1, 0, 1", 3, None, "unparsable"),
])
def test_parse_reply_is_the_official_parse(reply, n, scores, error):
    got, analysis, err = ugb.parse_reply(reply, n)
    assert got == scores
    assert (err is None and isinstance(analysis, list)) if error is None else (error in err and "unparsable" in err)


# ---------------------------------------------------------------------------------------------------- scoring
def record(index, theme, names, scores, image=0, **extra):
    return {"index": index, "image": image, "theme": theme, "checkpoints": [[n, "..."] for n in names],
            "scores": scores, **extra}


HAND_MADE = [
    record(0, "Art", ["Attribute - Color"] * 3 + ["Attribute - Shape"], [1, 1, 1, 0]),
    record(1, "Art", ["Attribute - Shape"], [0]),
    record(2, "Design", ["Style"], [1]),
    record(3, "Design", ["Style", "Text Generation"], [0, 1]),
    record(4, "Design", ["Style", "Text Generation"], None),  # a failed judgment
]


def test_pooled_accuracy_overall_and_failures():
    s = ugb.summarize(HAND_MADE)
    # Attribute pooled: 3 correct of 5 checkpoints = 60%. The mean of its sub means, (100 + 0) / 2 = 50%, is not it.
    assert s["primary"]["Attribute"] == {"accuracy": 60.0, "correct": 3, "checkpoints": 5}
    assert s["sub_criteria"]["Attribute - Color"]["accuracy"] == 100.0
    assert s["sub_criteria"]["Attribute - Shape"]["accuracy"] == 0.0
    assert s["primary"]["Style"]["accuracy"] == 50.0 and s["primary"]["Text"]["accuracy"] == 100.0
    assert s["overall"] == pytest.approx((60 + 50 + 100) / 3) and s["primaries_scored"] == 3
    assert (s["images"], s["judged"], s["failed"]) == (5, 4, 1)  # the failed image is counted, not scored
    assert s["themes"]["Art"]["accuracy"] == 60.0 and s["themes"]["Design"]["accuracy"] == pytest.approx(200 / 3)


def test_overall_is_the_mean_of_the_ten_primaries():
    rng = np.random.default_rng(0)
    names = list(ugb.SUB_CRITERIA)
    records = [record(i, "Art", names, rng.integers(0, 2, len(names)).tolist()) for i in range(7)]
    s = ugb.summarize(records)
    by_primary = {}
    for r in records:
        for (name, _), score in zip(r["checkpoints"], r["scores"]):
            by_primary.setdefault(ugb.SUB_CRITERIA[name].primary, []).append(score)
    assert s["primaries_scored"] == 10
    assert s["overall"] == pytest.approx(np.mean([100 * np.mean(v) for v in by_primary.values()]))


def write_results(path: Path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_compare_table_with_deltas_and_coverage_warnings(tmp_path, capsys):
    base = write_results(tmp_path / "base" / "results.jsonl", [dict(r, expected=5) for r in HAND_MADE])
    better = [dict(r, scores=[1] * len(r["checkpoints"]), expected=5) for r in HAND_MADE[:4]]
    trained = write_results(tmp_path / "trained" / "results.jsonl", better)
    ugb.main(["report", base, trained, "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp.md").read_text()
    assert "| Dimension | base | trained | Δ trained |" in table
    assert "| **Overall** | 70.00 | 100.00 | +30.00 |" in table
    assert "| **Attribute** | 60.00 | 100.00 | +40.00 |" in table
    assert "| 5 (1 failed) | 4 (0 failed) |" in table
    assert "| Coverage (judged / expected images) | 4/5 (80.0%) | 4/5 (80.0%) |" in table
    out = capsys.readouterr().out
    for text in (table, out):  # base: 1 failed; trained: 1 never judged; both judged the same 4 images
        assert "warning: base is incomplete: 4 of 5 images judged (1 failed, 0 not judged yet)" in text
        assert "warning: trained is incomplete: 4 of 5 images judged (0 failed, 1 not judged yet)" in text
        assert "cover different images" not in text
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["trained"]["overall"] == 100.0 and saved["base"]["failed"] == 1 and saved["base"]["coverage"] == 80
    other = write_results(tmp_path / "other" / "results.jsonl", [dict(r, expected=5) for r in HAND_MADE[1:]]
                          + [record(0, "Art", ["Style"], [1], image=1, expected=5)])
    ugb.main(["report", base, other, "--out", str(tmp_path / "cmp2")])
    assert "warning: other and base cover different images (2 judged in only one)" in capsys.readouterr().out
    complete = write_results(tmp_path / "done" / "results.jsonl", HAND_MADE[:4])
    ugb.main(["report", complete])  # one run: report.json / report.md beside it
    md = (tmp_path / "done" / "report.md").read_text()
    assert "| **Overall** | 70.00 |" in md and "| 4/4 (100.0%) |" in md and "warning" not in md


def test_report_rejects_malformed_results(tmp_path):
    bad = write_results(tmp_path / "r.jsonl", [record(0, "Art", ["Style"], [1, 1])])
    with pytest.raises(SystemExit, match="malformed record"):
        ugb.report([bad])
    with pytest.raises(SystemExit, match="no judge results"):
        ugb.report([str(tmp_path / "missing.jsonl")])


# ------------------------------------------------------------------------------------ end to end: judge server
class FakeJudge(JSONHandler):
    """OpenAI chat completions on 127.0.0.1 under /v1 (anything else: 404). `behaviour(text) -> reply text or HTTP
    status` is set per test; `served` is what /v1/models lists."""

    def send(self, status, body):
        self.send_json(status, body)

    def do_GET(self):
        if self.path != "/v1/models":
            return self.send(404, {"detail": "Not Found"})
        self.send(200, {"object": "list", "data": [{"id": name, "object": "model"} for name in self.server.served]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            return self.send(404, {"detail": "Not Found"})
        with self.server.lock:
            self.server.seen.append(body)
        text = body["messages"][0]["content"][1]["text"]
        reply = self.server.behaviour(text)
        if isinstance(reply, int):
            self.send(reply, {"error": {"message": "judge trouble"}})
        else:
            self.send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": reply}}]})


def checkpoints_asked(text):
    return ast.literal_eval(re.search(r"<checkpoint>(.*?)</checkpoint>", text).group(1))


def alternating_scores(text):
    """A well-behaved judge: checkpoint k (from 1) scores 1 when k is odd."""
    return official_reply([k % 2 for k in range(1, len(checkpoints_asked(text)) + 1)])


@pytest.fixture
def judge_server(monkeypatch):
    monkeypatch.setattr(ugb, "RETRY_BACKOFF_S", 0.001)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    server.lock, server.seen, server.behaviour, server.served = threading.Lock(), [], alternating_scores, ["QwenVL"]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.root = f"http://127.0.0.1:{server.server_address[1]}"
    server.url = server.root + "/v1"
    yield server
    server.shutdown()
    server.server_close()


def sent(body):
    """(text, decoded image) of one request, checking it has the official shape."""
    (message,) = body["messages"]
    image, text = message["content"]
    assert message["role"] == "user" and image["type"] == "image_url" and text["type"] == "text"
    url = image["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    return text["text"], Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def make_bench(folder, count=3, n=2, suffix="png"):
    """The first `count` of our prompts, n images each, every image a different colour (so each is traceable)."""
    prompts = ugb.load_prompts()[:count]
    folder.mkdir(parents=True, exist_ok=True)
    for p in prompts:
        for j in range(n):
            Image.new("RGB", (16, 16), (20 * p.index, 100 * j, 7)).save(ugb.image_path(folder, p.index, j, suffix))
    prompt_file = folder.parent / f"{folder.name}-prompts.jsonl"
    prompt_file.write_text("".join(line + "\n" for line in ugb.DEFAULT_PROMPTS.read_text().splitlines()[:count]))
    return prompts, folder, prompt_file


@pytest.fixture
def bench(tmp_path):
    return make_bench(tmp_path / "images")


def test_server_judge_sends_the_official_request(judge_server, bench):
    prompts, folder, _ = bench
    judge = ugb.server_judge(judge_server.url)  # the default served name: QwenVL
    counts = ugb.evaluate(prompts[:1], folder, folder / "results.jsonl", judge, n=2)
    assert counts == {"judged": 2, "failed": 0} and len(judge_server.seen) == 2
    for body in judge_server.seen:
        assert body["model"] == "QwenVL" and body["max_tokens"] == 4096
        assert not set(body) & SAMPLING_FIELDS  # the server's own sampling, as the official request gets
        text, image = sent(body)
        assert text == ugb.judge_prompt(prompts[0]) and image.format == "JPEG" and image.size == (16, 16)


def test_server_judge_end_to_end_with_kill_and_resume(judge_server, bench):
    prompts, folder, _ = bench
    results = folder / "results.jsonl"
    judge = ugb.server_judge(judge_server.url, "QwenVL", workers=2)
    calls = []

    def killed_after_two_chunks(requests):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the run were stopped here
        calls.append(len(requests))
        return judge(requests)

    with pytest.raises(KeyboardInterrupt):
        ugb.evaluate(prompts, folder, results, killed_after_two_chunks, n=2, chunk=2)
    first = [sent(body)[1].getpixel((0, 0)) for body in judge_server.seen]
    assert len(first) == 4 and len(results.read_text().splitlines()) == 4
    with open(results, "a") as f:
        f.write('{"index": 2, "ima')  # a hard kill in the middle of a line
    judge_server.seen.clear()
    with pytest.warns(UserWarning, match="unreadable line"):
        counts = ugb.evaluate(prompts, folder, results, judge, n=2, chunk=2)
    assert counts == {"judged": 2, "failed": 0}
    second = [sent(body)[1].getpixel((0, 0)) for body in judge_server.seen]
    assert len(second) == 2 and not set(first) & set(second)
    with pytest.warns(UserWarning):
        done = ugb.read_results(results)
    assert sorted(done) == [(p.index, j) for p in prompts for j in range(2)]
    for r in done.values():
        n = len(r["checkpoints"])
        assert r["scores"] == [k % 2 for k in range(1, n + 1)] and r["error"] is None and r["attempts"] == 1
        assert len(r["analysis"]) == n and r["expected"] == 6
    summary = ugb.summarize(list(done.values()))
    total = sum(len(p.checkpoints) for p in prompts) * 2
    assert summary["judged"] == 6 and sum(v["checkpoints"] for v in summary["primary"].values()) == total
    judge_server.seen.clear()
    with pytest.warns(UserWarning):
        assert ugb.evaluate(prompts, folder, results, judge, n=2) == {"judged": 0, "failed": 0}
    assert judge_server.seen == []  # complete: nothing is asked twice


def test_failures_are_recorded_with_reason_and_attempts_then_retried(judge_server, bench, capsys):
    prompts, folder, _ = bench
    bad_count, down, rejected = (p.prompt for p in prompts)
    ugb.image_path(folder, prompts[2].index, 1).write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a corrupt image

    def behaviour(text):
        if bad_count in text:
            return official_reply([1])  # always the wrong number of scores
        return 500 if down in text else 400 if rejected in text else alternating_scores(text)
    judge_server.behaviour = behaviour
    judge = ugb.server_judge(judge_server.url, workers=4, retries=2)
    results = folder / "out" / "results.jsonl"
    assert ugb.evaluate(prompts, folder, results, judge, n=2) == {"judged": 0, "failed": 6}
    done = ugb.read_results(results)
    for j in range(2):
        wrong, error = done[(prompts[0].index, j)], done[(prompts[1].index, j)]
        assert wrong["scores"] is None and "unparsable reply: expected" in wrong["error"] and wrong["attempts"] == 3
        assert wrong["reply"] == official_reply([1])
        assert error["scores"] is None and error["error"] == "HTTP 500" and error["attempts"] == 3
    rejected_0, corrupt = done[(prompts[2].index, 0)], done[(prompts[2].index, 1)]
    assert (rejected_0["error"], rejected_0["attempts"]) == ("HTTP 400", 1)  # a rejected request is not asked again
    assert corrupt["error"].startswith(f"unreadable image {prompts[2].index}_1.png") and corrupt["attempts"] == 0
    asked = Counter(sent(body)[0] for body in judge_server.seen)
    assert [asked[ugb.judge_prompt(p)] for p in prompts] == [6, 6, 1]
    # The server recovers; a rerun says how many failed and how to judge them again, --retry-failed does.
    judge_server.behaviour = alternating_scores
    Image.new("RGB", (16, 16)).save(ugb.image_path(folder, prompts[2].index, 1))
    capsys.readouterr()
    assert ugb.evaluate(prompts, folder, results, judge, n=2) == {"judged": 0, "failed": 0}
    assert "6 images failed in an earlier run; --retry-failed judges them again" in capsys.readouterr().out
    assert ugb.evaluate(prompts, folder, results, judge, n=2, retry_failed=True) == {"judged": 6, "failed": 0}
    assert ugb.summarize(list(ugb.read_results(results).values()))["failed"] == 0


def test_a_broken_server_stops_the_run_after_16_failures(judge_server, tmp_path):
    prompts, folder, prompt_file = make_bench(tmp_path / "images", count=10)
    judge_server.behaviour = lambda text: 500
    rc, out, err = cli("evaluate", "--images", folder, "--prompts", prompt_file, "--n", 2, "--judge-retries", 0,
                       "--judge-url", judge_server.url)
    assert_one_line_error(rc, err, "the first 16 judgments all failed (last: HTTP 500)", judge_server.url)
    # the 16th failure stops it: the rest of the chunk is dropped (some may be in flight); nothing kept
    assert 16 <= len(judge_server.seen) <= 20 and not (folder / "results.jsonl").read_text()
    judge_server.seen.clear()  # a few failures, then a working judge: the run goes on and keeps them all
    judge_server.behaviour = lambda text: alternating_scores(text) if len(judge_server.seen) > 6 else 500
    counts = ugb.evaluate(prompts, folder, folder / "results.jsonl",
                          ugb.server_judge(judge_server.url, workers=1, retries=0), n=2, chunk=4)
    assert counts == {"judged": 14, "failed": 6} and len(ugb.read_results(folder / "results.jsonl")) == 20


def write_generate_json(folder, prompts, name):
    (folder / "generate.json").write_text(json.dumps({"prompts": ugb.prompts_fingerprint(prompts), "prompt_set": name}))


@pytest.mark.parametrize("case", ["judge model not served", "url without /v1", "server down", "missing images",
                                  "jpg folder", "other prompt set", "no such prompts", "no such folder",
                                  "bad flag value"])
def test_cli_errors_are_one_line_naming_the_culprit(case, judge_server, tmp_path):
    prompts, folder, prompt_file = make_bench(tmp_path / "images")
    args = {"--images": folder, "--prompts": prompt_file, "--n": 2, "--judge-url": judge_server.url}
    culprits = []
    if case == "judge model not served":
        judge_server.served = ["judge-a", "judge-b"]
        args["--judge-model"] = "QwenVL"
        culprits = ["--judge-model 'QwenVL' is not served", "it serves: judge-a, judge-b"]
    elif case == "url without /v1":
        args["--judge-url"] = judge_server.root
        culprits = [judge_server.root, "HTTP 404", "missing /v1"]
    elif case == "server down":
        judge_server.shutdown()
        judge_server.server_close()
        culprits = ["--judge-url", "not reachable"]
    elif case == "missing images":
        ugb.image_path(folder, prompts[1].index, 1).unlink()
        ugb.image_path(folder, prompts[2].index, 0).unlink()
        culprits = [f"2 of 6 images missing in {folder} (first: 1_1.png, 2_0.png)"]
    elif case == "jpg folder":
        folder = make_bench(tmp_path / "jpgs", suffix="jpg")[1]
        args["--images"] = folder
        culprits = ["found 0_0.jpg: pass --image-suffix jpg"]
    elif case == "other prompt set":
        write_generate_json(folder, ugb.load_prompts()[:5], "test_prompts_en.csv")
        culprits = ["generated from the prompt set test_prompts_en.csv", prompt_file.name, "--prompts"]
    elif case == "no such prompts":
        args["--prompts"] = tmp_path / "nope.jsonl"
        culprits = ["--prompts", "nope.jsonl"]
    elif case == "no such folder":
        args["--images"] = tmp_path / "nowhere"
        culprits = ["--images", "nowhere"]
    elif case == "bad flag value":
        args["--n"] = "two"
        culprits = ["--n", "two"]
    rc, out, err = cli("evaluate", *[x for kv in args.items() for x in kv])
    assert_one_line_error(rc, err, *culprits)
    assert len(err.strip().splitlines()) == 1 and not (folder / "results.jsonl").exists()
    assert judge_server.seen == []
    if case == "jpg folder":  # and with the flag, the folder is judged
        rc, out, err = cli("evaluate", *[x for kv in args.items() for x in kv], "--image-suffix", "jpg")
        assert rc == 0 and len(ugb.read_results(folder / "results.jsonl")) == 6, err


def test_the_api_key_is_sent_but_never_printed(judge_server, bench, monkeypatch):
    prompts, folder, _ = bench
    monkeypatch.setenv("UGB_TEST_KEY", "sk-secret-123")
    judge_server.behaviour = lambda text: 503
    judge = ugb.server_judge(judge_server.url, key_env="UGB_TEST_KEY", retries=1)
    ugb.evaluate(prompts[:1], folder, folder / "r.jsonl", judge, n=2)
    assert "sk-secret-123" not in (folder / "r.jsonl").read_text()
    assert ugb.scrub("echo sk-secret-123", "UGB_TEST_KEY") == "echo ***"


def test_a_judge_that_never_answers_gets_11_requests_and_no_sampling_field(judge_server, tmp_path):
    prompts, folder, prompt_file = make_bench(tmp_path / "images", count=1, n=1)
    judge_server.behaviour = lambda text: time.sleep(0.5) or 500  # answers after the client has given up
    common = ["evaluate", "--images", str(folder), "--prompts", str(prompt_file), "--n", "1", "--judge-url",
              judge_server.url, "--judge-timeout", "0.1"]
    ugb.main(common)
    (record,) = ugb.read_results(folder / "results.jsonl").values()
    assert len(judge_server.seen) == 11 and record["attempts"] == 11  # range(max_retries + 1), max_retries 10
    assert record["scores"] is None and record["error"] == "timeout after 0.1 s"
    assert all(not set(body) & SAMPLING_FIELDS for body in judge_server.seen)
    judge_server.seen.clear()  # --judge-temperature 0: greedy, on request
    judge_server.behaviour = alternating_scores
    ugb.main(common + ["--retry-failed", "--judge-temperature", "0"])
    (body,) = judge_server.seen
    assert body["temperature"] == 0.0 and not set(body) & SAMPLING_FIELDS - {"temperature"}


def test_ctrl_c_keeps_every_finished_judgment_says_so_and_exits_130(judge_server, tmp_path):
    prompts, folder, prompt_file = make_bench(tmp_path / "images", count=4)
    judge_server.behaviour = lambda text: time.sleep(0.3) or alternating_scores(text)  # a slow judge
    args = ["evaluate", "--images", folder, "--prompts", prompt_file, "--n", 2, "--judge-url", judge_server.url,
            "--judge-workers", 2]  # all 8 images in one chunk: what finished of the running chunk must be kept
    results = folder / "results.jsonl"
    run = subprocess.Popen([sys.executable, str(HERE / "unigenbench.py"), *map(str, args)], cwd=HERE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(results.read_text().splitlines() if results.exists() else []) < 3:
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    kept = ugb.read_results(results)
    assert run.returncode == 130 and "Traceback" not in err, err
    assert f"the {len(kept)} judgments of this run that finished are in {results}" in err.strip().splitlines()[-1]
    assert 3 <= len(kept) < 8 and all(r["scores"] is not None for r in kept.values())
    judge_server.seen.clear()  # the same command goes on: only the images not kept are asked
    rc, _, err = cli(*args)
    assert rc == 0 and len(judge_server.seen) == 8 - len(kept) and len(ugb.read_results(results)) == 8, err


JUDGE_MODULE = """
import json, re

def judge(texts, images):  # every checkpoint met, in the official reply format
    with open("calls.jsonl", "a") as f:
        f.write(json.dumps([texts, [im.size for im in images]]) + "\\n")
    counts = [len(eval(re.search(r"<checkpoint>(.*?)</checkpoint>", t).group(1))) for t in texts]
    return [f"<analysis>{['looked'] * n!r}</analysis><score>{[1] * n!r}</score>" for n in counts]

def wrong_count(texts, images):
    return []

not_a_function = 3
"""


def test_judge_fn_plugs_in_a_judge_of_your_own(tmp_path):
    prompts, folder, prompt_file = make_bench(tmp_path / "images")
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_judges.py").write_text(JUDGE_MODULE)
    args = ["evaluate", "--images", folder, "--prompts", prompt_file, "--n", 2]
    rc, _, err = cli(*args, "--judge-fn", "my_judges:judge", cwd=work)  # found in the working directory
    assert rc == 0, err
    records = ugb.load_result_records(folder / "results.jsonl")
    assert len(records) == 6 and all(r["scores"] == [1] * len(r["checkpoints"]) for r in records)
    (texts, sizes), = [json.loads(line) for line in (work / "calls.jsonl").read_text().splitlines()]
    assert texts == [ugb.judge_prompt(p) for p in prompts for _ in range(2)] and sizes == [[16, 16]] * 6
    for spec, culprit in [("nowhere:judge", "No module named 'nowhere'"), ("my_judges", "module:function"),
                          ("my_judges:missing", "has no attribute 'missing'"),
                          ("my_judges:not_a_function", "not a function"),
                          ("my_judges:wrong_count", "returned 0 replies for 6 images, not one each")]:
        rc, _, err = cli(*args, "--results", folder / "other.jsonl", "--judge-fn", spec, cwd=work)
        assert_one_line_error(rc, err, f"--judge-fn {spec}", culprit)
        assert not (folder / "other.jsonl").exists() or not (folder / "other.jsonl").read_text()
    assert "toy_world" not in (HERE / "unigenbench.py").read_text()  # the demo plugs in the same way


BAD_FLAGS = {"generate": [("--n", -1), ("--steps", 0), ("--steps", -3), ("--batch-size", 0), ("--resolution", 100000),
                          ("--resolution", 8), ("--seed", -1), ("--guidance", "nan"), ("--max-sequence-length", 0)],
             "evaluate": [("--chunk", -1), ("--chunk", 0), ("--n", -2), ("--judge-retries", -1), ("--judge-timeout", 0),
                          ("--judge-workers", 0), ("--judge-max-tokens", 0), ("--judge-temperature", -1)]}


@pytest.mark.parametrize("command, flag, value", [(c, f, v) for c, bad in BAD_FLAGS.items() for f, v in bad])
def test_every_flag_is_range_checked_as_it_is_parsed(command, flag, value, tmp_path):
    required = (["--model", "nowhere/none", "--out", tmp_path / "out"] if command == "generate" else
                ["--images", tmp_path, "--judge-url", "http://127.0.0.1:9/v1"])
    rc, _, err = cli(command, *required, flag, value)
    assert_one_line_error(rc, err, f"argument {flag}:", str(value))
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["--out a file", "--lora a file", "--lora missing", "--prompts a folder",
                                  "--results a folder", "--images a file", "report of a folder"])
def test_bad_paths_are_one_line_before_any_model_loads(case, hub_cache, tmp_path):
    prompts, folder, prompt_file = make_bench(tmp_path / "images")
    (afile := tmp_path / "a-file").write_text("x")
    generate = ["generate", "--model", HUB_IDS["flux"], "--out", tmp_path / "out", "--prompts", prompt_file]
    evaluate = ["evaluate", "--images", folder, "--prompts", prompt_file, "--n", 2, "--judge-local", "nowhere/none"]
    args, culprits = {  # a model loaded first would fail or take time; the path is named before that
        "--out a file": (generate[:4] + [afile] + generate[5:], ["--out", "is a file"]),
        "--lora a file": (generate + ["--lora", afile], ["--lora", "pytorch_lora_weights.safetensors"]),
        "--lora missing": (generate + ["--lora", tmp_path / "nowhere"], ["--lora", "nowhere"]),
        "--prompts a folder": (generate[:-1] + [tmp_path], ["--prompts", "a folder"]),
        "--results a folder": (evaluate + ["--results", tmp_path], ["--results", "is a folder"]),
        "--images a file": (evaluate[:2] + [afile] + evaluate[3:], ["--images", "not a folder"]),
        "report of a folder": (["report", folder], ["report", "is a folder"])}[case]
    started = time.monotonic()
    rc, _, err = cli(*args, env=offline_env(hub_cache))
    assert_one_line_error(rc, err, *culprits)
    assert time.monotonic() - started < 20 and not (tmp_path / "out").exists() or case == "--out a file"


def test_a_read_only_results_file_is_refused_before_the_judge_loads(tmp_path, monkeypatch):
    prompts, folder, prompt_file = make_bench(tmp_path / "images")
    for results in (folder / "results.jsonl", folder / "new" / "results.jsonl"):  # read-only file, read-only folder
        readonly = results if results.parent == folder else folder
        (results.write_text("") if readonly == results else None, readonly.chmod(0o555))
        if os.access(readonly, os.W_OK):  # root writes anyway: answer as the kernel answers every other user
            monkeypatch.setattr(os, "access", lambda p, mode, real=os.access: real(p, mode) and Path(p) != readonly)
        with pytest.raises(SystemExit) as e:
            ugb.main(["evaluate", "--images", str(folder), "--prompts", str(prompt_file), "--n", "2", "--judge-local",
                      "nowhere/none", "--results", str(results)])
        assert f"--results {results}: cannot write there ({readonly} is read-only)" in str(e.value)
        readonly.chmod(0o755)
        monkeypatch.undo()


def test_report_refuses_a_results_file_holding_two_prompt_sets(tmp_path):
    two_sets = [dict(HAND_MADE[0], prompt_set="aaa", expected=1), dict(HAND_MADE[2], prompt_set="bbb", expected=1)]
    mixed = write_results(tmp_path / "run" / "results.jsonl", two_sets)
    rc, _, err = cli("report", mixed)
    assert_one_line_error(rc, err, mixed, "2 prompt sets (aaa, bbb)")
    assert not (tmp_path / "run" / "report.md").exists()


# ------------------------------------------------------------------------------------ end to end: tiny models
@pytest.mark.parametrize("device, flag, dtype", [("cuda", "fp16", "float16"), ("cuda", "bf16", "bfloat16"),
                                                 ("cpu", "fp16", "float32"), ("cpu", "bf16", "float32")])
def test_generation_dtype_is_the_official_fp16_on_cuda(device, flag, dtype):
    assert ugb.generation_dtype(device, flag) == dtype


def test_generate_uses_the_official_settings(tmp_path, monkeypatch):
    import pref_grpo
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the choice made on a GPU machine, checked here
    monkeypatch.setattr(pref_grpo, "load_pipeline", lambda *a: calls.append(a) or object())
    monkeypatch.setattr(pref_grpo, "generate_images", lambda pipe, prompts, seeds, **kw: calls.append((seeds, kw))
                        or [Image.new("RGB", (8, 8))] * len(prompts))
    prompts = ugb.load_prompts()[:3]
    assert ugb.generate(prompts, tmp_path / "dev", "black-forest-labs/FLUX.1-dev", batch_size=8) == 12
    settings = json.loads((tmp_path / "dev" / "generate.json").read_text())
    assert {k: settings[k] for k in ("resolution", "steps", "guidance", "seed", "max_sequence_length", "n")} == dict(
        resolution=1024, steps=30, guidance=3.5, seed=3407, max_sequence_length=512, n=4)
    assert settings["prompt_set"] in ("prompts.jsonl", "?") and settings["dtype"] == "fp16"
    assert calls[0] == ("black-forest-labs/FLUX.1-dev", "cuda", torch.float16)  # as the official inference
    (seeds_1, kw), (seeds_2, _) = calls[1], calls[2]
    assert seeds_1 + seeds_2 == [3407, 3408, 3409, 3410] * 3  # seed 3407 + j, the same for every prompt
    assert kw == dict(steps=30, resolution=1024, guidance=3.5, shift=None, max_sequence_length=512, batch_size=8,
                      cfg_scale=1.0)  # FLUX.1: no true CFG, as officially
    calls.clear()
    ugb.generate(prompts[:1], tmp_path / "bf16", "black-forest-labs/FLUX.1-dev", n=1, dtype="bf16")
    assert calls[0] == ("black-forest-labs/FLUX.1-dev", "cuda", torch.bfloat16)
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ugb.generate(prompts[:1], tmp_path / "tiny", "tiny", n=1)
    assert calls[0] == ("tiny", "cpu", torch.float32)
    assert calls[1][1]["steps"] == 4 and calls[1][1]["resolution"] == 32


def test_generate_with_tiny_model_is_resumable_and_deterministic(tmp_path):
    prompts = ugb.load_prompts()[:2]
    out = tmp_path / "images"
    kw = dict(n=2, steps=2, resolution=32, batch_size=3)
    assert ugb.generate(prompts, out, "tiny", **kw) == 4
    files = sorted(f.name for f in out.glob("*.png"))
    assert files == sorted(f"{p.index}_{j}.png" for p in prompts for j in range(2))
    first = {f: np.asarray(Image.open(out / f)) for f in files}
    assert not np.array_equal(first[files[0]], first[files[1]])  # a different seed per image
    assert ugb.generate(prompts, out, "tiny", **kw) == 0  # everything there: nothing made
    (out / files[1]).unlink()
    assert ugb.generate(prompts, out, "tiny", **kw) == 1
    assert np.array_equal(np.asarray(Image.open(out / files[1])), first[files[1]])  # the same seed, the same image
    assert not list(out.glob("*.part"))
    with pytest.raises(SystemExit, match="other settings"):
        ugb.generate(prompts, out, "tiny", **dict(kw, steps=3))


def test_generate_cli_applies_a_lora_checkpoint(tmp_path):
    import pref_grpo
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = pref_grpo.load_pipeline("tiny")  # save a LoRA the way training does, with random (non-zero) weights
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                            init_lora_weights=False))
    FluxPipeline.save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    prompt_file = tmp_path / "one.jsonl"
    prompt_file.write_text(ugb.DEFAULT_PROMPTS.read_text().splitlines()[0] + "\n")
    common = ["generate", "--model", "tiny", "--prompts", str(prompt_file), "--n", "1", "--steps", "2"]
    ugb.main(common + ["--out", str(tmp_path / "base")])
    ugb.main(common + ["--out", str(tmp_path / "trained"), "--lora", str(tmp_path / "lora")])
    base, trained = (np.asarray(Image.open(tmp_path / run / "0_0.png")) for run in ("base", "trained"))
    assert base.shape == trained.shape == (32, 32, 3) and not np.array_equal(base, trained)


def test_hub_ids_load_offline_from_the_cache_as_a_user_runs_them(hub_cache, tmp_path):
    env = offline_env(hub_cache)
    prompt_file = tmp_path / "one.jsonl"
    prompt_file.write_text(ugb.DEFAULT_PROMPTS.read_text().splitlines()[0] + "\n")
    out = tmp_path / "flux"
    rc, _, err = cli("generate", "--model", HUB_IDS["flux"], "--out", out, "--prompts", prompt_file, "--n", 1,
                     "--resolution", 32, "--steps", 2, env=env)
    assert rc == 0 and (out / "0_0.png").exists(), err
    rc, out_text, err = cli("evaluate", "--images", out, "--prompts", prompt_file, "--n", 1, "--judge-local",
                            HUB_IDS["ugb_judge"], "--judge-max-tokens", 8, env=env)
    assert rc == 0 and "Traceback" not in err, err
    (r,) = ugb.read_results(out / "results.jsonl").values()  # one attempt: greedy decoding would only repeat itself
    assert r["attempts"] == 1 and isinstance(r["reply"], str) and r["file"] == "0_0.png"
    assert (r["scores"] is None) == (r["error"] is not None)  # a random judge writes noise: recorded as failed


def test_runs_as_a_single_file_beside_pref_grpo(judge_server, tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("unigenbench.py", "pref_grpo.py"):
        shutil.copy(HERE / name, alone / name)
    prompt_file = tmp_path / "two.jsonl"
    prompt_file.write_text("".join(line + "\n" for line in ugb.DEFAULT_PROMPTS.read_text().splitlines()[:2]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = alone / "unigenbench.py"
    rc, out, err = cli("generate", "--model", "tiny", "--out", alone / "run", "--prompts", prompt_file, "--n", 2,
                       cwd=alone, env=env, script=script)
    assert rc == 0 and len(list((alone / "run").glob("*.png"))) == 4, err
    assert "32 px, 4 steps, guidance 3.5, seeds 3407..3408" in out
    rc, out, err = cli("evaluate", "--images", alone / "run", "--prompts", prompt_file, "--n", 2, "--judge-url",
                       judge_server.url, cwd=alone, env=env, script=script)
    assert rc == 0 and len(judge_server.seen) == 4, err
    rc, out, err = cli("report", alone / "run" / "results.jsonl", cwd=alone, env=env, script=script)
    assert rc == 0 and "| Coverage (judged / expected images) | 4/4 (100.0%) |" in out, err
    assert (alone / "run" / "report.md").exists() and "import mllm" not in script.read_text()


def test_evaluate_and_report_need_neither_torch_nor_pref_grpo(judge_server, tmp_path):
    alone = tmp_path / "alone"  # unigenbench.py alone, and a torch that fails on import: neither is needed
    alone.mkdir()
    shutil.copy(HERE / "unigenbench.py", alone / "unigenbench.py")
    (alone / "torch.py").write_text("raise ImportError('torch was imported')\n")
    prompts, folder, prompt_file = make_bench(tmp_path / "images")
    env, script = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, alone / "unigenbench.py"
    rc, _, err = cli("evaluate", "--images", folder, "--prompts", prompt_file, "--n", 2, "--judge-url", judge_server.url,
                     cwd=alone, env=env, script=script)
    assert rc == 0 and len(ugb.read_results(folder / "results.jsonl")) == 6, err
    rc, out, err = cli("report", folder / "results.jsonl", cwd=alone, env=env, script=script)
    assert rc == 0 and "| 6/6 (100.0%) |" in out, err
    rc, _, err = cli("generate", "--model", "tiny", "--out", tmp_path / "out", cwd=alone, env=env, script=script)
    assert_one_line_error(rc, err, "--prompts", "prompts.jsonl: no such file", "beside unigenbench.py")


def test_help_shows_examples_and_every_flag_has_a_help_with_its_default():
    rc, out, _ = cli("--help")
    assert rc == 0 and "python unigenbench.py generate --model black-forest-labs/FLUX.1-dev" in out
    assert "--served-model-name QwenVL" in out and "--judge-local CodeGoat24/UniGenBench-EvalModel" in out
    for command in ("generate", "evaluate", "report"):
        rc, out, _ = cli(command, "--help")
        flags = re.findall(r"^  (--[a-z-]+)", out, re.MULTILINE)
        assert rc == 0 and len(flags) >= 2
        blocks = re.split(r"\n  (?=-)", out.split("options:")[1])[1:]
        for block in blocks:
            if not block.startswith("-h"):
                assert ("default:" in block or "required" in block) and block.count("default:") <= 1, block
    assert "{png,jpg,jpeg,webp}" in cli("evaluate", "--help")[1]
    assert len((HERE / "unigenbench.py").read_text().splitlines()) <= 700
