"""Tests for unigenbench.py: CPU only, nothing downloaded (tiny random models, a judge server on 127.0.0.1)."""
import csv
import json
import re
import threading
import warnings
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unigenbench as ugb

DATA = Path(__file__).parent.parent / "shared" / "unigenbench-data"
OFFICIAL = {"test_prompts_en.csv": "en", "test_prompts_en_long.csv": "en_long", "test_prompts_zh.csv": "zh",
            "test_prompts_zh_long.csv": "zh_long", "prefgrpo_unigenbench_test_data.csv": "prefgrpo_paper_en"}
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="official UniGenBench data not found beside the repo")


@pytest.fixture(scope="module")
def taxonomy():
    return json.loads((DATA / "unigenbench_taxonomy_derived.json").read_text(encoding="utf-8"))


def load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ugb.load_prompts(path)


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
    assert [p.index for p in prompts] == list(range(600))
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
    assert len(prompts) >= 60
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
def test_criteria_table_matches_the_taxonomy_in_our_own_words(taxonomy):
    assert len(ugb.SUB_CRITERIA) == 27 and len(ugb.PRIMARIES) == 10

    def four_grams(text):
        words = re.findall(r"[a-z']+", text.lower())
        return {tuple(words[i:i + 4]) for i in range(len(words) - 3)}
    for dim in taxonomy["evaluation_dimensions"]:
        for sub in dim["sub_dimensions"]:
            ours = ugb.SUB_CRITERIA[sub["name_en"]]
            assert (ours.primary, ours.zh) == (dim["primary_en"], sub["name_zh"])
            assert not four_grams(ours.definition) & four_grams(sub["definition_en"]), sub["name_en"]


