"""evaluate.py: judge-free metrics against known values and their properties, the judge protocol against
a fake OpenAI-compatible server, end-to-end runs on tiny checkpoints (checkpoint selection in a run
directory too), training-curve plots, bad input and faults (one line, exit status, nothing lost), and a
real-data run on public AlpacaEval answers (skipped where ../shared is absent)."""
import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import evaluate as ev
from evaluate import bootstrap, clipped_ngram_matches, parse_scores, rouge_l, words

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VS_TEACHER = {"rougeL", *(f"p{n}" for n in range(1, 7))}


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


def last_line(text):
    return text.strip().splitlines()[-1]


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


def test_rouge_l_known_values_and_properties():
    # the values the old hand-written LCS gave on these, unchanged through rouge-score
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("a c e", "a b c d e f") == pytest.approx(2 / 3)  # P = 3/3, R = 3/6
    assert rouge_l("", "a") == 0.0 and rouge_l("a", "") == 0.0 and rouge_l("x", "y") == 0.0
    assert rouge_l("same text here", "Same text, here!") == 1.0
    # rouge-score's own test values (rouge_scorer_test.py: testRougeLConsecutive / NonConsecutive)
    assert rouge_l("testing one", "testing one two") == pytest.approx(4 / 5)
    assert rouge_l("testing two", "testing one two") == pytest.approx(4 / 5)
    # Lin (2004)'s example, reference "police killed the gunman": S3 scores 2/4; S2 scores 3/4 in the
    # paper, 1 here, because Porter stemming (as MiniLLM and S-NI use it) makes killed == kill
    assert rouge_l("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    assert rouge_l("police kill the gunman", "police killed the gunman") == 1.0
    # the package's tokenizer keeps ASCII letters and digits only (documented in evaluate.py)
    assert rouge_l("你好 世界", "你好 世界") == 0.0
    # F1 of the longest common subsequence, symmetric, on random word sequences (short words: no stemming)
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcdef") for _ in range(rng.randint(0, 60))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 60))]
        lcs = lcs_textbook(a, b)
        want = 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))
        assert rouge_l(" ".join(a), " ".join(b)) == pytest.approx(want)
        assert rouge_l(" ".join(b), " ".join(a)) == pytest.approx(want)


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
    # properties on random data: the interval holds the mean, within the data's range, and shrinks
    # about as 1/sqrt(n) (the standard error) with more prompts
    rng = np.random.default_rng(0)
    for seed in range(20):
        x = rng.exponential(size=int(rng.integers(5, 60)))
        den = rng.integers(1, 9, size=len(x)).astype(float)
        for r, lo, hi in ((bootstrap(x, seed=seed), x.min(), x.max()),
                          (bootstrap(x * den, den, seed=seed), x.min(), x.max())):
            assert lo <= r["lo"] <= r["mean"] <= r["hi"] <= hi
    small, big = bootstrap(rng.normal(size=40), seed=1), bootstrap(rng.normal(size=1600), seed=1)
    width = lambda r: r["hi"] - r["lo"]
    assert 3 < width(small) / width(big) < 10 and width(big) == pytest.approx(2 * 1.96 / 40, rel=0.25)


def test_parse_scores():
    assert parse_scores("8 7\nAssistant 1 was better.") == (8.0, 7.0)
    assert parse_scores("\n  9.5, 6\nbecause") == (9.5, 6.0)
    assert parse_scores("**8** **6**") == (8.0, 6.0)
    assert parse_scores("8/10 7/10") == (8.0, 7.0)
    for bad in ("I think both are good.\n8 7", "8", "8 7 6", "11 3", "0 0", ""):
        with pytest.raises(ValueError):
            parse_scores(bad)


