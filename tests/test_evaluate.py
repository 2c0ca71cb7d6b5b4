"""evaluate.py: judge-free metrics on hand-made examples, the judge protocol against a fake
OpenAI-compatible server, an end-to-end run on a tiny checkpoint, training-curve plots, bad input,
and a real-data run on public AlpacaEval answers (skipped where ../shared is absent)."""
import json
import os
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import evaluate as ev
from evaluate import bootstrap, clipped_ngram_matches, lcs_length, parse_scores, rouge_l, words

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def row(i, q, teacher=None):
    r = {"id": f"q{i}", "messages": [{"role": "user", "content": q}]}
    if teacher is not None:
        r["teacher"] = teacher
    return r


# -----------------------------------------------------------------------------
# judge-free metrics

def lcs_textbook(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_words_and_ngrams():
    assert words("The cat, the HAT!") == ["the", "cat", ",", "the", "hat", "!"]
    # BLEU paper's example: modified unigram precision 2/7
    cand, ref = words("the the the the the the the"), words("the cat is on the mat")
    assert clipped_ngram_matches(cand, ref, 1) == (2, 7)
    cand, ref = words("the cat sat on the mat"), words("the cat is on the mat")
    assert clipped_ngram_matches(cand, ref, 1) == (5, 6)
    assert clipped_ngram_matches(cand, ref, 2) == (3, 5)  # the cat, on the, the mat
    assert clipped_ngram_matches(cand, ref, 3) == (1, 4)  # on the mat
    assert clipped_ngram_matches(cand, ref, 6) == (0, 1)
    assert clipped_ngram_matches(words("too short"), ref, 3) == (0, 0)  # no trigrams: adds nothing


def test_lcs_and_rouge_l():
    assert lcs_length(list("abcd"), list("acde")) == 3
    assert rouge_l(list("abcd"), list("acde")) == pytest.approx(0.75)
    # P = 3/3, R = 3/6 -> F = 2/3
    assert rouge_l(words("a c e"), words("a b c d e f")) == pytest.approx(2 / 3)
    assert rouge_l([], ["a"]) == 0.0 and rouge_l(["a"], []) == 0.0 and rouge_l(["x"], ["y"]) == 0.0
    assert rouge_l(words("same text here"), words("same text here")) == 1.0
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randint(0, 5) for _ in range(rng.randint(0, 70))]
        b = [rng.randint(0, 5) for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == lcs_textbook(a, b)


def test_bootstrap():
    r = bootstrap([2.0] * 10)
    assert r == {"mean": 2.0, "lo": 2.0, "hi": 2.0, "n": 10}
    vals = [float(i) for i in range(100)]
    a, b = bootstrap(vals, seed=3), bootstrap(vals, seed=3)
    assert a == b and a["lo"] < 49.5 < a["hi"] and a["mean"] == 49.5
    assert 40 < a["lo"] and a["hi"] < 60
    r = bootstrap([1, 0, 3], [2, 2, 4])  # corpus-level ratio, not the mean of ratios
    assert r["mean"] == pytest.approx(0.5)
    assert bootstrap([])["mean"] is None and bootstrap([0, 0], [0, 0])["mean"] is None


def test_parse_scores():
    assert parse_scores("8 7\nAssistant 1 was better.") == (8.0, 7.0)
    assert parse_scores("\n  9.5, 6\nbecause") == (9.5, 6.0)
    assert parse_scores("**8** **6**") == (8.0, 6.0)
    assert parse_scores("8/10 7/10") == (8.0, 7.0)
    for bad in ("I think both are good.\n8 7", "8", "8 7 6", "11 3", "0 0", ""):
        with pytest.raises(ValueError):
            parse_scores(bad)


# -----------------------------------------------------------------------------
# the judge, against a fake OpenAI-compatible server

def judge_reply(state):
    """The fake judge's answer to a request. A reference request gets "REF <question>". A pairwise
    request scores each answer by its `[score=k]` tag (the reference: 8), plus 1 for Assistant 1
    (a position bias). An answer tagged [garbled] gets one unparseable reply before a good one;
    [garbled-always] never gets a good one."""
    def score(answer):
        return 8 if answer.startswith("REF ") else int(answer.split("[score=")[1].split("]")[0])

    def reply(model, messages):
        user = messages[-1]["content"]
        if not user.startswith("[Question]"):
            return "REF " + user
        a1 = user.split("[The Start of Assistant 1's Answer]\n")[1].split("\n\n[The End of Assistant 1's")[0]
        a2 = user.split("[The Start of Assistant 2's Answer]\n")[1].split("\n\n[The End of Assistant 2's")[0]
        with state["lock"]:
            first = user not in state["seen"]
            state["seen"].add(user)
        if "[garbled-always]" in user or ("[garbled]" in user and first):
            return "Both assistants did well; here is my analysis."
        return f"{score(a1) + 1} {score(a2)}\nAssistant 1 is more detailed."
    return reply


@pytest.fixture
def fake_judge(monkeypatch):
    """tests/fake_openai.py's server, answering as the judge above; a 500 on the first try of
    every third request, which the client retries."""
    import fake_openai
    import prepare_teacher
    monkeypatch.setattr(prepare_teacher, "BACKOFF_BASE", 0.001)
    monkeypatch.setattr(fake_openai, "answer_for", judge_reply({"lock": threading.Lock(), "seen": set()}))
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-test")
    faults = lambda prompt, attempt: "500" if attempt == 1 and len(prompt) % 3 == 0 else None
    with fake_openai.FakeOpenAI(api_key="sk-test", faults=faults) as srv:
        srv.requests = lambda: [b["messages"] for b in srv.bodies]
        yield srv


def test_judge_protocol(fake_judge, tmp_path, capsys):
    questions = ["What is 2+2?", "Name a color.", "Say hi."]
    test = write_jsonl(tmp_path / "set.jsonl", [row(i, q, f"teacher answer {i} [score=7]") for i, q in enumerate(questions)])
    # answers files: one by id, one matched by prompt text (other ids)
    a = write_jsonl(tmp_path / "a.jsonl", [{**row(i, q), "answer": f"A{i} [score={s}]"}
                                            for i, (q, s) in enumerate(zip(questions, [6, 8, 4]))])
    b = write_jsonl(tmp_path / "b.jsonl", [{**row(10 + i, q), "answer": t}
                                            for i, (q, t) in enumerate(zip(questions, ["B [score=6] [garbled]", "B [score=2]",
                                                                                       "B [score=5] [garbled-always]"]))])
    out = tmp_path / "out"
    argv = ["--models", f"a={a}", f"b={b}", "teacher", "--test-sets", f"toy={test}", "--out-dir", str(out),
            "--judge", "--judge-base-url", fake_judge.url, "--judge-api-key-env", "FAKE_JUDGE_KEY",
            "--judge-retries", "2", "--judge-workers", "2", "--bootstrap", "200"]
    assert ev.main(argv) == 0
    assert any(fault == "500" for _, _, fault in fake_judge.log)  # and they were retried
    ok = [m for m, (_, _, fault) in zip(fake_judge.requests(), fake_judge.log) if fault is None]
    refs = [m for m in ok if not m[-1]["content"].startswith("[Question]")]
    assert len(refs) == 3  # one reference per prompt, shared by the three models
    pair = [m for m in ok if m[-1]["content"].startswith("[Question]")]
    assert pair[0][0]["role"] == "system" and ev.JUDGE_PROMPT in pair[0][-1]["content"]
    always = sum("[garbled-always]" in m[-1]["content"] for m in pair)
    assert always >= 2  # retried before giving up
    assert len(pair) == 9 + 1 + always - 1  # 9 pairs, 1 retry of [garbled], the retries of [garbled-always]
    res = json.loads((out / "results.json").read_text())
    j = res["results"]["toy"]
    # paper order: the model is Assistant 1 and gets the judge's +1
    assert j["a"]["judge"]["mean"] == pytest.approx(sum(100 * s / (s + 8) for s in (7, 9, 5)) / 3)
    assert j["teacher"]["judge"]["mean"] == pytest.approx(100 * 8 / 16)
    assert j["b"]["judge"]["mean"] == pytest.approx((100 * 7 / 15 + 100 * 3 / 11) / 2)
    assert j["b"]["judge"]["n_failed"] == 1 and list(j["b"]["judge"]["failed"]) == ["q2"]
    assert j["a"]["judge"]["n_failed"] == 0
    per = res["per_prompt"]["toy"]["b"]
    assert per[2]["judge"]["score"] is None and "failed" in per[2]["judge"]
    md = (out / "results.md").read_text()
    assert "(1 failed)" in md and "| b |" in md
    assert "judge failed on 1 prompts of b on toy" in capsys.readouterr().out

    # a rerun is served from the cache; only the failed judgment is tried again
    n = len(fake_judge.bodies)
    assert ev.main(argv) == 0
    again = fake_judge.requests()[n:]
    assert len(again) >= always and all("[garbled-always]" in m[-1]["content"] for m in again)

    # both orders: the position bias cancels out
    n = len(fake_judge.bodies)
    assert ev.main(argv[:2] + argv[4:] + ["--both-orders"]) == 0  # model a only
    again = [m for m, (_, _, fault) in zip(fake_judge.requests()[n:], fake_judge.log[n:]) if fault is None]
    assert len(again) == 3  # only the swapped order is new
    a_res = json.loads((out / "results.json").read_text())["results"]["toy"]["a"]["judge"]
    swapped = [100 * s / (s + 9) for s in (6, 8, 4)]  # the reference is Assistant 1 now
    paper = [100 * s / (s + 8) for s in (7, 9, 5)]
    assert a_res["mean"] == pytest.approx(sum((x + y) / 2 for x, y in zip(paper, swapped)) / 3)
    assert a_res["order1_score"] > a_res["order2_score"]
    assert "sk-test" not in (out / "results.json").read_text() + (out / "judge_cache.jsonl").read_text()


def test_judge_without_key_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    test = write_jsonl(tmp_path / "set.jsonl", [row(0, "hi", "hello")])
    rc = ev.main(["--models", "teacher", "--test-sets", test, "--out-dir", str(tmp_path / "o"), "--judge",
                  "--judge-api-key-env", "NO_SUCH_KEY_VAR", "--judge-base-url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    assert rc != 0 and "NO_SUCH_KEY_VAR" in err and len(err.strip().splitlines()) == 1


def test_judge_wrong_key_stops_with_one_line(fake_judge, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-wrongwrongwrong123")
    test = write_jsonl(tmp_path / "set.jsonl", [row(0, "hi", "hello")])
    rc = ev.main(["--models", "teacher", "--test-sets", test, "--out-dir", str(tmp_path / "o"), "--judge",
                  "--judge-api-key-env", "FAKE_JUDGE_KEY", "--judge-base-url", fake_judge.url])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert rc == 2 and last.startswith("evaluate.py: error: HTTP 401") and "wrongwrong" not in err


# -----------------------------------------------------------------------------
# end to end on a tiny checkpoint

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, smollm2_path):
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template."""
    import torch
    import transformers
    from model import load_tokenizer
    tok = load_tokenizer(smollm2_path)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_end_to_end_tiny_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    rows = [row(0, "What is the capital of France?", "The capital of France is Paris."),
            row(1, "Write a haiku.", "Autumn moonlight, a worm digs silently into the chestnut."),
            row(2, "Count to three.", "One, two, three.")]
    test = write_jsonl(tmp_path / "set.jsonl", rows)
    out = tmp_path / "out"
    argv = ["--models", f"tiny={tiny_ckpt}", "teacher", "--test-sets", f"toy={test}", "--out-dir", str(out),
            "--max-new-tokens", "6", "--batch-size", "2", "--bootstrap", "100"]
    assert ev.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    r = res["results"]["toy"]
    assert r["teacher"]["rougeL"]["mean"] == 100 and r["teacher"]["p6"]["mean"] is not None
    assert r["teacher"]["cut"]["mean"] == 0
    assert 0 <= r["tiny"]["rougeL"]["mean"] < 100 and r["tiny"]["len"]["n"] == 3
    assert res["config"]["length_unit"].startswith("tokens")
    gens = [json.loads(l) for l in open(out / "generations.jsonl")]
    assert len(gens) == 3 and all(g["n_tokens"] <= 6 for g in gens)
    cut = sum(not g["stopped"] for g in gens)
    assert r["tiny"]["cut"]["mean"] == pytest.approx(100 * cut / 3)
    md = (out / "results.md").read_text()
    assert "| tiny |" in md and "| teacher |" in md and "toy (n=3)" in md
    pytest.importorskip("matplotlib")
    assert (out / "results.png").stat().st_size > 1000
    answers = [json.loads(l) for l in open(out / "answers" / "tiny__toy.jsonl")]
    assert [a["answer"] for a in answers] == [g["answer"] for g in sorted(gens, key=lambda g: g["id"])]

    # a rerun does not generate again; another setting does, and only that
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("regenerated a cached answer"))
    assert ev.main(argv) == 0
    monkeypatch.undo()
    assert ev.main(argv[:-4] + ["--max-new-tokens", "3", "--bootstrap", "100"]) == 0
    assert len(open(out / "generations.jsonl").readlines()) == 6


def test_discriminator_score(tiny_ckpt, tmp_path):
    import torch
    from discriminator import Discriminator
    from model import end_of_turn_id, load_tokenizer, render_prompt
    tok = load_tokenizer(tiny_ckpt)
    torch.manual_seed(0)
    dpath = str(tmp_path / "disc")
    Discriminator.from_pretrained(tiny_ckpt).save_pretrained(dpath, tok)  # the student + a fresh head
    rows = [row(0, "Hi", "Hello!"), row(1, "Bye", "Goodbye, see you.")]
    test = write_jsonl(tmp_path / "set.jsonl", rows)
    out = tmp_path / "out"
    assert ev.main(["--models", "teacher", "--test-sets", test, "--out-dir", str(out),
                    "--discriminator", dpath, "--bootstrap", "50"]) == 0
    res = json.loads((out / "results.json").read_text())
    scores = [p["dscore"] for p in res["per_prompt"]["set"]["teacher"]]
    # the teacher's answer ends with the end-of-turn token, like a student answer that stopped
    d = Discriminator.from_pretrained(dpath).eval()
    for r, s in zip(rows, scores):
        ids = render_prompt(tok, r["messages"]) + tok.encode(r["teacher"], add_special_tokens=False) + [end_of_turn_id(tok)]
        with torch.no_grad():
            want = d(torch.tensor([ids]), torch.tensor([len(ids)])).item()
        assert s == pytest.approx(want, abs=1e-5)
    assert scores[0] != scores[1]
    assert res["results"]["set"]["teacher"]["dscore"]["mean"] == pytest.approx(sum(scores) / 2)
    assert "mean discriminator score" in (out / "results.md").read_text()


# -----------------------------------------------------------------------------
# training curves, bad input

def test_plot_metrics(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    lines = [{"step": s, "stage": "warmup" if s < 3 else "gad", "d_loss": 0.7 - 0.01 * s, "d_acc": 0.5 + 0.02 * s,
              "r_teacher": 0.1 * s, "r_student": -0.1 * s, "resp_len_mean": 100 + s, "resp_len_max": 300}
             for s in range(6)]
    for l in lines[3:]:
        l.update(kl=0.001 * l["step"], policy_loss=0.01)
    for l in lines[:3]:
        l["sft_loss"] = 2.0 - 0.1 * l["step"]
    del lines[1]["d_acc"]  # missing fields are fine
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(l) + "\n" for l in lines) + '{"step": 6, "d_lo')  # torn last line
    assert ev.main(["--plot-metrics", str(path)]) == 0
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert "torn last line" in capsys.readouterr().out
    # a file with none of the known fields is an error, not an empty picture
    (tmp_path / "other.jsonl").write_text('{"step": 1}\n')
    assert ev.main(["--plot-metrics", str(tmp_path / "other.jsonl")]) == 2
    assert "other.jsonl: none of d_acc" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"step": 1, "kl": 0.1}\n[1]\n{"step": 2}\n')
    assert ev.main(["--plot-metrics", str(tmp_path / "bad.jsonl")]) == 2
    assert "bad.jsonl:2: a JSON object is expected" in capsys.readouterr().err


def test_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "pyplot", lambda: None)
    test = write_jsonl(tmp_path / "set.jsonl", [row(0, "a", "x y")])
    assert ev.main(["--models", "teacher", "--test-sets", test, "--out-dir", str(tmp_path / "o")]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "o" / "results.md").exists() and not (tmp_path / "o" / "results.png").exists()


def test_bad_input(tmp_path, capsys):
    test = write_jsonl(tmp_path / "set.jsonl", [row(0, "a", "x"), row(1, "b", "y")])
    ans = write_jsonl(tmp_path / "ans.jsonl", [{**row(0, "a"), "answer": "x"}])
    out = str(tmp_path / "o")
    assert ev.main(["--models", f"m={ans}", "--test-sets", test, "--out-dir", out]) == 2
    err = capsys.readouterr().err
    assert "ans.jsonl has no answer for 1 of 2 prompts" in err and len(err.strip().splitlines()) == 1
    assert ev.main(["--models", "teacher", "teacher", "--test-sets", test, "--out-dir", out]) == 2
    assert "two models named 'teacher'" in capsys.readouterr().err
    # an id that matches but belongs to another prompt is not taken
    ans = write_jsonl(tmp_path / "ans.jsonl", [{**row(0, "a"), "answer": "x"}, {**row(1, "other"), "answer": "y"}])
    assert ev.main(["--models", f"m={ans}", "--test-sets", test, "--out-dir", out]) == 2
    assert "first missing id: q1" in capsys.readouterr().err
    nt = write_jsonl(tmp_path / "noteacher.jsonl", [row(0, "a")])
    assert ev.main(["--models", "teacher", "--test-sets", nt, "--out-dir", out]) == 2
    assert "have no `teacher` answer" in capsys.readouterr().err
    # the CLI: one line, non-zero exit, the file named
    p = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--models", "teacher", "--test-sets",
                        str(tmp_path / "missing.jsonl")], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "missing.jsonl" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# real data: public AlpacaEval answers on the Vicuna-80 and Self-Instruct-252 prompts

def test_real_data_alpaca_eval(shared_data, tmp_path):
    """GPT-4o's answers scored against GPT-4-turbo's (the teacher) with judge-free metrics; alpaca-7b
    as a weak model. Needs no network and no model."""
    import prepare_teacher
    d = shared_data / "alpaca_eval"
    turbo = str(d / "gpt4_1106_preview__model_outputs.json")
    raw = json.load(open(turbo))
    rows = prepare_teacher.import_file(turbo)
    assert len(rows) == len(raw) == 805
    sets = []
    for name, n in (("vicuna", 80), ("selfinstruct", 252)):
        wanted = {ev.norm_text(r["instruction"]) for r in raw if r["dataset"] == name}
        sel = [r for r in rows if ev.norm_text(ev.prompt_text(r["messages"])) in wanted]
        assert len(sel) == n
        sets.append(f"{name}={write_jsonl(tmp_path / (name + '.jsonl'), sel)}")
    out = tmp_path / "out"
    assert ev.main(["--models", f"gpt4o={d / 'gpt-4o-2024-05-13__model_outputs.json'}",
                    f"alpaca7b={d / 'alpaca-7b__model_outputs.json'}", "teacher",
                    "--test-sets", *sets, "--out-dir", str(out), "--bootstrap", "300"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["test_sets"] == {"vicuna": 80, "selfinstruct": 252}
    for s in ("vicuna", "selfinstruct"):
        r = res["results"][s]
        assert r["teacher"]["rougeL"]["mean"] == 100 and r["teacher"]["p6"]["mean"] == 100
        g, a = r["gpt4o"], r["alpaca7b"]
        assert 15 < g["rougeL"]["mean"] < 50 and g["rougeL"]["lo"] < g["rougeL"]["mean"] < g["rougeL"]["hi"]
        ps = [g[f"p{n}"]["mean"] for n in range(1, 7)]
        assert ps == sorted(ps, reverse=True) and ps[0] > 40 and ps[5] > 0
        # GPT-4o writes much like GPT-4-turbo; alpaca-7b's answers are far shorter
        assert g["rougeL"]["mean"] > a["rougeL"]["mean"] and g["p4"]["mean"] > a["p4"]["mean"]
        assert a["len"]["mean"] < 0.5 * r["teacher"]["len"]["mean"]
        assert res["config"]["length_unit"] == "whitespace words"
    assert "| gpt4o |" in (out / "results.md").read_text()


def test_judge_prompt_is_fastchats(shared_data):
    """The pairwise prompt MiniLLM and GAD use is FastChat's original general reviewer prompt."""
    rec = json.loads(open(shared_data / "fastchat" / "vicuna80_original" / "prompt.jsonl").readline())
    assert rec["category"] == "general"
    assert (rec["system_prompt"], rec["prompt_template"], rec["defaults"]["prompt"]) == \
        (ev.JUDGE_SYSTEM, ev.JUDGE_TEMPLATE, ev.JUDGE_PROMPT)