@pytest.mark.parametrize("content, error", [
    ("not json at all", "not a prompt record"),
    ('{"index": 0, "prompt": "a cat", "Testpoints": ["Style"], "Testpoint Description": []}', "equal length"),
    ('{"index": 0, "prompt": "a cat", "Testpoints": ["Colour"], "Testpoint Description": ["a"]}', "unknown checkpoint"),
])
def test_bad_prompt_files_give_one_line_errors(tmp_path, content, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(SystemExit, match=error) as e:
        ugb.load_prompts(path)
    assert "\n" not in str(e.value)
    broken = tmp_path / "broken.csv"
    broken.write_text('index,prompt_en,sub_dims_en\n0,a cat,"{""Testpoints"": [""Style""" ""x""]"\n')
    with pytest.raises(SystemExit, match="malformed"):
        ugb.load_prompts(broken)


# ------------------------------------------------------------------------------------------------ judge replies
@pytest.mark.parametrize("reply, n, scores, error", [
    ("<analysis>style ok; two cats</analysis>\n<score>[1, 0]</score>", 2, [1, 0], None),
    ("Sure! Here you go.\n<analysis>fine</analysis><score>[1,1,0]</score>\nHope this helps.", 3, [1, 1, 0], None),
    ("<ANALYSIS>x</ANALYSIS><SCORE>[ 0 ]", 1, [0], None),                       # case, spaces, no closing tag
    ("<score>[0, 0]</score> on reflection: <score>[1, 1]</score>", 2, [1, 1], None),  # the last list counts
    ("<analysis>a</analysis><score>[1, 0]</score>", 3, None, "expected 3 scores, got 2"),
    ("<score>[1, 0, 1, 1]</score>", 3, None, "expected 3 scores, got 4"),
    ("The image matches. Scores: 1, 0, 1", 3, None, "no <score>"),
    ("<score>[1, 2, 0]</score>", 3, None, "0 or 1"),
    ("<score>[yes, no]</score>", 2, None, "0 or 1"),
    ("<score>[0.5, 1]</score>", 2, None, "0 or 1"),
    ("<score>[]</score>", 1, None, "0 or 1"),
    (None, 2, None, "no reply"),
])
def test_parse_reply(reply, n, scores, error):
    got, _, err = ugb.parse_reply(reply, n)
    assert got == scores
    assert (err is None) if error is None else (error in err)


def test_instruction_lists_every_checkpoint_with_definition_and_description():
    p = ugb.BenchPrompt(0, "two red foxes", "Art", "Other", "Animal",
                        (("Attribute - Quantity", "two"), ("Attribute - Color", "red foxes")))
    text = ugb.judge_instruction(p)
    assert '"two red foxes"' in text and "exactly 2 scores" in text and "<score>[s1, s2]</score>" in text
    assert f'1. Attribute - Quantity: {ugb.SUB_CRITERIA["Attribute - Quantity"].definition}. In this prompt: "two"' in text


# ---------------------------------------------------------------------------------------------------- scoring
def record(index, theme, names, scores, image=0):
    return {"index": index, "image": image, "theme": theme, "checkpoints": [[n, "..."] for n in names],
            "scores": scores}


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


def test_compare_table_with_deltas(tmp_path, capsys):
    base = write_results(tmp_path / "base" / "results.jsonl", HAND_MADE)
    better = [dict(r, scores=[1] * len(r["checkpoints"])) for r in HAND_MADE[:4]]
    trained = write_results(tmp_path / "trained" / "results.jsonl", better)
    ugb.main(["report", base, trained, "--out", str(tmp_path / "cmp")])
    table = (tmp_path / "cmp.md").read_text()
    assert "| Dimension | base | trained | Δ trained |" in table
    assert "| **Overall** | 70.00 | 100.00 | +30.00 |" in table
    assert "| **Attribute** | 60.00 | 100.00 | +40.00 |" in table
    assert "| 5 (1 failed) | 4 (0 failed) |" in table
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["trained"]["overall"] == 100.0 and saved["base"]["failed"] == 1
    assert "Δ trained" in capsys.readouterr().out
    ugb.main(["report", base])  # one run: report.json / report.md beside it
    assert "| **Overall** | 70.00 |" in (tmp_path / "base" / "report.md").read_text()


def test_report_rejects_malformed_results(tmp_path):
    bad = write_results(tmp_path / "r.jsonl", [record(0, "Art", ["Style"], [1, 1])])
    with pytest.raises(SystemExit, match="malformed record"):
        ugb.report([bad])
    with pytest.raises(SystemExit, match="no judge results"):
        ugb.report([str(tmp_path / "missing.jsonl")])


# ------------------------------------------------------------------------------------ end to end: judge server
class FakeJudge(BaseHTTPRequestHandler):
    """OpenAI chat-completions on 127.0.0.1. `behaviour(text) -> reply text or HTTP status` is set per test."""

    def log_message(self, *args):
        pass

    def send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.send(200, {"object": "list", "data": [{"id": "judge", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        parts = body["messages"][-1]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        image = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        with self.server.lock:
            self.server.seen.append((text, image, body["temperature"]))
        reply = self.server.behaviour(text)
        if isinstance(reply, int):
            self.send(reply, {"error": {"message": "judge overloaded"}})
        else:
            self.send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": reply}}]})


def alternating_scores(text):
    """A well-behaved judge: checkpoint k (from 1) scores 1 when k is odd."""
    n = len(re.findall(r"^\d+\. ", text, re.MULTILINE))
    return "<analysis>looked at each checkpoint</analysis>\n<score>[" + ", ".join(
        str(k % 2) for k in range(1, n + 1)) + "]</score>"


@pytest.fixture
def judge_server(monkeypatch):
    import mllm

    monkeypatch.setattr(mllm, "RETRY_BACKOFF_S", 0.01)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    server.lock, server.seen, server.behaviour = threading.Lock(), [], alternating_scores
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def bench(tmp_path):
    """The first 3 of our prompts, 2 images each, every image a different colour (so each request is traceable)."""
    prompts = ugb.load_prompts()[:3]
    for p in prompts:
        for j in range(2):
            Image.new("RGB", (16, 16), (40 * p.index, 100 * j, 7)).save(ugb.image_path(tmp_path, p.index, j))
    return prompts, tmp_path


def test_server_judge_end_to_end_with_kill_and_resume(judge_server, bench):
    prompts, folder = bench
    results = folder / "results.jsonl"
    judge = ugb.server_judge(judge_server.url, "judge", workers=2, retries=0)
    calls = []

    def killed_after_two_chunks(requests, temperature=0.0):
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the run were stopped here
        calls.append(len(requests))
        return judge(requests, temperature)

    with pytest.raises(KeyboardInterrupt):
        ugb.evaluate(prompts, folder, results, killed_after_two_chunks, n=2, chunk=2)
    first = list(judge_server.seen)
    assert len(first) == 4 and len(results.read_text().splitlines()) == 4
    with open(results, "a") as f:
        f.write('{"index": 2, "ima')  # a hard kill in the middle of a line
    judge_server.seen.clear()
    with pytest.warns(UserWarning, match="unreadable line"):
        counts = ugb.evaluate(prompts, folder, results, judge, n=2, chunk=2)
    assert counts == {"judged": 2, "failed": 0}
    second = judge_server.seen
    assert len(second) == 2 and not {img for _, img, _ in first} & {img for _, img, _ in second}
    with pytest.warns(UserWarning):
        done = ugb.read_results(results)
    assert sorted(done) == [(p.index, j) for p in prompts for j in range(2)]
    for (index, _), r in done.items():
        n = len(r["checkpoints"])
        assert r["scores"] == [k % 2 for k in range(1, n + 1)] and r["error"] is None and r["attempts"] == 1
    assert all(temperature == 0.0 for _, _, temperature in first + second)
    summary = ugb.summarize(list(done.values()))
    total = sum(len(p.checkpoints) for p in prompts) * 2
    assert summary["judged"] == 6 and sum(v["checkpoints"] for v in summary["primary"].values()) == total
    judge_server.seen.clear()
    with pytest.warns(UserWarning):
        assert ugb.evaluate(prompts, folder, results, judge, n=2) == {"judged": 0, "failed": 0}
    assert judge_server.seen == []  # complete: nothing is asked twice


def test_server_errors_and_malformed_replies_are_recorded_as_failed(judge_server, bench):
    prompts, folder = bench
    bad_count, down = prompts[0].prompt, prompts[1].prompt

    def behaviour(text):
        if bad_count in text:
            return "<analysis>hm</analysis><score>[1]</score>"  # always the wrong number of scores
        return 500 if down in text else alternating_scores(text)
    judge_server.behaviour = behaviour
    judge = ugb.server_judge(judge_server.url, "judge", workers=4, retries=1)
    results = folder / "out" / "results.jsonl"
    counts = ugb.evaluate(prompts, folder, results, judge, n=2, parse_retries=2)
    assert counts == {"judged": 2, "failed": 4}
    done = ugb.read_results(results)
    for j in range(2):
        wrong, error, good = done[(prompts[0].index, j)], done[(prompts[1].index, j)], done[(prompts[2].index, j)]
        assert wrong["scores"] is None and "expected" in wrong["error"] and wrong["attempts"] == 3
        assert error["scores"] is None and "no reply" in error["error"] and error["attempts"] == 1
        assert good["scores"] is not None
    asked = Counter(text for text, _, _ in judge_server.seen)
    assert [asked[ugb.judge_instruction(p)] for p in prompts] == [6, 4, 2]  # 3 tries x 2; (1 + 1 retry) x 2; 1 x 2
    assert {t for text, _, t in judge_server.seen if bad_count in text} == {0.0, 0.7}  # retries sample
    s = ugb.summarize(list(done.values()))
    assert (s["images"], s["failed"]) == (6, 4)
    # The server recovers: --retry-failed asks again for exactly the 4 failed images.
    judge_server.behaviour, judge_server.seen = alternating_scores, []
    assert ugb.evaluate(prompts, folder, results, judge, n=2, retry_failed=True) == {"judged": 4, "failed": 0}
    assert len(judge_server.seen) == 4 and ugb.summarize(list(ugb.read_results(results).values()))["failed"] == 0


def test_dead_server_and_missing_images_give_one_line_errors(bench, tmp_path):
    prompts, folder = bench
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompt_file = tmp_path / "three.jsonl"
    prompt_file.write_text("".join(line + "\n" for line in ugb.DEFAULT_PROMPTS.read_text().splitlines()[:3]))
    args = ["evaluate", "--images", str(folder), "--prompts", str(prompt_file), "--n", "2", "--judge-model", "judge",
            "--judge-url", f"http://127.0.0.1:{port}/v1"]
    with pytest.raises(SystemExit, match="judge server .* is not reachable") as e:
        ugb.main(args)
    assert "\n" not in str(e.value)
    ugb.image_path(folder, prompts[1].index, 1).unlink()
    ugb.image_path(folder, prompts[2].index, 0).unlink()
    with pytest.raises(SystemExit) as e:  # checked before any judge is contacted
        ugb.main(args)
    assert str(e.value).startswith(f"2 of 6 images missing in {folder} (first: 1_1.png, 2_0.png)")
    assert "\n" not in str(e.value)
    assert not (folder / "results.jsonl").exists()


# ------------------------------------------------------------------------------------ end to end: tiny models
def test_tiny_local_vlm_end_to_end_bookkeeping(bench):
    prompts, folder = bench
    judge = ugb.local_judge("tiny", max_tokens=6)
    results = folder / "tiny.jsonl"
    counts = ugb.evaluate(prompts[:1], folder, results, judge, n=2, parse_retries=1)
    assert counts["judged"] + counts["failed"] == 2
    done = ugb.read_results(results)
    assert sorted(done) == [(prompts[0].index, 0), (prompts[0].index, 1)]
    for r in done.values():  # a random model writes noise: recorded as failed, with its reply kept for inspection
        assert isinstance(r["reply"], str)
        assert (r["scores"] is None) == (r["error"] is not None)
    assert ugb.summarize(list(done.values()))["failed"] == counts["failed"]


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
    common = ["generate", "--model", "tiny", "--prompts", str(prompt_file), "--n", "1", "--steps", "2",
              "--resolution", "32"]
    ugb.main(common + ["--out", str(tmp_path / "base")])
    ugb.main(common + ["--out", str(tmp_path / "trained"), "--lora", str(tmp_path / "lora")])
    base, trained = (np.asarray(Image.open(tmp_path / run / "0_0.png")) for run in ("base", "trained"))
    assert base.shape == trained.shape == (32, 32, 3) and not np.array_equal(base, trained)