@pytest.mark.parametrize("reply, scores", [
    ("Assistant 1: 8/10\nAssistant 2: 6/10", (8.0, 6.0)),  # labelled, two lines: not (1, 8)
    ("Assistant 1: 8/10 / Assistant 2: 6/10\nBoth are fine.", (8.0, 6.0)),  # labelled, one line
    ("**Assistant 1:** 7\n**Assistant 2:** 9\n\nAssistant 2 is more detailed.", (7.0, 9.0)),
    ("Assistant 2: 6\nAssistant 1: 9", (9.0, 6.0)),  # read by label, not by order
    ("Assistant 1's score: 8.5, Assistant 2's score: 7", (8.5, 7.0)),
    ("Assistant 1 (8/10) and Assistant 2 (4/10)", (8.0, 4.0)),
    ("1. 8\n2. 6", (8.0, 6.0)),  # numbered lines
    ("1) 8/10\n2) 6/10\nThe first is better.", (8.0, 6.0)),
    ("Scores: 8 and 7", (8.0, 7.0)),
])
def test_parse_scores_labelled_and_numbered_forms(reply, scores):
    assert parse_scores(reply) == scores


@pytest.mark.parametrize("reply", [
    "Assistant 1: 8/10\nAssistant 2 was too short.",  # one score: unusable, asked again
    "Assistant 1 is better than Assistant 2.\n8 7",  # labels with no score: never read as scores
    "Assistant 1: 8\nAssistant 1: 9\nAssistant 2: 4",  # two scores for one assistant
    "Assistant 1: 8/10\nAssistant 2: 12/10",  # out of range
    "1. 8\n3. 6",
])
def test_parse_scores_refuses_what_it_cannot_read_for_sure(reply):
    with pytest.raises(ValueError):
        parse_scores(reply)


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
    fake_openai.fast_sdk_retries(monkeypatch)
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
    # b is judged on 2 of its 3 prompts, below the default --min-judged 0.9: exit 3, said last, all written
    assert ev.main(argv) == 3
    cap = capsys.readouterr()
    assert last_line(cap.err) == ("evaluate.py: failed: the judge scored only 2 of 3 prompts of b on toy, below "
                                  "--min-judged 0.9 (results are written; a rerun retries the failed calls)")
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
    assert "judge failed on 1 prompts of b on toy" in cap.out

    # a rerun is served from the cache; only the failed judgment is tried again; a lower bar passes
    n = len(fake_judge.bodies)
    assert ev.main(argv + ["--min-judged", "0.6"]) == 0
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


def test_credentials_in_the_judge_url_are_never_written(fake_judge, tmp_path, capsys):
    import fake_openai
    test = write_jsonl(tmp_path / "set.jsonl", [row(0, "q?", "x [score=5]")])
    out = tmp_path / "o"
    with fake_openai.FakeOpenAI() as srv:  # a server behind a proxy that takes the URL's credentials
        url = srv.url.replace("http://", "http://judge-user:hunter2-secret@")
        assert ev.main(["--models", "teacher", "--test-sets", test, "--out-dir", str(out), "--judge",
                        "--judge-base-url", url, "--judge-api-key-env", "FAKE_JUDGE_KEY", "--bootstrap", "50"]) == 0
    cap = capsys.readouterr()
    written = "".join(p.read_text() for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".md"))
    for secret in ("hunter2-secret", "judge-user"):
        assert secret not in written and secret not in cap.out + cap.err, secret
    assert json.loads((out / "results.json").read_text())["config"]["judge_base_url"].startswith("http://***@127.0.0.1")
    from api import one_line, redact_url
    assert redact_url("https://u:p@h/v1?api-key=tok-1&x=2") == "https://***@h/v1?api-key=***&x=2"
    assert "tok-1" not in one_line("404 - no route /v1/?api-key=tok-1chat") and "p@" not in one_line("at https://u:p@h/v1")
    assert "anVk" not in one_line("401 - Incorrect API key provided: Basic anVkZ2UtdXNlcjpodW50ZXIy.")


