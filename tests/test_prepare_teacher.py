"""Tests of prepare_teacher.py against a fake OpenAI-compatible server on loopback (tests/fake_openai.py)."""

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import types
from collections import Counter
from pathlib import Path

import pytest

import prepare_teacher as pt
from fake_openai import FakeOpenAI, answer_for, seeded_faults

ROOT = Path(__file__).resolve().parent.parent
ALL_FAULTS = ["429", "500", "503", "slow", "drop", "malformed", "nochoices", "empty"]


def fast(srv, *extra):
    """Flags that make a run quick against the fake server: short timeouts and backoffs."""
    return ["--base-url", srv.url, "--model", "fake", "--timeout", "1.0", "--backoff", "0.005", "--retries", "3", *extra]


def write_prompts(path, n, start=0):
    with open(path, "w") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"question {i}: what is {i} squared?"}) + "\n")
    return str(path)


def lines(path):
    """Every line of a JSONL file, parsed: fails on any invalid line."""
    with open(path) as f:
        text = f.read()
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.split("\n")[:-1]]


def unique_by(rows, field):
    values = [r[field] for r in rows]
    assert len(values) == len(set(values)), Counter(values).most_common(3)
    return {r[field]: r for r in rows}


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")


# -----------------------------------------------------------------------------
# building blocks

def test_store_repairs_torn_line_and_refuses_duplicates(tmp_path, capsys):
    path = tmp_path / "o.jsonl"
    store = pt.JsonlStore(str(path))
    assert store.append({"key": "a", "v": 1}) and store.append({"key": "b", "v": "\u2028 odd separator"})
    assert not store.append({"key": "a", "v": 2})
    store.close()
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "v"')  # what a kill -9 in the middle of a write leaves
    store = pt.JsonlStore(str(path))
    assert "repaired a torn last line" in capsys.readouterr().err
    assert set(store.records) == {"a", "b"} and "a" in store and len(store) == 2
    store.append({"key": "c", "v": 3})
    store.close()
    assert [r["key"] for r in lines(path)] == ["a", "b", "c"]


