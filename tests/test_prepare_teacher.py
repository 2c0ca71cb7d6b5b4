"""Tests of prepare_teacher.py against a fake OpenAI-compatible server on loopback (tests/fake_openai.py)."""

import errno
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

import api
import prepare_teacher as pt
from importers import import_file
import data
from data import DataError, JsonlStore, read_rows
from fake_openai import FakeOpenAI, answer_for, fast_sdk_retries, seeded_faults
from flags import key_env_problem

ROOT = Path(__file__).resolve().parent.parent
ALL_FAULTS = ["429", "500", "503", "slow", "drop", "malformed", "nochoices", "empty"]


def fast(srv, *extra):
    """Flags that make a run quick against the fake server: few retries, and a deadline short enough for the
    "slow" fault (4 s) yet roomy for a loaded 2-core machine (--timeout bounds the whole request)."""
    return ["--base-url", srv.url, "--model", "fake", "--timeout", "3.0", "--retries", "3", *extra]


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


def run_main(capsys, args):
    """(exit status, stdout, stderr) of an in-process run."""
    code = pt.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err, *needles):
    """stderr (progress bars aside) ends in one line that holds every needle, and shows no traceback."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("prepare_teacher.py: ") and all(n in last for n in needles), err
    return last


def run_cli(args, env, **kw):
    return subprocess.run([sys.executable, str(ROOT / "prepare_teacher.py"), *args], env=env, capture_output=True,
                          text=True, timeout=60, **kw)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
    fast_sdk_retries(monkeypatch)  # the SDK's own backoff (0.5 s, doubled) down to a millisecond


# -----------------------------------------------------------------------------
# building blocks

def test_store_repairs_torn_line_and_refuses_duplicates(tmp_path, capsys):
    path = tmp_path / "o.jsonl"
    store = JsonlStore(str(path))
    assert store.append({"key": "a", "v": 1}) and store.append({"key": "b", "v": "\u2028 odd separator"})
    assert not store.append({"key": "a", "v": 2})
    store.close()
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "v"')  # what a kill -9 in the middle of a write leaves
    store = JsonlStore(str(path))
    assert "repaired a torn last line" in capsys.readouterr().err
    assert set(store.records) == {"a", "b"} and "a" in store and len(store.records) == 2
    store.append({"key": "c", "v": 3})
    store.close()
    assert [r["key"] for r in lines(path)] == ["a", "b", "c"]
    with open(path, "ab") as f:
        f.write(b'{"key": "d", "v": 4}')  # whole, but for its newline: kept
    store = JsonlStore(str(path))
    store.append({"key": "e"})
    store.close()
    assert [r["key"] for r in lines(path)] == ["a", "b", "c", "d", "e"]
    with open(path, "ab") as f:
        f.write('{"key": "f", "v": "\u65e5'.encode()[:-1])  # a kill inside a multi-byte character: torn too
    store = JsonlStore(str(path))
    assert "repaired a torn last line" in capsys.readouterr().err and "f" not in store
    store.close()
    assert [r["key"] for r in lines(path)] == ["a", "b", "c", "d", "e"]


def test_store_bad_line_and_second_writer(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(DataError, match=r"o\.jsonl:2: not valid JSON"):
        JsonlStore(str(path))
    path.write_text('{"key": "a"}\n')
    store = JsonlStore(str(path))
    with pytest.raises(DataError, match="in use by another running process"):
        JsonlStore(str(path))
    store.close()


@pytest.mark.parametrize("content", [
    b'{"id":"a","prompt":"hi"}\n{"id":"b","prompt":"yo"}',   # a prompt file whose last line lacks its newline
    b'{"key": "a"}\n{"id": "b"}\n{"key": "c", "v',            # one line of ours is not enough
    b'{"id": "x", "messages": [{"role": "us',                 # a torn line and nothing else
    b'[{"key": "a"}]\n{"key": "b"',                           # a JSON array is not a record
    b'{"key": "a"}\n\xff\xfe garbage',
])
def test_store_never_touches_a_file_not_its_own(tmp_path, content):
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"f\.jsonl"):
        JsonlStore(str(path))
    assert path.read_bytes() == content


def test_request_key_is_stable():
    msgs = [{"role": "user", "content": "hi"}]
    k = api.request_key("m", msgs, {"temperature": 0.8, "max_tokens": 10})
    assert k == api.request_key("m", [dict(m) for m in msgs], {"max_tokens": 10, "temperature": 0.8})
    assert k != api.request_key("m", msgs, {"temperature": 0.7, "max_tokens": 10})
    assert k != api.request_key("m2", msgs, {"temperature": 0.8, "max_tokens": 10})
    assert len(k) >= 16 and int(k, 16) >= 0


def test_chat_with_retry_each_fault():
    """Transport faults are retried by the SDK, bad answers by chat_with_retry, on one budget of HTTP
    requests; "attempts" counts the requests the server saw."""
    msgs = lambda p: [{"role": "user", "content": p}]  # noqa: E731
    # the prompt names its fault; "always-*" prompts fault on every attempt, the others only on the first
    def faults(prompt, attempt):
        kind = prompt.split(":")[1]
        return kind if prompt.startswith("always") or attempt == 1 else None
    with FakeOpenAI(faults=faults, slow_s=1.5, retry_after="1") as srv:
        client = api.make_client(srv.url, timeout=1.0)  # roomy: a busy 2-core machine must not time out by itself
        seen = lambda p: sum(prompt == p for _, prompt, _ in srv.log)  # noqa: E731
        for kind in ALL_FAULTS + ["html"]:
            if kind == "429":
                continue  # checked below, with its Retry-After
            res = api.chat_with_retry(client, "fake", msgs(f"once:{kind}"), retries=2)
            assert res["attempts"] == 2 == seen(f"once:{kind}") and res["text"] == answer_for("fake", msgs(f"once:{kind}")), kind
        reasons = {"slow": "timeout", "drop": "connection", "malformed": "malformed", "nochoices": "malformed",
                   "empty": "empty", "html": "malformed", "500": "http_500", "503": "http_503"}
        for kind, reason in reasons.items():
            with pytest.raises(api.RetryError) as e:
                api.chat_with_retry(client, "fake", msgs(f"always:{kind}"), retries=1)
            assert e.value.reason == reason and e.value.attempts == 2 == seen(f"always:{kind}"), kind
        # Retry-After: 1 is honoured by the SDK although its backoff is a millisecond here
        t = time.time()
        res = api.chat_with_retry(client, "fake", msgs("once:429"), retries=1)
        assert time.time() - t >= 0.9 and res["attempts"] == 2 == seen("once:429")
        srv.retry_after = "600"  # longer than the SDK waits: failed at once, a rerun asks again
        with pytest.raises(api.RetryError) as e:
            api.chat_with_retry(client, "fake", msgs("always:429"), retries=3)
        assert e.value.reason == "http_429" and e.value.attempts == 1 == seen("always:429")
        with pytest.raises(api.RetryError) as e:
            api.chat_with_retry(client, "fake", msgs("ok:none"), retries=2, validate=lambda t: t.startswith("{"))
        assert e.value.reason == "invalid" and e.value.attempts == 3 == seen("ok:none")
        assert e.value.usage["completion_tokens"] > 0  # three answers were billed
        with pytest.raises(api.RetryError) as e:  # the prompt is the problem: no retry, the run goes on
            api.chat_with_retry(client, "fake", msgs("always:400_context"), retries=3)
        assert e.value.reason == "too_long" and e.value.attempts == 1
        n = len(srv.log)
        with pytest.raises(api.FatalAPIError, match="model_not_found"):
            api.chat_with_retry(client, "fake", msgs("always:400_model"), retries=3)
        assert len(srv.log) == n + 1


@pytest.mark.parametrize("fault", ["trickle", "trickle_headers"])
def test_timeout_bounds_the_whole_request(fault, tmp_path, capsys):
    """A server that sends its answer (or its headers) a byte at a time, each byte well inside any read
    timeout: --timeout still ends the request, counted as a timeout, and the SDK's retries each get it."""
    msgs = [{"role": "user", "content": f"always:{fault}"}]
    with FakeOpenAI(faults=lambda prompt, attempt: prompt.split(":")[1], trickle_s=0.2) as srv:
        client = api.make_client(srv.url, timeout=1.0)
        t = time.time()
        with pytest.raises(api.RetryError) as e:
            api.chat_with_retry(client, "fake", msgs, retries=1)
        assert e.value.reason == "timeout" and e.value.attempts == 2 and time.time() - t < 6, (e.value, time.time() - t)
        # the whole program: one prompt, --timeout 1 --retries 0 -> failed as a timeout within seconds
        prompts = tmp_path / "p.jsonl"
        prompts.write_text(json.dumps({"id": "a", "prompt": f"always:{fault}"}) + "\n")
        t = time.time()
        code, out, err = run_main(capsys, fast(srv, "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                                               "--timeout", "1", "--retries", "0"))
        assert code == 1 and time.time() - t < 10
        assert [r["reason"] for r in lines(tmp_path / "o.failed.jsonl")] == ["timeout"]


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
    with FakeOpenAI(faults=faults, slow_s=4.0) as srv:
        args = fast(srv, "--prompts", prompts, "--out", str(out), "--concurrency", "16", "--refusal-filter",
                    "--price-in", "1", "--price-out", "2")
        code, report, _ = run_main(capsys, args)
        done = unique_by(lines(out), "id")
        rejects = unique_by(lines(tmp_path / "o.rejects.jsonl"), "id")
        failed = {r["id"]: r for r in lines(tmp_path / "o.failed.jsonl")}
        assert code == 0
        assert not set(done) & set(rejects) and not set(done) & set(failed) and not set(rejects) & set(failed)
        assert set(done) | set(rejects) | set(failed) == {f"p{i}" for i in range(200)}  # none lost
        assert len(done) > 150 and failed and {r["reason"] for r in rejects.values()} == {"truncated", "refusal"}
        assert {r["reason"] for r in failed.values()} <= {"timeout", "connection", "malformed", "empty", "http_429",
                                                           "http_500", "http_503"}
        for row in done.values():
            assert row["teacher"] == answer_for("fake", row["messages"]) and row["finish_reason"] == "stop"
        assert f"{len(done)} done, {len(failed)} failed" in report and "filtered (" in report and "cost $" in report

        srv.faults = lambda prompt, attempt: None
        code, report, _ = run_main(capsys, args + ["--keep-truncated"])  # retries the failed, frees the truncated
        final = unique_by(lines(out), "id")
        assert code == 0 and set(final) == {f"p{i}" for i in range(200)} - {i for i, r in rejects.items() if r["reason"] == "refusal"}
        assert "0 failed" in report and "0 pending" in report
        asked = Counter(prompt for _, prompt, _ in srv.log)
        n_log = len(srv.log)
        assert pt.main(args) == 0  # asks nothing twice
        assert len(srv.log) == n_log and unique_by(lines(out), "key")
    assert max(asked.values()) <= 5  # up to 4 requests in the first run (SDK's and ours together), then one


def test_fatal_error_stops_at_once_with_one_line(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 200)
    with FakeOpenAI(faults=lambda p, a: "400_model", delay=0.01) as srv:
        code, _, err = run_main(capsys, fast(srv, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"),
                                             "--concurrency", "4"))
        assert len(srv.log) <= 8
    assert code == 1
    assert one_error_line(err, "does not exist").startswith("prepare_teacher.py: stopped: HTTP 400")


def test_budget_stops_cleanly_and_holds_across_reruns(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 100)
    with FakeOpenAI() as srv:
        # a request costs about 8 input and 15 output tokens, at most 8 + 20: $0.0028 at these prices
        args = fast(srv, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"), "--concurrency", "2",
                    "--price-in", "100", "--price-out", "100", "--max-cost", "0.02", "--max-tokens", "20")
        code, report, _ = run_main(capsys, args)
        n = len(lines(tmp_path / "o.jsonl"))
        assert code == 0 and 5 <= n <= 12 and len(srv.log) == n and "stopped at the budget" in report and "pending" in report
        code, report, _ = run_main(capsys, args)
        assert code == 0 and "stopped at the budget" in report and len(srv.log) == n


def test_budget_holds_under_concurrency(tmp_path, capsys):
    """32 requests in flight at once: each books its worst case before it is sent, so spending stays
    within --max-cost (and at most one request's worst case beyond it, were the estimate short)."""
    prompts = write_prompts(tmp_path / "p.jsonl", 200)
    with FakeOpenAI(delay=0.3) as srv:
        args = fast(srv, "--prompts", prompts, "--out", str(tmp_path / "o.jsonl"), "--concurrency", "32",
                    "--price-in", "100", "--price-out", "100", "--max-cost", "0.05", "--max-tokens", "20")
        code, report, _ = run_main(capsys, args)
        rows = lines(tmp_path / "o.jsonl")
        spent = sum((r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]) * 100 / 1e6 for r in rows)
        worst = (12 + 20) * 100 / 1e6
        assert code == 0 and 0.05 - 4 * worst < spent <= 0.05 + worst, (spent, len(rows))
        assert len(srv.log) == len(rows) and "of the --max-cost $0.05" in report
    with pytest.raises(SystemExit):  # a worst case needs an output bound
        pt.parse_args(["--prompts", "p", "--out", "o", "--model", "m", "--price-in", "1", "--price-out", "1",
                       "--max-cost", "1"])
    assert "--max-cost needs --max-tokens" in capsys.readouterr().err


def test_system_prompt_filters_split_and_dry_run(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    out = tmp_path / "o.jsonl"
    with FakeOpenAI(faults=lambda p, a: "length" if p.startswith("question 3") else None) as srv:
        base = fast(srv, "--prompts", prompts, "--out", str(out), "--system", "Be brief.", "--temperature", "0.7",
                    "--max-tokens", "64")
        code, report, _ = run_main(capsys, base + ["--dry-run"])
        assert code == 0 and "estimate: 40 requests" in report and not srv.log
        assert pt.main(base + ["--test-size", "0.25"]) == 0
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
    # the split is a property of the ids: the order the answers arrived in does not change it
    shuffled = out.read_text().splitlines(keepends=True)
    random.Random(0).shuffle(shuffled)
    out.write_text("".join(shuffled))
    assert pt.main(base + ["--test-size", "0.25"]) == 0
    assert lines(tmp_path / "o.test.jsonl") == test and lines(tmp_path / "o.train.jsonl") == train
    assert pt.main(base + ["--test-size", "5"]) == 0  # all answered: no request, just a new split
    test5 = lines(tmp_path / "o.test.jsonl")
    assert len(test5) == 5 and {r["id"] for r in test5} <= {r["id"] for r in test} | {r["id"] for r in train}


def done_lines(path):
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_kill9_mid_run_then_resume_equals_uninterrupted(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 60)
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-key"}
    rng = random.Random(0)
    with FakeOpenAI(faults=seeded_faults(0.3, ["429", "500", "drop"], seed=2, max_attempt=1), delay=0.04) as srv:
        assert pt.main(fast(srv, "--prompts", prompts, "--out", str(tmp_path / "ref.jsonl"), "--concurrency", "4")) == 0
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


def test_ctrl_c_stops_with_one_line_and_resumes(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 40)
    out = tmp_path / "o.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-key"}
    with FakeOpenAI(delay=0.25) as srv:
        args = fast(srv, "--prompts", prompts, "--out", str(out), "--concurrency", "2")
        # SIG_DFL in the child: a runner that starts the tests in the background with SIGINT ignored would
        # otherwise pass that on, and the child would never see the Ctrl-C
        proc = subprocess.Popen([sys.executable, str(ROOT / "prepare_teacher.py"), *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        t = time.time()
        while done_lines(out) < 2 and time.time() - t < 30:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 130
        one_error_line(err, "interrupted", "rerun")
        kept = unique_by(lines(out), "id")
        assert 2 <= len(kept) < 40
        assert run_cli(args + ["--concurrency", "16"], env).returncode == 0
    assert len(unique_by(lines(out), "id")) == 40


def test_api_key_never_written_or_printed(tmp_path, capsys):
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
    # a key given by mistake where the NAME of its variable belongs: refused, and never echoed
    for key in (secret, "AIzaSy" + secrets.token_urlsafe(24), "gsk_" + secrets.token_hex(4) + "AbC" + secrets.token_hex(20),
                "abcd" + secrets.token_hex(16), "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"):
        with pytest.raises(SystemExit) as e:
            pt.main(["--prompts", prompts, "--out", str(tmp_path / "o3.jsonl"), "--model", "m", "--api-key-env", key])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--api-key-env" in err and "NAME of an environment variable" in err
        with pytest.raises(api.FatalAPIError) as e:
            api.make_client(api_key_env=key)
        printed += [err, str(e.value)]
        assert key[4:20] not in err + str(e.value)
    for name in ("OPENAI_API_KEY", "MY_TEACHER_KEY_2", "together_api_key", "AZURE_OPENAI_API_KEY_2024"):
        assert key_env_problem(name) is None  # names as people write them pass
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
        assert pt.main(fast(srv, "--prompts", prompts, "--out", str(tmp_path / "live.jsonl"), "--temperature", "0.5")) == 0
        args = fast(srv, "--prompts", prompts, "--out", str(out), "--temperature", "0.5", "--batch-api")
        code, report, _ = run_main(capsys, args)  # submits, then finds it in progress
        assert code == 0 and "submitted batch batch_1: 20 requests" in report and state.exists()
        sent = [json.loads(x) for x in srv.files["file-1"].decode().splitlines()]
        assert len(sent) == 20 and sent[0]["body"]["temperature"] == 0.5 and sent[0]["url"] == "/v1/chat/completions"
        code, report, _ = run_main(capsys, args)  # a rerun resumes the same batch
        assert code == 0 and "batch_1: in_progress" in report and len(srv.batches) == 1 and not lines(out)
        assert pt.main(args) == 0  # completed: merged like live answers
        assert len(srv.batches) == 1 and not state.exists()
        failed = {r["id"]: r["reason"] for r in lines(tmp_path / "o.failed.jsonl")}
        assert failed == {"p3": "http_500", "p4": "empty", "p5": "malformed"}
        srv.batch_faults = lambda prompt: None
        srv.batch_polls = 100
        assert pt.main(args) == 0  # a new batch for the failed three; now lose its id, as a kill before saving it would
        st = json.loads(state.read_text())
        assert len(st["keys"]) == 3 and st["batch_id"] == "batch_2"
        del st["batch_id"]
        state.write_text(json.dumps(st))
        srv.batch_polls = 1
        assert pt.main(args + ["--wait", "--poll-interval", "0.01"]) == 0
        assert len(srv.batches) == 2 and not state.exists()
    live, batch = unique_by(lines(tmp_path / "live.jsonl"), "id"), unique_by(lines(out), "id")
    assert len(batch) == 20 and all(r["batch"] for r in batch.values())
    assert {i: (r["key"], r["teacher"]) for i, r in batch.items()} == {i: (r["key"], r["teacher"]) for i, r in live.items()}


# -----------------------------------------------------------------------------
# bad input, faults and failures: one line, a non-zero status, nothing lost

def test_input_file_is_never_written_cli(tmp_path):
    """An output that is the input is refused before anything is read or written (a torn-line repair of
    the output would cut prompt "b" from the input)."""
    content = b'{"id":"a","prompt":"hi"}\n{"id":"b","prompt":"yo"}'
    (tmp_path / "p.jsonl").write_bytes(content)
    res = run_cli(["--prompts", "p.jsonl", "--out", "p.jsonl", "--model", "m"], {**os.environ, "OPENAI_API_KEY": "sk-x"},
                  cwd=tmp_path)
    assert res.returncode == 1 and (tmp_path / "p.jsonl").read_bytes() == content
    assert res.stdout == "" and one_error_line(res.stderr, "p.jsonl", "--prompts") == res.stderr.strip()
    assert sorted(os.listdir(tmp_path)) == ["p.jsonl"]


def test_input_file_is_never_written(tmp_path, capsys):
    content = b'{"id":"a","prompt":"hi"}\n{"id":"b","prompt":"yo"}'
    p = tmp_path / "p.jsonl"
    p.write_bytes(content)
    os.symlink(p, tmp_path / "link.jsonl")
    (tmp_path / "o.failed.jsonl").write_bytes(content)
    (tmp_path / "o.train.jsonl").write_bytes(content)
    for flags in (["--prompts", str(p), "--out", str(tmp_path / "." / "p.jsonl")],
                  ["--prompts", str(p), "--out", str(tmp_path / "link.jsonl")],
                  ["--prompts", str(tmp_path / "o.failed.jsonl"), "--out", str(tmp_path / "o.jsonl")],
                  ["--prompts", str(tmp_path / "o.train.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--test-size", "1"],
                  ["--prompts", str(tmp_path / "q.jsonl"), "--answers", str(p), "--out", str(tmp_path / "p.jsonl")]):
        code, _, err = run_main(capsys, flags + ["--model", "m"])
        assert code == 1 and all((tmp_path / f).read_bytes() == content for f in ("p.jsonl", "o.failed.jsonl", "o.train.jsonl"))
        one_error_line(err, "--out", "never written")
    assert not (tmp_path / "o.jsonl").exists()
    # an --out that is no input but not ours either (someone's data file) is refused, untouched
    other = tmp_path / "other.jsonl"
    other.write_bytes(content)
    code, _, err = run_main(capsys, ["--prompts", str(tmp_path / "o.failed.jsonl"), "--out", str(other), "--model", "m"])
    assert code == 1 and other.read_bytes() == content
    one_error_line(err, "other.jsonl:1", "not a line this program wrote")


def test_failed_requests_exit_nonzero_and_say_so_last(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", 10)
    with FakeOpenAI(faults=lambda p, a: "html") as srv:  # a proxy's welcome page instead of the API
        code, _, err = run_main(capsys, fast(srv, "--prompts", prompts, "--out", str(tmp_path / "h.jsonl")))
    assert code == 1 and one_error_line(err, "only 0 of 10 requests got an answer")
    assert {r["reason"] for r in lines(tmp_path / "h.failed.jsonl")} == {"malformed"}
    # some got through: the threshold decides, and what did arrive is kept
    half = lambda p, a: "500" if int(p.split()[1].rstrip(":")) % 10 < 6 else None  # noqa: E731
    with FakeOpenAI(faults=half) as srv:
        code, _, err = run_main(capsys, fast(srv, "--prompts", prompts, "--out", str(tmp_path / "a.jsonl")))
        assert code == 1 and one_error_line(err, "only 4 of 10", "--min-success 0.5")
        assert len(lines(tmp_path / "a.jsonl")) == 4
        code, _, err = run_main(capsys, fast(srv, "--prompts", prompts, "--out", str(tmp_path / "b.jsonl"),
                                             "--min-success", "0.3"))
        assert code == 0 and "only" not in err
    # the server is down: a subprocess, so that "last" means the last line of everything it printed
    dead = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--retries", "0"]
    res = subprocess.run([sys.executable, str(ROOT / "prepare_teacher.py"), "--prompts", prompts, "--out",
                          str(tmp_path / "d.jsonl"), *dead], env={**os.environ, "OPENAI_API_KEY": "sk-x"},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stdout
    assert "only 0 of 10 requests got an answer" in res.stdout.strip().splitlines()[-1]
    assert {r["reason"] for r in lines(tmp_path / "d.failed.jsonl")} == {"connection"}


def test_full_disk_keeps_what_was_written(tmp_path, capsys, monkeypatch):
    prompts = write_prompts(tmp_path / "p.jsonl", 20)
    out = tmp_path / "o.jsonl"
    real_write, box = os.write, {"left": 5}

    def write(fd, data):  # the disk fills in the middle of the 6th answer's line
        if os.fstat(fd).st_ino == box.get("ino"):
            if box["left"] == 0:
                real_write(fd, bytes(data[:len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
            box["left"] -= 1
        return real_write(fd, data)
    with FakeOpenAI() as srv:
        args = fast(srv, "--prompts", prompts, "--out", str(out), "--concurrency", "1")
        out.touch()
        box["ino"] = out.stat().st_ino
        monkeypatch.setattr(os, "write", write)
        code, _, err = run_main(capsys, args)
        monkeypatch.setattr(os, "write", real_write)
        assert code == 1 and one_error_line(err, "o.jsonl", "No space left on device")
        assert len(unique_by(lines(out), "id")) == 5  # five whole lines, no half of the sixth
        assert pt.main(args) == 0
    assert len(unique_by(lines(out), "id")) == 20


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    p, o = tmp_path / "p.jsonl", str(tmp_path / "o.jsonl")
    cases = [
        (b'{"id": "a", "prompt": "hi"}\n\n{"id": "b", "prompt": "x"\n', r"p.jsonl:3: not valid JSON"),
        (b'{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "caf\xe9"}\n', r"p.jsonl:2: not UTF-8"),
        (b'{"id": "a", "messages": [{"role": "user", "content": ["hi", "there"]}]}\n', "p.jsonl:1: message 1: 'content' must be a string, not list"),
        (b'{"id": "a", "messages": [{"role": "user", "content": 7}]}\n', "p.jsonl:1: message 1: 'content' must be a string, not int"),
        (b'{"id": "a", "messages": [{"role": "bot", "content": "hi"}]}\n', "p.jsonl:1: message 1 needs a role"),
        (b'{"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
         "p.jsonl:1: the last message must be the user's"),
        (b'{"id": "a", "prompt": "hi"}\n{"id": "a", "prompt": "ho"}\n', "p.jsonl:2: duplicate id 'a'"),
    ]
    for content, message in cases:
        p.write_bytes(content)
        with pytest.raises(DataError, match=message.replace(".", r"\.").replace("'", "'")):
            import_file(str(p))
        code, _, err = run_main(capsys, ["--prompts", str(p), "--out", o, "--model", "m"])
        assert code == 1 and one_error_line(err, message)
    j = tmp_path / "p.json"
    j.write_bytes(b'[\n{"instruction": "hi", "output": "yo", "generator": "g"},\n{"instruction": "\xff"}\n]')
    code, _, err = run_main(capsys, ["--prompts", str(j), "--out", o, "--import-only"])
    assert code == 1 and one_error_line(err, "p.json:3: not UTF-8")
    p.write_text('{"id": "a", "prompt": "hi"}\n')
    (tmp_path / "dir.jsonl").mkdir()
    (tmp_path / "file").write_text("")
    for out, message in ((tmp_path / "dir.jsonl", "is a directory"), (tmp_path / "file" / "o.jsonl", "cannot create")):
        code, _, err = run_main(capsys, ["--prompts", str(p), "--out", str(out), "--model", "m"])
        assert code == 1 and one_error_line(err, "--out", message)
    assert sorted(os.listdir(tmp_path)) == ["dir.jsonl", "file", "p.json", "p.jsonl"]  # nothing created
    code, _, err = run_main(capsys, ["--prompts", str(p), "--out", o, "--model", "m", "--api-key-env", "NO_SUCH_KEY"])
    assert code == 1 and one_error_line(err, "stopped: environment variable NO_SUCH_KEY is not set")
    for flags, message in ((["--model", "m", "--max-cost", "1"], "--max-cost needs --price-in"), ([], "--model is required"),
                           (["--model", "m", "--extra", "[1]"], "argument --extra: invalid json_object value")):
        with pytest.raises(SystemExit) as e:
            pt.main(["--prompts", str(p), "--out", o] + flags)
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,says", [
    ("--concurrency", "0", "0 is out of range (must be >= 1)"),
    ("--concurrency", "-4", "-4 is out of range (must be >= 1)"),
    ("--max-tokens", "0", "0 is out of range (must be >= 1)"),
    ("--temperature", "-0.1", "-0.1 is out of range (must be >= 0)"),
    ("--temperature", "nan", "nan is out of range (must be >= 0)"),
    ("--timeout", "0", "0 is out of range (must be > 0)"),
    ("--timeout", "-1", "-1 is out of range (must be > 0)"),
    ("--retries", "-1", "-1 is out of range (must be >= 0)"),
    ("--price-in", "-100", "-100 is out of range (must be >= 0)"),
    ("--price-out", "-1", "-1 is out of range (must be >= 0)"),
    ("--max-cost", "-5", "-5 is out of range (must be >= 0)"),
    ("--max-cost", "inf", "inf is out of range (must be >= 0)"),
    ("--test-size", "-3", "-3 is out of range (must be > 0)"),
    ("--test-size", "0", "0 is out of range (must be > 0)"),
    ("--test-size", "2.5", "2.5 is neither a fraction below 1 nor a whole number of rows"),
    ("--batch-size", "0", "0 is out of range (must be >= 1)"),
    ("--poll-interval", "0", "0 is out of range (must be > 0)"),
    ("--min-success", "1.5", "1.5 is out of range (must be >= 0 and <= 1)"),
    ("--refusal-filter", "(unclosed", "invalid regex value: '(unclosed'"),
])
def test_nonsense_numbers_are_refused_by_argparse(tmp_path, capsys, flag, value, says):
    p = write_prompts(tmp_path / "p.jsonl", 1)
    with pytest.raises(SystemExit) as e:
        pt.main(["--prompts", p, "--out", str(tmp_path / "o.jsonl"), "--model", "m", "--price-in", "1", "--price-out",
                 "1", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: prepare_teacher.py")
    assert err.strip().splitlines()[-1] == f"prepare_teacher.py: error: argument {flag}: {says}"
    assert not (tmp_path / "o.jsonl").exists()


def test_edge_values_are_accepted():
    args = pt.parse_args(["--prompts", "p", "--out", "o", "--model", "m", "--temperature", "0", "--retries", "0",
                          "--price-in", "0", "--price-out", "0", "--max-cost", "0", "--max-tokens", "1",
                          "--min-success", "1", "--test-size", "0.5"])
    assert (args.temperature, args.retries, args.max_cost, args.min_success, args.test_size) == (0, 0, 0, 1, 0.5)
    assert pt.parse_args(["--prompts", "p", "--out", "o", "--model", "m", "--test-size", "3"]).test_size == 3
    local = pt.parse_args(["--prompts", "p", "--out", "o", "--model", "m", "--backend", "local"])
    assert (local.temperature, local.max_tokens) == (1.0, 1536)  # model.py needs values; the request key records them


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
        assert pt.main(["--import-only", "--prompts", str(tmp_path / "train.parquet"), "--out", str(out)]) == 0
    rows = unique_by(lines(out), "id")
    assert len(rows) == 3 and rows["lmsys-2"]["teacher"] == "6" and len(rows["lmsys-2"]["messages"]) == 3
    assert rows["lmsys-1"]["messages"] == [{"role": "user", "content": "Hi there"}]
    assert rows["lmsys-1"]["language"] == "English" and rows["lmsys-1"]["source"] == "paper"
    assert read_rows(str(out))[0]["teacher"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        import_file(str(tmp_path / "bad.parquet"))


def test_import_public_formats(shared_data, tmp_path, capsys):
    d = shared_data
    alpaca = import_file(str(d / "alpaca_eval/gpt-4o-2024-05-13__model_outputs.json"))
    raw = json.loads((d / "alpaca_eval/gpt-4o-2024-05-13__model_outputs.json").read_text())
    assert len(alpaca) == 805 and alpaca[7]["teacher"] == raw[7]["output"]
    assert alpaca[7]["messages"] == [{"role": "user", "content": raw[7]["instruction"]}]
    assert Counter(r["dataset"] for r in alpaca)["selfinstruct"] == 252 and alpaca[0]["model"] == "gpt-4o-2024-05-13"

    arena = import_file(str(d / "arena_hard_v0.1/question.jsonl"), answers=str(d / "arena_hard_v0.1/model_answer__gpt-4-0314.jsonl"))
    alone = {r["id"]: r for r in import_file(str(d / "arena_hard_v0.1/model_answer__gpt-4-0314.jsonl"))}
    assert len(arena) == 500 and all(r["teacher"] == alone[r["id"]]["teacher"] for r in arena)
    assert all(r["messages"] == alone[r["id"]]["messages"] for r in arena) and alone[arena[0]["id"]]["model"] == "gpt-4-0314"

    dolly = import_file(str(d / "minillm_eval/dolly_valid.jsonl"))
    first = json.loads((d / "minillm_eval/dolly_valid.jsonl").open().readline())
    assert len(dolly) == 500 and dolly[0]["teacher"] == first["output"] and dolly[0]["topic"] == first["topic"]
    assert dolly[0]["messages"][0]["content"] == first["instruction"] + "\n\n" + first["input"]
    sinst = import_file(str(d / "minillm_eval/sinst_11__valid.jsonl"))
    assert len(sinst) == 1694 and all(isinstance(r["teacher"], str) for r in sinst)
    assert len(import_file(str(d / "minillm_eval/vicuna_valid.jsonl"))) == 80
    selfinst = import_file(str(d / "self_instruct/user_oriented_instructions.jsonl"))
    assert len(selfinst) == 252 and selfinst[0]["id"] == "user_oriented_task_0"
    assert selfinst[0]["messages"][0]["content"] == raw[[r["dataset"] for r in raw].index("selfinstruct")]["instruction"]

    mt = import_file(str(d / "fastchat/mt_bench__question.jsonl"))
    assert len(mt) == 80 and not any("teacher" in r for r in mt) and mt[0]["id"] == "81"
    mt_ref = import_file(str(d / "fastchat/mt_bench__question.jsonl"), answers=str(d / "fastchat/mt_bench__reference_answer__gpt-4.jsonl"))
    two = [r for r in mt_ref if r["id"] == "101-turn2"][0]
    assert len(mt_ref) == 80 + 30 and [m["role"] for m in two["messages"]] == ["user", "assistant", "user"]
    vicuna = import_file(str(d / "fastchat/vicuna80_original/question.jsonl"),
                            answers=str(d / "fastchat/vicuna80_original/answer_gpt35.jsonl"))
    assert len(vicuna) == 80 and all(r.get("teacher") for r in vicuna)
    assert len(import_file(str(d / "fastchat/vicuna_bench__question.jsonl"))) == 80

    out = tmp_path / "alpaca.jsonl"
    code, report, _ = run_main(capsys, ["--import-only", "--prompts", str(d / "alpaca_eval/gpt-4o-2024-05-13__model_outputs.json"),
                                        "--out", str(out), "--test-size", "100"])
    assert code == 0 and "805 done" in report
    assert len(lines(tmp_path / "alpaca.test.jsonl")) == 100 and len(lines(tmp_path / "alpaca.train.jsonl")) == 705


# -----------------------------------------------------------------------------
# --backend local

def fake_model_modules(calls):
    """Stand-ins for generate.py and loading.py with their API: the 'model' answers each prompt's
    characters reversed; and for data.render_prompt, a prompt's characters as its ids."""
    gen, loading = types.ModuleType("generate"), types.ModuleType("loading")

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            assert skip_special_tokens and 0 not in ids
            return "".join(map(chr, ids))

    def generate(model, prompts, n=1, max_new_tokens=16, temperature=1.0, top_p=1.0, stop_ids=None, seed=None):
        calls.append((len(prompts), max_new_tokens, temperature))
        outs = []
        for p in prompts:
            toks = list(reversed(p))
            stopped = len(toks) < max_new_tokens
            outs.append(types.SimpleNamespace(tokens=toks + [0] if stopped else toks[:max_new_tokens], stopped=stopped, logprobs=None))
        return outs
    gen.generate = generate
    loading.load_model = lambda path, dtype=None, device=None: "weights of " + path
    loading.load_tokenizer = lambda path: Tok()
    loading.stop_token_ids = lambda tok, checkpoint=None: [0]
    return gen, loading, lambda tok, messages: [ord(c) for m in messages for c in m["content"]]


def test_local_backend_batches_and_resumes(tmp_path, monkeypatch):
    calls = []
    gen, loading, render = fake_model_modules(calls)
    monkeypatch.setitem(sys.modules, "generate", gen)
    monkeypatch.setitem(sys.modules, "loading", loading)
    monkeypatch.setattr(data, "render_prompt", render)
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"id": str(i), "prompt": "ab" * (i + 1)}) + "\n" for i in range(10)))
    out = tmp_path / "o.jsonl"
    args = ["--backend", "local", "--model", "ckpt", "--prompts", str(p), "--out", str(out), "--batch-size", "4",
            "--max-tokens", "16", "--temperature", "0.8"]
    assert pt.main(args) == 0
    assert calls == [(4, 16, 0.8), (4, 16, 0.8), (2, 16, 0.8)]
    rows = unique_by(lines(out), "id")
    assert len(rows) == 7 and len(lines(tmp_path / "o.rejects.jsonl")) == 3  # "ab" * 8 and longer hit the limit
    assert rows["2"]["teacher"] == "bababa" and rows["2"]["finish_reason"] == "stop" and rows["2"]["model"] == "ckpt"
    assert rows["2"]["usage"] == {"prompt_tokens": 6, "completion_tokens": 7}
    assert pt.main(args) == 0
    assert len(calls) == 3
    assert pt.main(args + ["--keep-truncated"]) == 0
    assert len(calls) == 3 and len(lines(out)) == 10


def test_local_backend_with_model_py(tmp_path, toy_world, capsys):
    """The real model.py and loading.py on conftest's tiny random Llama with a word-level chat template."""
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"id": str(i), "prompt": q}) + "\n" for i, q in enumerate(["red cat", "blue dog", "sun"])))
    out = tmp_path / "o.jsonl"
    # greedy: sampled, a random model may stop at once for a prompt (an "empty" reject), as the seed, drawn
    # from the request key, changes with the checkpoint's tmp path; sampling is checked below
    args = ["--backend", "local", "--model", toy_world["student"], "--prompts", str(p), "--out", str(out), "--max-tokens", "6",
            "--batch-size", "2", "--system", "rain snow", "--keep-truncated", "--temperature", "0"]
    assert pt.main(args) == 0
    rows = unique_by(lines(out), "id")
    assert set(rows) == {"0", "1", "2"} and all(r["finish_reason"] in ("stop", "length") for r in rows.values())
    assert all(r["usage"]["completion_tokens"] <= 6 and r["system"] == "rain snow" for r in rows.values())
    assert pt.main(args) == 0
    assert len(lines(out)) == 3
    # sampled answers depend on the request, not on the batch it went in: batch sizes 1 and 3 agree
    texts = []
    for bs in ("1", "3"):
        o = tmp_path / f"s{bs}.jsonl"
        assert pt.main(args[:6] + ["--out", str(o), "--max-tokens", "6", "--batch-size", bs, "--temperature", "1.0",
                                   "--keep-truncated"]) == 0
        answered = lines(o) + lines(tmp_path / f"s{bs}.rejects.jsonl")  # a random model may stop at once: "empty"
        texts.append({k: r["teacher"] for k, r in unique_by(answered, "id").items()})
    assert texts[0] == texts[1] and len(set(texts[0].values())) == 3, texts
    # a checkpoint that cannot be loaded: one line, before any output is written
    code, _, err = run_main(capsys, ["--backend", "local", "--model", str(tmp_path / "nope"), "--prompts", str(p),
                                     "--out", str(tmp_path / "n.jsonl")])
    assert code == 1 and one_error_line(err, "--model: cannot load")