def test_judge_failing_everywhere_exits_nonzero(fake_judge, tmp_path, capsys):
    test = write_jsonl(tmp_path / "set.jsonl", [row(i, f"q{i}?", "x [score=5] [garbled-always]") for i in range(2)])
    argv = ["--models", "teacher", "--test-sets", test, "--out-dir", str(tmp_path / "o"), "--judge", "--judge-base-url",
            fake_judge.url, "--judge-api-key-env", "FAKE_JUDGE_KEY", "--judge-retries", "1"]
    assert ev.main(argv) == 3
    cap = capsys.readouterr()
    assert last_line(cap.err).startswith("evaluate.py: failed: the judge scored only 0 of 2 prompts of teacher on set")
    assert json.loads((tmp_path / "o" / "results.json").read_text())["results"]["set"]["teacher"]["judge"]["n_failed"] == 2
    assert ev.main(argv + ["--min-judged", "0"]) == 0  # the bar is a flag


def test_judge_without_key_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    test = write_jsonl(tmp_path / "set.jsonl", [row(0, "hi", "hello")])
    rc = ev.main(["--models", "teacher", "--test-sets", test, "--out-dir", str(tmp_path / "o"), "--judge",
                  "--judge-api-key-env", "NO_SUCH_KEY_VAR", "--judge-base-url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    assert rc != 0 and "NO_SUCH_KEY_VAR" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("key", ["sk-proj-Abc123SECRETsecret456", "Abc123SECRETsecret456xyz"])
def test_key_given_as_env_name_is_never_echoed(tmp_path, capsys, key):
    test = write_jsonl(tmp_path / "set.jsonl", [row(0, "hi", "hello")])
    with pytest.raises(SystemExit) as e:  # refused at parse time, by argparse
        ev.main(["--models", "teacher", "--test-sets", test, "--judge", "--judge-api-key-env", key])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --judge-api-key-env: " in last_line(err)
    assert "SECRET" not in err and "Abc123" not in err


def test_judge_wrong_key_stops_with_one_line(fake_judge, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "sk-wrongwrongwrong123")
    test = write_jsonl(tmp_path / "set.jsonl", [row(0, "hi", "hello")])
    rc = ev.main(["--models", "teacher", "--test-sets", test, "--out-dir", str(tmp_path / "o"), "--judge",
                  "--judge-api-key-env", "FAKE_JUDGE_KEY", "--judge-base-url", fake_judge.url])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar
    assert rc == 2 and last.startswith("evaluate.py: error: HTTP 401") and "wrongwrong" not in err


def test_ctrl_c_during_judging_cli(tmp_path):
    """A real SIGINT while the judge's requests hang: one line, exit 130, no traceback, no wait for the
    requests in flight, and the cache file stays whole JSONL."""
    import fake_openai
    test = write_jsonl(tmp_path / "set.jsonl", [row(i, f"q{i}?", "hello") for i in range(3)])
    out = tmp_path / "o"
    with fake_openai.FakeOpenAI(faults=lambda prompt, attempt: "slow", slow_s=60) as srv:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "evaluate.py"), "--models", "teacher", "--test-sets", test,
                              "--out-dir", str(out), "--judge", "--judge-base-url", srv.url],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OPENAI_API_KEY": "k"},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert p.stdout.readline().startswith("judge: 3 reference calls")  # the requests are out
        time.sleep(0.5)
        t = time.time()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 130 and time.time() - t < 10
    assert "Traceback" not in err and last_line(err).startswith("evaluate.py: interrupted; the caches in")
    assert all(json.loads(l) for l in (out / "judge_cache.jsonl").read_text().splitlines())