def test_store_bad_line_and_second_writer(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(SystemExit, match=r"o\.jsonl:2: not valid JSON"):
        pt.JsonlStore(str(path))
    path.write_text('{"key": "a"}\n')
    store = pt.JsonlStore(str(path))
    with pytest.raises(SystemExit, match="in use by another running process"):
        pt.JsonlStore(str(path))
    store.close()


def test_request_key_is_stable():
    msgs = [{"role": "user", "content": "hi"}]
    k = pt.request_key("m", msgs, {"temperature": 0.8, "max_tokens": 10})
    assert k == pt.request_key("m", [dict(m) for m in msgs], {"max_tokens": 10, "temperature": 0.8})
    assert k != pt.request_key("m", msgs, {"temperature": 0.7, "max_tokens": 10})
    assert k != pt.request_key("m2", msgs, {"temperature": 0.8, "max_tokens": 10})
    assert len(k) >= 16 and int(k, 16) >= 0


def test_chat_with_retry_each_fault():
    msgs = lambda p: [{"role": "user", "content": p}]  # noqa: E731
    # the prompt names its fault; "always-*" prompts fault on every attempt, the others only on the first
    def faults(prompt, attempt):
        kind = prompt.split(":")[1]
        return kind if prompt.startswith("always") or attempt == 1 else None
    with FakeOpenAI(faults=faults, slow_s=1.5, retry_after="1") as srv:
        client = pt.make_client(srv.url, timeout=1.0)  # roomy: a busy 2-core machine must not time out by itself
        for kind in ALL_FAULTS:
            res = pt.chat_with_retry(client, "fake", msgs(f"once:{kind}"), retries=2, backoff=0.001)
            assert res["attempts"] == 2 and res["text"] == answer_for("fake", msgs(f"once:{kind}")), kind
        reasons = {"slow": "timeout", "drop": "connection", "malformed": "malformed", "nochoices": "malformed",
                   "empty": "empty", "500": "http_500", "429": "http_429"}
        for kind, reason in reasons.items():
            if kind == "429":
                continue  # checked below, with its Retry-After
            with pytest.raises(pt.RetryError) as e:
                pt.chat_with_retry(client, "fake", msgs(f"always:{kind}"), retries=1, backoff=0.001)
            assert e.value.reason == reason and e.value.attempts == 2
        # Retry-After: 1 is honoured although our own backoff would wait a millisecond
        t = time.time()
        pt.chat_with_retry(client, "fake", msgs("first:429"), retries=1, backoff=0.001)
        assert time.time() - t >= 0.9
        with pytest.raises(pt.RetryError) as e:
            pt.chat_with_retry(client, "fake", msgs("ok:none"), retries=2, backoff=0.001, validate=lambda t: t.startswith("{"))
        assert e.value.reason == "invalid" and e.value.attempts == 3
        with pytest.raises(pt.RetryError) as e:  # the prompt is the problem: no retry, the run goes on
            pt.chat_with_retry(client, "fake", msgs("always:400_context"), retries=3, backoff=0.001)
        assert e.value.reason == "too_long" and e.value.attempts == 1
        n = len(srv.log)
        with pytest.raises(pt.FatalAPIError, match="model_not_found"):
            pt.chat_with_retry(client, "fake", msgs("always:400_model"), retries=3, backoff=0.001)
        assert len(srv.log) == n + 1


def test_tiktoken_offline_falls_back(monkeypatch, capsys):
    import tiktoken

    def offline(*a, **k):
        raise ConnectionError("no route to openaipublic.blob.core.windows.net")
    monkeypatch.setattr(tiktoken, "encoding_for_model", offline)
    count, how = pt.token_counter("gpt-4o")
    assert count("x" * 40) == 10 and "4 characters" in how
    assert "no tiktoken encoding" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# whole runs

def test_200_prompts_with_30pct_faults(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 200)
    out = tmp_path / "o.jsonl"
    faults = seeded_faults(0.3, ALL_FAULTS + ["length", "refusal"], seed=1)
    with FakeOpenAI(faults=faults, slow_s=1.5) as srv:
        args = fast(srv, "--prompts", prompts, "--out", str(out), "--concurrency", "16", "--refusal-filter",
                    "--price-in", "1", "--price-out", "2")
        pt.main(args)
        report = capsys.readouterr().out
        done = unique_by(lines(out), "id")
        rejects = unique_by(lines(tmp_path / "o.rejects.jsonl"), "id")
        failed = {r["id"]: r for r in lines(tmp_path / "o.failed.jsonl")}
        assert not set(done) & set(rejects) and not set(done) & set(failed) and not set(rejects) & set(failed)
        assert set(done) | set(rejects) | set(failed) == {f"p{i}" for i in range(200)}  # none lost
        assert len(done) > 150 and failed and {r["reason"] for r in rejects.values()} == {"truncated", "refusal"}
        assert {r["reason"] for r in failed.values()} <= {"timeout", "connection", "malformed", "empty", "http_429",
                                                           "http_500", "http_503"}
        for row in done.values():
            assert row["teacher"] == answer_for("fake", row["messages"]) and row["finish_reason"] == "stop"
        assert f"{len(done)} done, {len(failed)} failed" in report and "filtered (" in report and "cost $" in report

        srv.faults = lambda prompt, attempt: None
        pt.main(args + ["--keep-truncated"])  # retries the failed, frees the truncated, asks nothing twice
        report = capsys.readouterr().out
        final = unique_by(lines(out), "id")
        assert set(final) == {f"p{i}" for i in range(200)} - {i for i, r in rejects.items() if r["reason"] == "refusal"}
        assert "0 failed" in report and "0 pending" in report
        asked = Counter(prompt for _, prompt, _ in srv.log)
        n_log = len(srv.log)
        pt.main(args)
        assert len(srv.log) == n_log and unique_by(lines(out), "key")
    assert max(asked.values()) <= 5  # up to 4 attempts in the first run, then one for a failed prompt


def test_fatal_error_stops_at_once_with_one_line(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 200)
    with FakeOpenAI(faults=lambda p, a: "400_model", delay=0.01) as srv:
        with pytest.raises(SystemExit) as e:
            pt.main(fast(srv, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"), "--concurrency", "4"))
        assert len(srv.log) <= 8
    msg = str(e.value)
    assert msg.startswith("prepare_teacher.py: stopped: HTTP 400") and "does not exist" in msg and "\n" not in msg


def test_budget_stops_cleanly_and_holds_across_reruns(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 100)
    with FakeOpenAI() as srv:
        # a request costs about 8 input and 15 output tokens: about $0.0023 at these prices
        args = fast(srv, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"), "--concurrency", "2",
                    "--price-in", "100", "--price-out", "100", "--max-cost", "0.02")
        pt.main(args)
        report = capsys.readouterr().out
        n = len(lines(tmp_path / "o.jsonl"))
        assert 5 <= n <= 12 and len(srv.log) == n and "stopped at the budget" in report and "pending" in report
        pt.main(args)
        assert "budget reached" in capsys.readouterr().out and len(srv.log) == n


def test_system_prompt_filters_split_and_dry_run(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    out = tmp_path / "o.jsonl"
    with FakeOpenAI(faults=lambda p, a: "length" if p.startswith("question 3") else None) as srv:
        base = fast(srv, "--prompts", prompts, "--out", str(out), "--system", "Be brief.", "--temperature", "0.7",
                    "--max-tokens", "64")
        pt.main(base + ["--dry-run"])
        assert "estimate: 40 requests" in capsys.readouterr().out and not srv.log
        pt.main(base + ["--test-size", "0.25"])
        assert all(b["messages"][0] == {"role": "system", "content": "Be brief."} and b["temperature"] == 0.7
                   and b["max_tokens"] == 64 for b in srv.bodies)
    rows = unique_by(lines(out), "id")
    assert len(rows) == 40 - 11  # question 3 and 30..39 were cut at the length limit
    assert all(r["messages"][0]["role"] == "user" and r["system"] == "Be brief." for r in rows.values())
    assert all(r["teacher"] == answer_for("fake", [{"role": "system", "content": "Be brief."}] + r["messages"])
               for r in rows.values())
    train, test = lines(tmp_path / "o.train.jsonl"), lines(tmp_path / "o.test.jsonl")
    assert len(train) + len(test) == 29 and 2 <= len(test) <= 15
    assert sorted(r["id"] for r in train + test) == sorted(rows)
    pt.main(base + ["--test-size", "5"])  # all answered: no request, just a new split
    test5 = lines(tmp_path / "o.test.jsonl")
    assert len(test5) == 5 and {r["id"] for r in test5} <= {r["id"] for r in test} | {r["id"] for r in train}


def run_cli(args, env, **kw):
    return subprocess.run([sys.executable, str(ROOT / "prepare_teacher.py"), *args], env=env, capture_output=True,
                          text=True, timeout=60, **kw)


def done_lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_kill9_mid_run_then_resume_equals_uninterrupted(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 60)
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-key"}
    rng = random.Random(0)
    with FakeOpenAI(faults=seeded_faults(0.3, ["429", "500", "drop"], seed=2, max_attempt=1), delay=0.04) as srv:
        pt.main(fast(srv, "--prompts", prompts, "--out", str(tmp_path / "ref.jsonl"), "--concurrency", "4"))
        out = tmp_path / "o.jsonl"
        args = fast(srv, "--prompts", prompts, "--out", str(out), "--concurrency", "4")
        kills = 0
        for _ in range(5):
            proc = subprocess.Popen([sys.executable, str(ROOT / "prepare_teacher.py"), *args], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            n0 = done_lines(out)
            t = time.time()
            while proc.poll() is None and time.time() - t < 20 and done_lines(out) <= n0:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            if proc.poll() is not None:
                break
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            if kills == 2:
                with open(out, "a") as f:
                    f.write('{"id": "p59", "messages": [{"ro')  # a write torn by the kill
        assert kills >= 3
        res = run_cli(args, env)
        assert res.returncode == 0, res.stderr
    final, ref = unique_by(lines(out), "id"), unique_by(lines(tmp_path / "ref.jsonl"), "id")
    unique_by(lines(out), "key")
    assert len(ref) == 60
    strip = lambda r: {k: v for k, v in r.items() if k != "usage"}  # noqa: E731
    assert {i: strip(r) for i, r in final.items()} == {i: strip(r) for i, r in ref.items()}


def test_api_key_never_written_or_printed(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 20)
    secret, wrong = "sk-" + secrets.token_hex(24), "sk-" + secrets.token_hex(24)
    printed = []
    with FakeOpenAI(api_key=secret, faults=seeded_faults(0.3, ["500", "malformed", "length"], seed=3, max_attempt=1)) as srv:
        args = fast(srv, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"))
        env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
        res = run_cli(args + ["--api-key-env", "MY_TEACHER_KEY"], {**env, "MY_TEACHER_KEY": secret})
        assert res.returncode == 0, res.stderr
        printed += [res.stdout, res.stderr]
        res = run_cli(fast(srv, "--prompts", prompts, "--out", str(tmp_path / "o2.jsonl")), {**env, "OPENAI_API_KEY": wrong})
        printed += [res.stdout, res.stderr]
        assert res.returncode != 0 and "HTTP 401" in res.stderr and "invalid_api_key" in res.stderr
    assert len(lines(tmp_path / "o.jsonl")) == 20 - len(lines(tmp_path / "o.rejects.jsonl"))
    written = [p.read_text() for p in tmp_path.iterdir() if p.is_file()]
    for text in written + printed:
        assert secret not in text and wrong not in text
        assert secret[3:20] not in text and wrong[3:20] not in text


def test_batch_api_submit_resume_and_merge(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 20)
    out, state = tmp_path / "o.jsonl", tmp_path / "o.batch.json"
    bad = {"question 3: what is 3 squared?": "500", "question 4: what is 4 squared?": "empty",
           "question 5: what is 5 squared?": "malformed"}
    with FakeOpenAI(batch_faults=bad.get, batch_polls=2) as srv:
        pt.main(fast(srv, "--prompts", prompts, "--out", str(tmp_path / "live.jsonl"), "--temperature", "0.5"))
        args = fast(srv, "--prompts", prompts, "--out", str(out), "--temperature", "0.5", "--batch-api")
        pt.main(args)  # submits, then finds it in progress
        assert "submitted batch batch_1: 20 requests" in capsys.readouterr().out and state.exists()
        sent = [json.loads(x) for x in srv.files["file-1"].decode().splitlines()]
        assert len(sent) == 20 and sent[0]["body"]["temperature"] == 0.5 and sent[0]["url"] == "/v1/chat/completions"
        pt.main(args)  # a rerun resumes the same batch
        assert "batch_1: in_progress" in capsys.readouterr().out and len(srv.batches) == 1 and not lines(out)
        pt.main(args)  # completed: merged like live answers
        assert len(srv.batches) == 1 and not state.exists()
        failed = {r["id"]: r["reason"] for r in lines(tmp_path / "o.failed.jsonl")}
        assert failed == {"p3": "http_500", "p4": "empty", "p5": "malformed"}
        srv.batch_faults = lambda prompt: None
        srv.batch_polls = 100
        pt.main(args)  # a new batch for the failed three; now lose its id, as a kill before saving it would
        st = json.loads(state.read_text())
        assert len(st["keys"]) == 3 and st["batch_id"] == "batch_2"
        del st["batch_id"]
        state.write_text(json.dumps(st))
        srv.batch_polls = 1
        pt.main(args + ["--wait", "--poll-interval", "0.01"])
        assert len(srv.batches) == 2 and not state.exists()
    live, batch = unique_by(lines(tmp_path / "live.jsonl"), "id"), unique_by(lines(out), "id")
    assert len(batch) == 20 and all(r["batch"] for r in batch.values())
    assert {i: (r["key"], r["teacher"]) for i, r in batch.items()} == {i: (r["key"], r["teacher"]) for i, r in live.items()}


def test_bad_input_gives_one_line_errors(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "hi"}\n\n{"id": "b", "prompt": "x"\n')
    with pytest.raises(SystemExit, match=r"p\.jsonl:3: not valid JSON"):
        pt.main(["--prompts", str(p), "--out", str(tmp_path / "o.jsonl"), "--model", "m"])
    p.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    with pytest.raises(SystemExit, match=r"p\.jsonl:1: the last message must be the user's"):
        pt.read_rows(str(p))
    p.write_text('{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "ho"}\n')
    with pytest.raises(SystemExit, match=r"p\.jsonl:2: duplicate id 'a'"):
        pt.read_rows(str(p))
    with pytest.raises(SystemExit, match="--max-cost: needs --price-in"):
        pt.main(["--prompts", str(p), "--out", "o", "--model", "m", "--max-cost", "1"])
    with pytest.raises(SystemExit, match="--model: required"):
        pt.main(["--prompts", str(p), "--out", "o"])
    p.write_text('{"id": "a", "prompt": "hi"}\n')
    with pytest.raises(SystemExit, match="stopped: environment variable NO_SUCH_KEY is not set"):
        pt.main(["--prompts", str(p), "--out", str(tmp_path / "o.jsonl"), "--model", "m", "--api-key-env", "NO_SUCH_KEY"])


# -----------------------------------------------------------------------------
# importing teacher data

def test_import_paper_parquet(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "id": ["lmsys-1", "lmsys-2", "lmsys-3"],
        "content": [[{"role": "user", "content": "Hi there"}],
                    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                     {"role": "user", "content": "And 3+3?"}],
                    [{"role": "user", "content": "Tell me a joke"}]],
        "teacher_response": ["Hello! How can I help?", "6", "Why did the chicken cross the road?"],
        "language": ["English", "English", "English"],
    })
    pq.write_table(table, tmp_path / "train.parquet")
    out = tmp_path / "lmsys.jsonl"
    for _ in range(2):  # importing twice adds nothing
        pt.main(["--import-only", "--prompts", str(tmp_path / "train.parquet"), "--out", str(out)])
    rows = unique_by(lines(out), "id")
    assert len(rows) == 3 and rows["lmsys-2"]["teacher"] == "6" and len(rows["lmsys-2"]["messages"]) == 3
    assert rows["lmsys-1"]["messages"] == [{"role": "user", "content": "Hi there"}]
    assert rows["lmsys-1"]["language"] == "English" and rows["lmsys-1"]["source"] == "paper"
    assert pt.read_rows(str(out))[0]["teacher"]


def test_import_public_formats(shared_data, tmp_path, capsys):
    d = shared_data
    alpaca = pt.import_file(str(d / "alpaca_eval/gpt-4o-2024-05-13__model_outputs.json"))
    raw = json.loads((d / "alpaca_eval/gpt-4o-2024-05-13__model_outputs.json").read_text())
    assert len(alpaca) == 805 and alpaca[7]["teacher"] == raw[7]["output"]
    assert alpaca[7]["messages"] == [{"role": "user", "content": raw[7]["instruction"]}]
    assert Counter(r["dataset"] for r in alpaca)["selfinstruct"] == 252 and alpaca[0]["model"] == "gpt-4o-2024-05-13"

    arena = pt.import_file(str(d / "arena_hard_v0.1/question.jsonl"), answers=str(d / "arena_hard_v0.1/model_answer__gpt-4-0314.jsonl"))
    alone = {r["id"]: r for r in pt.import_file(str(d / "arena_hard_v0.1/model_answer__gpt-4-0314.jsonl"))}
    assert len(arena) == 500 and all(r["teacher"] == alone[r["id"]]["teacher"] for r in arena)
    assert all(r["messages"] == alone[r["id"]]["messages"] for r in arena) and alone[arena[0]["id"]]["model"] == "gpt-4-0314"

    dolly = pt.import_file(str(d / "minillm_eval/dolly_valid.jsonl"))
    first = json.loads((d / "minillm_eval/dolly_valid.jsonl").open().readline())
    assert len(dolly) == 500 and dolly[0]["teacher"] == first["output"] and dolly[0]["topic"] == first["topic"]
    assert dolly[0]["messages"][0]["content"] == first["instruction"] + "\n\n" + first["input"]
    sinst = pt.import_file(str(d / "minillm_eval/sinst_11__valid.jsonl"))
    assert len(sinst) == 1694 and all(isinstance(r["teacher"], str) for r in sinst)
    assert len(pt.import_file(str(d / "minillm_eval/vicuna_valid.jsonl"))) == 80
    selfinst = pt.import_file(str(d / "self_instruct/user_oriented_instructions.jsonl"))
    assert len(selfinst) == 252 and selfinst[0]["id"] == "user_oriented_task_0"
    assert selfinst[0]["messages"][0]["content"] == raw[[r["dataset"] for r in raw].index("selfinstruct")]["instruction"]

    mt = pt.import_file(str(d / "fastchat/mt_bench__question.jsonl"))
    assert len(mt) == 80 and not any("teacher" in r for r in mt) and mt[0]["id"] == "81"
    mt_ref = pt.import_file(str(d / "fastchat/mt_bench__question.jsonl"), answers=str(d / "fastchat/mt_bench__reference_answer__gpt-4.jsonl"))
    two = [r for r in mt_ref if r["id"] == "101-turn2"][0]
    assert len(mt_ref) == 80 + 30 and [m["role"] for m in two["messages"]] == ["user", "assistant", "user"]
    vicuna = pt.import_file(str(d / "fastchat/vicuna80_original/question.jsonl"),
                            answers=str(d / "fastchat/vicuna80_original/answer_gpt35.jsonl"))
    assert len(vicuna) == 80 and all(r.get("teacher") for r in vicuna)
    assert len(pt.import_file(str(d / "fastchat/vicuna_bench__question.jsonl"))) == 80

    out = tmp_path / "alpaca.jsonl"
    pt.main(["--import-only", "--prompts", str(d / "alpaca_eval/gpt-4o-2024-05-13__model_outputs.json"), "--out", str(out),
             "--test-size", "100"])
    assert "805 done" in capsys.readouterr().out
    assert len(lines(tmp_path / "alpaca.test.jsonl")) == 100 and len(lines(tmp_path / "alpaca.train.jsonl")) == 705


# -----------------------------------------------------------------------------
# --backend local

def fake_model_module(calls):
    """A stand-in for model.py with its API: the 'model' answers each prompt's characters reversed."""
    mod = types.ModuleType("model")

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            assert skip_special_tokens and 0 not in ids
            return "".join(map(chr, ids))

    class Transformer:
        @staticmethod
        def from_pretrained(path, dtype=None, device=None):
            return "weights of " + path

    def generate(model, prompts, n=1, max_new_tokens=16, temperature=1.0, top_p=1.0, stop_ids=None, seed=None):
        calls.append((len(prompts), max_new_tokens, temperature))
        outs = []
        for p in prompts:
            toks = list(reversed(p))
            stopped = len(toks) < max_new_tokens
            outs.append(types.SimpleNamespace(tokens=toks + [0] if stopped else toks[:max_new_tokens], stopped=stopped, logprobs=None))
        return outs
    mod.Transformer, mod.generate = Transformer, generate
    mod.load_tokenizer = lambda path: Tok()
    mod.render_prompt = lambda tok, messages: [ord(c) for m in messages for c in m["content"]]
    mod.stop_token_ids = lambda tok: [0]
    return mod


def test_local_backend_batches_and_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "model", fake_model_module(calls))
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"id": str(i), "prompt": "ab" * (i + 1)}) + "\n" for i in range(10)))
    out = tmp_path / "o.jsonl"
    args = ["--backend", "local", "--model", "ckpt", "--prompts", str(p), "--out", str(out), "--batch-size", "4",
            "--max-tokens", "16", "--temperature", "0.8"]
    pt.main(args)
    assert calls == [(4, 16, 0.8), (4, 16, 0.8), (2, 16, 0.8)]
    rows = unique_by(lines(out), "id")
    assert len(rows) == 7 and len(lines(tmp_path / "o.rejects.jsonl")) == 3  # "ab" * 8 and longer hit the limit
    assert rows["2"]["teacher"] == "bababa" and rows["2"]["finish_reason"] == "stop" and rows["2"]["model"] == "ckpt"
    assert rows["2"]["usage"] == {"prompt_tokens": 6, "completion_tokens": 7}
    pt.main(args)
    assert len(calls) == 3
    pt.main(args + ["--keep-truncated"])
    assert len(calls) == 3 and len(lines(out)) == 10


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, smollm2_path):
    """A random 2-layer Llama with SmolLM2's tokenizer and chat template (needs model.py)."""
    if not (ROOT / "model.py").exists():
        pytest.skip("model.py is not written yet")
    import torch
    import transformers
    from model import load_tokenizer
    tok = load_tokenizer(smollm2_path)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_local_backend_with_model_py(tmp_path, tiny_ckpt):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"id": str(i), "prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    out = tmp_path / "o.jsonl"
    args = ["--backend", "local", "--model", tiny_ckpt, "--prompts", str(p), "--out", str(out), "--max-tokens", "6",
            "--batch-size", "2", "--system", "Be brief.", "--keep-truncated"]
    pt.main(args)
    rows = unique_by(lines(out), "id")
    assert set(rows) == {"0", "1", "2"} and all(r["finish_reason"] in ("stop", "length") for r in rows.values())
    assert all(r["usage"]["completion_tokens"] <= 6 and r["system"] == "Be brief." for r in rows.values())
    pt.main(args)
    assert len(lines(out)) == 3
    # sampled answers depend on the request, not on the batch it went in: batch sizes 1 and 3 agree
    texts = []
    for bs in ("1", "3"):
        o = tmp_path / f"s{bs}.jsonl"
        pt.main(args[:6] + ["--out", str(o), "--max-tokens", "6", "--batch-size", bs, "--temperature", "1.0",
                            "--keep-truncated"])
        texts.append({k: r["teacher"] for k, r in unique_by(lines(o), "id").items()})
    assert texts[0] == texts[1] and len(set(texts[0].values())) == 3, texts