# -----------------------------------------------------------------------------
# end to end on a tiny checkpoint

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, smollm2_path):
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template."""
    import torch
    import transformers
    from loading import load_tokenizer
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
    figs = []
    monkeypatch.setattr(ev, "save_png", lambda plt, fig, path: (figs.append(fig), ev.write_atomic(path, b"png")))
    assert ev.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    r = res["results"]["toy"]
    # the teacher is never scored against its own answers: no such metric, cell or bar
    assert not VS_TEACHER & set(r["teacher"]) and VS_TEACHER <= set(r["tiny"])
    assert not any({"rougeL", "ngram"} & set(p) for p in res["per_prompt"]["toy"]["teacher"])
    assert r["teacher"]["cut"]["mean"] == 0
    assert 0 <= r["tiny"]["rougeL"]["mean"] < 100 and r["tiny"]["len"]["n"] == 3
    assert res["config"]["length_unit"].startswith("tokens")
    gens = [json.loads(l) for l in open(out / "generations.jsonl")]
    assert len(gens) == 3 and all(g["n_tokens"] <= 6 for g in gens)
    cut = sum(not g["stopped"] for g in gens)
    assert r["tiny"]["cut"]["mean"] == pytest.approx(100 * cut / 3)
    md = (out / "results.md").read_text()
    assert "| tiny |" in md and "| teacher |" in md and "toy (n=3)" in md
    rouge_table = md.split("### ROUGE-L")[1].split("###")[0]
    assert "| teacher |  |" in rouge_table and "| tiny | " in rouge_table and "| tiny |  |" not in rouge_table
    axes = {ax.get_title(): ax for ax in figs[0].axes}
    from matplotlib.container import BarContainer
    tiny_bar, teacher_bar = (c.patches[0] for c in axes[ev.METRICS["rougeL"][0]].containers if isinstance(c, BarContainer))
    assert math.isnan(teacher_bar.get_height()) and tiny_bar.get_height() == pytest.approx(r["tiny"]["rougeL"]["mean"])
    answers = [json.loads(l) for l in open(out / "answers" / "tiny__toy.jsonl")]
    assert [a["answer"] for a in answers] == [g["answer"] for g in sorted(gens, key=lambda g: g["id"])]
    monkeypatch.undo()

    # a rerun does not generate again; another setting does, and only that
    monkeypatch.setattr(ev, "generate", lambda *a, **k: pytest.fail("regenerated a cached answer"))
    assert ev.main(argv) == 0
    monkeypatch.undo()
    assert ev.main(argv[:-4] + ["--max-new-tokens", "3", "--bootstrap", "100"]) == 0
    assert len(open(out / "generations.jsonl").readlines()) == 6
    pytest.importorskip("matplotlib")
    assert (out / "results.png").stat().st_size > 1000


def test_ctrl_c_keeps_generated_answers(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of generation: one line, 130, the answers made so far stay cached."""
    test = write_jsonl(tmp_path / "set.jsonl", [row(i, f"Question {i}?", "Answer.") for i in range(3)])
    argv = ["--models", f"tiny={tiny_ckpt}", "--test-sets", test, "--out-dir", str(tmp_path / "o"),
            "--max-new-tokens", "4", "--batch-size", "1", "--bootstrap", "10"]
    real, calls = ev.generate, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(ev, "generate", interrupted)
    assert ev.main(argv) == 130
    err = capsys.readouterr().err
    assert last_line(err).startswith("evaluate.py: interrupted; the caches in") and "Traceback" not in err
    gens = (tmp_path / "o" / "generations.jsonl").read_text().splitlines()
    assert len(gens) == 1 and json.loads(gens[0])["n_tokens"] <= 4
    calls.clear()
    monkeypatch.setattr(ev, "generate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    assert ev.main(argv) == 0 and len(calls) == 2  # only the two missing prompts


def test_discriminator_score(tiny_ckpt, tmp_path):
    import torch
    from data import render_prompt
    from discriminator import Discriminator, save_discriminator
    from loading import end_of_turn_id, load_model, load_tokenizer
    tok = load_tokenizer(tiny_ckpt)
    torch.manual_seed(0)
    dpath = str(tmp_path / "disc")
    save_discriminator(load_model(tiny_ckpt, Discriminator), dpath, tok)  # the student + a fresh head
    rows = [row(0, "Hi", "Hello!"), row(1, "Bye", "Goodbye, see you.")]
    test = write_jsonl(tmp_path / "set.jsonl", rows)
    out = tmp_path / "out"
    assert ev.main(["--models", "teacher", "--test-sets", test, "--out-dir", str(out),
                    "--discriminator", dpath, "--bootstrap", "50"]) == 0
    res = json.loads((out / "results.json").read_text())
    scores = [p["dscore"] for p in res["per_prompt"]["set"]["teacher"]]
    # the teacher's answer ends with the end-of-turn token, like a student answer that stopped
    d = load_model(dpath, Discriminator).eval()
    for r, s in zip(rows, scores):
        ids = render_prompt(tok, r["messages"]) + tok.encode(r["teacher"], add_special_tokens=False) + [end_of_turn_id(tok)]
        with torch.no_grad():
            want = d(torch.tensor([ids]), torch.tensor([len(ids)])).item()
        assert s == pytest.approx(want, abs=1e-5)
    assert scores[0] != scores[1]
    assert res["results"]["set"]["teacher"]["dscore"]["mean"] == pytest.approx(sum(scores) / 2)
    assert "mean discriminator score" in (out / "results.md").read_text()


def test_discriminator_must_be_one(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """A generator given as --discriminator would be scored by a random head: refused, before any
    model loads and before anything is written."""
    monkeypatch.setattr(ev, "discriminator_scores", lambda *a: pytest.fail("loaded a model"))
    test = write_jsonl(tmp_path / "set.jsonl", [row(0, "Hi", "Hello!")])
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for d, why in ((tiny_ckpt, "is a LlamaForCausalLM checkpoint, not a discriminator"),
                   (str(gguf), "is a GGUF file, a generator, never a discriminator")):
        assert ev.main(["--models", "teacher", "--test-sets", test, "--out-dir", str(tmp_path / "o"), "--discriminator", d]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"evaluate.py: error: --discriminator: {d} ") and why in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# -----------------------------------------------------------------------------
# a train_gad.py run directory: score every checkpoint, name the best

def make_yes_student(path):
    """tests/toy.py's student, edited to answer "yes yes yes ...": every layer's output projections
    are zero, so the last hidden state is the current token's embedding; "assistant" (the end of the
    prompt) and "yes" embed as ones and twice that, so with tied embeddings "yes" has the top logit."""
    import toy
    from safetensors.torch import load_file, save_file
    toy.make_student(path, seed=3)
    f = os.path.join(path, "model.safetensors")
    sd, vocab = load_file(f), toy.make_tokenizer().get_vocab()
    for k in sd:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k].zero_()
    emb = sd["model.embed_tokens.weight"]
    emb[vocab["assistant"]], emb[vocab["yes"]] = 1.0, 2.0
    save_file(sd, f, metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A run directory as train_gad.py leaves it: three checkpoints, the middle one (step 4) answers
    like the toy teacher; a checkpoint still being written (.tmp); metrics.jsonl; 6 held-out prompts."""
    import toy
    d = tmp_path_factory.mktemp("toy_run")
    run = d / "run"
    for step, seed in ((2, 1), (4, None), (6, 2)):
        gen = run / f"ckpt-{step:06d}" / "generator"
        make_yes_student(gen) if seed is None else toy.make_student(gen, seed=seed)
    toy.make_student(run / "ckpt-000008.tmp" / "generator", seed=4)
    (run / "metrics.jsonl").write_text('{"step": 1, "d_acc": 0.5}\n')
    return {"run": str(run), "test": toy.make_data(d / "test.jsonl", 6, seed=1)}


def test_select_best_checkpoint(toy_run, tmp_path, capsys):
    run = toy_run["run"]
    argv = ["--run", run, "--test-sets", toy_run["test"], "--models", "teacher", "--max-new-tokens", "8",
            "--teacher-max-tokens", "8", "--markers", "yes,no", "--bootstrap", "100", "--out-dir", str(tmp_path / "o")]
    assert ev.main(argv) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    r = res["results"]["test"]
    assert list(res["models"]) == ["ckpt-000002", "ckpt-000004", "ckpt-000006", "teacher"]  # no .tmp
    assert [res["models"][c]["step"] for c in list(res["models"])[:3]] == [2, 4, 6]
    sel = res["selection"]
    assert sel["by"] == "rougeL" and sel["best"] == "ckpt-000004" and sel["step"] == 4
    assert sel["path"] == os.path.join(run, "ckpt-000004", "generator")
    assert sel["scores"] == {c: pytest.approx(r[c]["rougeL"]["mean"]) for c in ("ckpt-000002", "ckpt-000004", "ckpt-000006")}
    assert max(sel["scores"].values()) == sel["scores"]["ckpt-000004"] > 50
    rl = r["ckpt-000004"]["rougeL"]
    assert last_line(out) == (f"best checkpoint by rougeL: {os.path.join(run, 'ckpt-000004')} "
                              f"(step 4; rougeL {rl['mean']:.1f} [{rl['lo']:.1f}, {rl['hi']:.1f}])")
    # equal length limits: the teacher cut at 8 tokens, counted as cut, like every student answer here
    assert r["teacher"]["len"]["mean"] == 8 and r["teacher"]["cut"]["mean"] == 100
    assert r["ckpt-000004"]["len"]["mean"] == 8 and r["ckpt-000004"]["marker"]["mean"] == 100
    assert r["teacher"]["marker"]["mean"] == 100 and "marker" not in VS_TEACHER & set(r["teacher"])
    assert (tmp_path / "o" / "answers" / "ckpt-000004__test.jsonl").exists()
    if ev.pyplot() is not None:
        assert (tmp_path / "o" / "checkpoints.png").stat().st_size > 1000

    # by another metric, from the cache (no generation), into the default out-dir RUN/eval
    gens = (tmp_path / "o" / "generations.jsonl").read_text()
    assert ev.main(argv[:-2] + ["--select-by", "marker"]) == 0
    assert "best checkpoint by marker" in last_line(capsys.readouterr().out)
    assert json.loads(open(os.path.join(run, "eval", "results.json")).read())["selection"]["best"] == "ckpt-000004"
    assert (tmp_path / "o" / "generations.jsonl").read_text() == gens


def test_run_dir_errors(toy_run, tmp_path, capsys):
    test = toy_run["test"]
    for argv, msg in ((["--run", str(tmp_path / "nothing")], "--run "),
                      (["--run", str(tmp_path)], "no ckpt-NNNNNN/generator checkpoints")):
        assert ev.main(argv + ["--test-sets", test, "--out-dir", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    nt = write_jsonl(tmp_path / "noteacher.jsonl", [row(0, "red cat")])  # rougeL needs the teacher: refused up front
    assert ev.main(["--run", toy_run["run"], "--test-sets", nt, "--out-dir", str(tmp_path / "o")]) == 2
    assert "--select-by rougeL compares with the teacher's answers: test set 'noteacher'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # selecting by a metric that is not computed: a parse-time error
        ev.main(["--run", toy_run["run"], "--test-sets", test, "--select-by", "marker"])
    assert "--select-by marker needs --markers" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# training curves, bad input, faults

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
    assert "ignoring a torn last line" in capsys.readouterr().err  # data.py's note, on stderr
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
    # not UTF-8: our JSONL (data.py) and an imported .json (prepare_teacher.py) alike, file:line named
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(row(0, "caf\u00e9", "x")).encode().replace(b"\\u00e9", b"\xe9") + b"\n")
    (tmp_path / "latin1.json").write_bytes(b'[{"instruction": "caf\xe9", "output": "x", "generator": "g"}]')
    for f, where in (("latin1.jsonl", "latin1.jsonl:1: not UTF-8"), ("latin1.json", "latin1.json:1: not UTF-8")):
        assert ev.main(["--models", "teacher", "--test-sets", str(tmp_path / f), "--out-dir", out]) == 2
        err = capsys.readouterr().err
        assert where in err and len(err.strip().splitlines()) == 1
        assert ev.main(["--models", f"m={tmp_path / f}", "--test-sets", test, "--out-dir", out]) == 2
        assert where in capsys.readouterr().err
    # the CLI: one line, non-zero exit, the file named
    p = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--models", "teacher", "--test-sets",
                        str(tmp_path / "missing.jsonl")], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "missing.jsonl" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_bad_out_dir_before_any_model(toy_world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "load_tokenizer", lambda *a: pytest.fail("loaded a tokenizer"))
    monkeypatch.setattr(ev, "generate_answers", lambda *a: pytest.fail("loaded a model"))
    (tmp_path / "afile").write_text("keep me")
    for out, why in ((tmp_path / "afile", "exists and is not a directory"), (tmp_path / "afile" / "sub", "cannot be created")):
        assert ev.main(["--models", toy_world["student"], "teacher", "--test-sets", toy_world["test"], "--out-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"evaluate.py: error: --out-dir {out}: {why}" + err[len(f"evaluate.py: error: --out-dir {out}: {why}"):]
        assert len(err.splitlines()) == 1
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("flag,value,says", [
    ("--max-new-tokens", "0", "0 is out of range (must be >= 1)"),
    ("--max-new-tokens", "-5", "-5 is out of range (must be >= 1)"),
    ("--max-new-tokens", "2.5", "'2.5' is not an integer"),
    ("--temperature", "-0.1", "-0.1 is out of range (must be >= 0)"),
    ("--temperature", "nan", "nan is out of range (must be >= 0)"),
    ("--top-p", "0", "0 is out of range (must be > 0 and <= 1)"),
    ("--top-p", "1.5", "1.5 is out of range (must be > 0 and <= 1)"),
    ("--judge-temperature", "-1", "-1 is out of range (must be >= 0)"),
    ("--bootstrap", "0", "0 is out of range (must be >= 1)"),
    ("--judge-retries", "-1", "-1 is out of range (must be >= 0)"),
    ("--judge-workers", "0", "0 is out of range (must be >= 1)"),
    ("--judge-timeout", "0", "0 is out of range (must be > 0)"),
    ("--judge-max-tokens", "0", "0 is out of range (must be >= 1)"),
    ("--batch-size", "-2", "-2 is out of range (must be >= 1)"),
    ("--limit", "0", "0 is out of range (must be >= 1)"),
    ("--teacher-max-tokens", "0", "0 is out of range (must be >= 1)"),
    ("--min-judged", "1.5", "1.5 is out of range (must be >= 0 and <= 1)"),
    ("--markers", " , ", "a comma-separated list of words is expected"),
])
def test_nonsense_flags_refused_at_parse_time(flag, value, says, capsys):
    with pytest.raises(SystemExit) as e:
        ev.parse_args(["--models", "teacher", "--test-sets", "x.jsonl", flag, value])
    assert e.value.code == 2 and last_line(capsys.readouterr().err) == f"evaluate.py: error: argument {flag}: {says}"


def test_full_disk_one_line_and_nothing_lost(tmp_path, monkeypatch, capsys):
    test = write_jsonl(tmp_path / "set.jsonl", [row(0, "a", "x y"), row(1, "b", "z")])
    out = tmp_path / "o"
    argv = ["--models", "teacher", "--test-sets", test, "--out-dir", str(out), "--bootstrap", "20"]
    assert ev.main(argv) == 0
    before = {f: (out / f).read_bytes() for f in ("results.json", "results.md", "answers/teacher__set.jsonl")}

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)  # where every write of ours ends: the disk is full
    assert ev.main(argv + ["--bootstrap", "30"]) == 2
    err = capsys.readouterr().err
    assert last_line(err) == f"evaluate.py: error: {out / 'answers' / 'teacher__set.jsonl'}: No space left on device"
    assert len(err.strip().splitlines()) == 1
    assert {f: (out / f).read_bytes() for f in before} == before  # the earlier results are whole
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# -----------------------------------------------------------------------------
# real data: public AlpacaEval answers on the Vicuna-80 and Self-Instruct-252 prompts

@pytest.mark.slow
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
        assert not VS_TEACHER & set(r["teacher"])  # never scored against itself
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


# -----------------------------------------------------------------------------
# the oracle judge

def test_exact_kl_against_a_brute_force_sum(toy_world, tmp_path):
    """oracle.kl_along against the definition, summed term by term in float64 over the vocabulary from
    each model's own full logits; and a model against itself, same context and temperature, is 0."""
    import toy
    import torch
    from loading import load_model
    from oracle import kl_along
    a = load_model(toy_world["student"]).eval()
    b = load_model(toy.make_student(tmp_path / "other", seed=1)).eval()
    g = torch.Generator().manual_seed(0)
    seqs_a = [torch.randint(7, 21, (L,), generator=g).tolist() for L in (9, 5, 12)]
    seqs_b = [[2, 4] + s for s in seqs_a]  # another context before the same answers
    lens = [4, 2, 6]
    for direction in ("forward", "reverse"):
        got = kl_along(a, [0.6, 1.3], seqs_a, b, 0.8, seqs_b, lens, direction, torch.device("cpu"), batch=2)
        for tau in (0.6, 1.3):
            for s_a, s_b, n, kl in zip(seqs_a, seqs_b, lens, got[tau]):
                with torch.no_grad():
                    la, lb = a(torch.tensor([s_a]))[0].double(), b(torch.tensor([s_b]))[0].double()
                terms = []
                for t in range(n):
                    pa = torch.softmax(la[len(s_a) - n - 1 + t] / tau, -1)  # the student at tau
                    pb = torch.softmax(lb[len(s_b) - n - 1 + t] / 0.8, -1)  # the oracle at its temperature
                    p, q = (pb, pa) if direction == "forward" else (pa, pb)
                    terms.append(sum(float(p[v]) * (math.log(float(p[v])) - math.log(float(q[v]))) for v in range(len(p))))
                assert kl == pytest.approx(sum(terms) / n, rel=1e-4, abs=1e-6), (direction, tau)
    same = kl_along(a, [0.8], seqs_a, a, 0.8, seqs_a, lens, "reverse", torch.device("cpu"))[0.8]
    assert max(abs(x) for x in same) < 1e-6


def test_oracle_end_to_end(toy_world, tmp_path, capsys):
    import toy
    other = toy.make_student(tmp_path / "other", seed=1)
    out = tmp_path / "o"
    argv = ["--models", f"self={toy_world['student']}", f"other={other}", "teacher", "--test-sets",
            f"toy={toy_world['test']}", "--out-dir", str(out), "--max-new-tokens", "6", "--oracle", toy_world["student"],
            "--oracle-temperature", "0.8", "--oracle-taus", "0.8,1.2", "--oracle-samples", "2", "--paired", "other:self",
            "--bootstrap", "100"]
    assert ev.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    r = res["results"]["toy"]
    # the oracle against itself (no system prompt in these rows) at its own temperature: 0; elsewhere > 0
    assert r["self"]["forward_kl"]["0.8"]["mean"] == pytest.approx(0, abs=1e-5)
    assert r["self"]["reverse_kl"]["0.8"]["mean"] == pytest.approx(0, abs=1e-5)
    assert r["self"]["forward_kl"]["1.2"]["mean"] > 1e-3 and r["other"]["forward_kl"]["0.8"]["mean"] > 1e-3
    assert "forward_kl" not in r["teacher"] and {"loop", "distinct2"} <= set(r["teacher"])
    assert {"loop", "loop_sampled"} <= set(r["oracle"])
    diff = res["paired"]["toy"]["other - self"]["forward_kl"]["0.8"]
    assert diff["mean"] == pytest.approx(r["other"]["forward_kl"]["0.8"]["mean"], rel=1e-6) and diff["lo"] > 0
    md = (out / "results.md").read_text()
    assert "### oracle: toy" in md and "Paired difference other - self" in md and (out / "oracle.png").exists()
    # another vocabulary: one line, before any model loads
    tok = ev.load_tokenizer(other)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    assert ev.main(argv) == 2
    assert "its tokenizer differs" in capsys.readouterr().err.strip().splitlines()[-1]
