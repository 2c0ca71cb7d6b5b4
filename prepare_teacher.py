"""
Collect a black-box teacher's answers for a prompt set: robust, resumable, within budget.

    # any OpenAI-compatible endpoint; the key is read from $OPENAI_API_KEY (or --api-key-env NAME)
    python prepare_teacher.py --prompts prompts.jsonl --out data/teacher.jsonl --model gpt-4o-mini \
        --temperature 0.8 --max-tokens 1536 --concurrency 16 --price-in 0.15 --price-out 0.6 --max-cost 20
    # the Batch API (about half the price): the first run submits, a rerun collects (or add --wait)
    python prepare_teacher.py ... --batch-api
    # a local checkpoint through model.py; released teacher data with no API call at all
    python prepare_teacher.py --backend local --model out/ckpt --prompts prompts.jsonl --out data/local.jsonl
    python prepare_teacher.py --import-only --prompts train.parquet --out data/lmsys.jsonl --test-size 500

Inputs: JSONL with `messages` or a `prompt` string, the paper's parquet (content, teacher_response),
AlpacaEval model_outputs.json, Arena-Hard question.jsonl (+ --answers model_answer/M.jsonl), MiniLLM
JSONL (instruction, input, output), FastChat question.jsonl (+ --answers).

Rows {"id", "messages", "teacher", "model", "finish_reason", "usage", "key", ...} are appended to --out
as answers arrive. Filtered answers (empty, truncated, refusals) go to <out>.rejects.jsonl and failed
requests to <out>.failed.jsonl, each with a reason. A rerun skips done and filtered prompts and retries
the failed ones; --max-cost is a budget for the output file over all its runs.
"""

import argparse
import hashlib
import json
import os
import random
import re
import sys
import threading
import time
from collections import Counter

try:
    import fcntl
except ImportError:  # no advisory locks on Windows: run one writer at a time yourself
    fcntl = None

import openai
from tqdm import tqdm

PROG = "prepare_teacher.py"
BACKOFF_BASE = 1.0       # seconds before the first retry, doubled each time (tests shrink it)
BACKOFF_MAX = 60.0
RETRY_AFTER_MAX = 300.0  # a server asking for longer than this gets this
REFUSAL = (r"^\s*(I'?m sorry|I am sorry|I apologi[sz]e|As an AI\b|I (?:can(?:'|no)?t|cannot|won'?t|am unable to)"
           r" (?:help|assist|comply|provide|fulfill|do that))")
BATCH_PRICE = 0.5        # the Batch API's price, relative to live requests
BATCH_ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


def die(msg):
    raise SystemExit(f"{PROG}: {msg}")


# -----------------------------------------------------------------------------
# one request, retried until it gives a usable answer

class FatalAPIError(Exception):
    """An error no retry can fix (bad key, no access, unknown model): the run stops."""


class RetryError(Exception):
    """One request failed for good; .reason is short: "http_500", "timeout", "empty", ..."""
    def __init__(self, reason, attempts=1, usage=None):
        super().__init__(f"request failed after {attempts} attempts: {reason}")
        self.reason, self.attempts = reason, attempts
        self.usage = usage or {"prompt_tokens": 0, "completion_tokens": 0}


class Unusable(ValueError):
    """An answer that arrived but cannot be used (empty, or rejected by validate): retried."""


def make_client(base_url=None, api_key_env="OPENAI_API_KEY", timeout=60.0):
    key = os.environ.get(api_key_env)
    if not key:
        raise FatalAPIError(f"environment variable {api_key_env} is not set (for a server without keys, any value works)")
    # the SDK's own retries are off: ours also retry malformed answers, and count
    return openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)


def one_line(text, secret=None):
    """A message fit for a terminal and a log: one line, short, and no API key in it."""
    text = " ".join(str(text).split())
    if secret:
        text = text.replace(secret, "***")
    # servers echo keys back, sometimes half masked: keep only a recognisable prefix
    return re.sub(r"\b(sk-[A-Za-z0-9]{0,4})[A-Za-z0-9*_\-]{4,}", r"\1***", text)[:300]


def classify(err, secret=None):
    """(reason, seconds the server asked us to wait) for a retryable error; raises the others."""
    if isinstance(err, Unusable):
        return str(err), None
    if isinstance(err, openai.APITimeoutError):
        return "timeout", None
    if isinstance(err, openai.APIConnectionError):
        return "connection", None
    if isinstance(err, openai.APIStatusError):
        status, info = err.status_code, err.body if isinstance(err.body, dict) else {}
        info = info.get("error", info) if isinstance(info.get("error", info), dict) else {}
        code, message = str(info.get("code") or info.get("type") or ""), info.get("message") or err.message
        if (status == 429 and code != "insufficient_quota") or status in (408, 409) or status >= 500:
            wait = err.response.headers.get("retry-after")
            ms = err.response.headers.get("retry-after-ms")
            try:
                return f"http_{status}", float(ms) / 1000 if ms else float(wait) if wait else None
            except ValueError:  # an HTTP date: our own backoff will do
                return f"http_{status}", None
        # a prompt that is too long or against a policy: record it as failed, the run goes on
        if status in (400, 413, 422) and re.search(r"context.length|too.long|too.large", f"{code} {message}", re.I):
            raise RetryError("too_long")
        if status in (400, 422) and re.search(r"content.policy|content.filter|invalid.prompt", f"{code} {message}", re.I):
            raise RetryError("content_policy")
        raise FatalAPIError(one_line(f"HTTP {status} ({code or 'error'}): {message}", secret))
    if isinstance(err, (openai.APIResponseValidationError, ValueError)):
        return "malformed", None
    raise err


def parse_completion(resp):
    """(text, finish_reason, usage) of a chat completion: an SDK object or the Batch API's JSON."""
    try:
        resp = resp.model_dump() if hasattr(resp, "model_dump") else resp
        choice = resp["choices"][0]
        text, usage = choice["message"]["content"] or "", resp.get("usage") or {}
        if not isinstance(text, str):
            raise TypeError("content is not a string")
        usage = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"malformed completion ({type(e).__name__})") from None
    return text, choice.get("finish_reason"), usage


def with_retry(call, retries=6, secret=None, backoff=None):
    """call(attempt) until it returns, retrying transient errors with exponential backoff and jitter,
    and waiting at least what Retry-After asks. Raises RetryError when retries run out."""
    base = BACKOFF_BASE if backoff is None else backoff
    for attempt in range(1, retries + 2):
        try:
            return call(attempt)
        except (openai.OpenAIError, ValueError) as err:
            reason, wait = classify(err, secret)
        if attempt <= retries:
            delay = min(BACKOFF_MAX, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)  # jitter spreads the herd
            time.sleep(max(delay, min(wait or 0.0, RETRY_AFTER_MAX)))
    raise RetryError(reason, attempt)


def chat_with_retry(client, model, messages, *, temperature=None, max_tokens=None, retries=6,
                    validate=None, extra=None, backoff=None):
    """One chat completion with a usable answer: {"text", "finish_reason", "usage", "attempts"}, usage
    summed over every attempt that was billed. Empty or malformed answers, and those validate(text)
    rejects (False or ValueError), are retried like 429, 5xx, timeouts and dropped connections.
    Raises RetryError when retries run out or the prompt itself is refused, FatalAPIError when no retry
    can help."""
    kwargs = {"model": model, "messages": messages, "extra_body": extra or None}
    if temperature is not None:
        kwargs["temperature"] = temperature
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    usage = Counter(prompt_tokens=0, completion_tokens=0)

    def once(attempt):
        text, finish, used = parse_completion(client.chat.completions.create(**kwargs))
        usage.update(used)
        if not text.strip():
            raise Unusable("empty")
        try:
            ok = validate is None or validate(text)
        except ValueError:
            ok = False
        if not ok:
            raise Unusable("invalid")
        return {"text": text, "finish_reason": finish, "usage": dict(usage), "attempts": attempt}
    try:
        return with_retry(once, retries, client.api_key, backoff)
    except RetryError as e:
        e.usage = dict(usage)
        raise


def run_pool(items, fn, concurrency=8, desc=None, stop=None, status=None, unit="req"):
    """fn(item) for every item on `concurrency` threads, with a progress bar (rate, ETA). No new item
    starts once stop() is true. An exception from fn (FatalAPIError, ...) stops the pool at once and is
    raised here; requests in flight are abandoned, which a resumable caller can afford.
    Returns fn's results in the order of items (None for those never run)."""
    items = list(items)
    results, state, lock = [None] * len(items), {"next": 0, "error": None}, threading.Lock()
    bar = tqdm(total=len(items), desc=desc, unit=unit, dynamic_ncols=True)

    def worker():
        while True:
            with lock:
                if state["error"] is not None or state["next"] >= len(items) or (stop is not None and stop()):
                    return
                i, state["next"] = state["next"], state["next"] + 1
            try:
                results[i] = fn(items[i])
            except BaseException as e:
                with lock:
                    state["error"] = state["error"] or e
                return
            with lock:
                bar.update(1)
                if status is not None:
                    bar.set_postfix_str(status(), refresh=False)

    # daemon threads: a fatal error or Ctrl-C must not wait for slow requests to time out
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(concurrency, len(items))))]
    for t in threads:
        t.start()
    try:
        while state["error"] is None and any(t.is_alive() for t in threads):
            time.sleep(0.02)
    finally:
        bar.close()
    if state["error"] is not None:
        raise state["error"]
    return results


# -----------------------------------------------------------------------------
# the output: append-only JSONL that survives kill -9

class JsonlStore:
    """Append-only JSONL of records keyed by record[key]. Opening repairs a torn last line (what a kill
    -9 mid-write leaves) and locks the file against a second writer. .records maps key -> record (the
    last wins where a key repeats, which only append(unique=False) allows)."""

    def __init__(self, path, key="key"):
        self.path, self.key, self.lock, self.records = path, key, threading.Lock(), {}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.f = open(path, "a+b")
        if fcntl is not None:
            try:
                fcntl.flock(self.f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.fail(f"{path}: in use by another running process")
        self.f.seek(0)
        data = self.f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            os.ftruncate(self.f.fileno(), cut)
            print(f"{PROG}: {path}: repaired a torn last line ({len(data) - cut} bytes dropped)", file=sys.stderr)
            data = data[:cut]
        # split on b"\n" only: JSON strings may hold U+2028 and kin, where str.splitlines() also breaks
        for i, line in enumerate(data.split(b"\n")[:-1], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                self.fail(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', e)})")
            if not isinstance(rec, dict) or key not in rec:
                self.fail(f"{path}:{i}: a JSON object with a {key!r} field is expected")
            self.records[rec[key]] = rec

    def fail(self, msg):
        self.f.close()
        die(msg)

    def append(self, record, unique=True):
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self.lock:
            if unique and record[self.key] in self.records:
                return False
            self.f.write(line)
            self.f.flush()
            os.fsync(self.f.fileno())
            self.records[record[self.key]] = record
            return True

    def __contains__(self, key):
        return key in self.records

    def __len__(self):
        return len(self.records)

    def close(self):
        with self.lock:
            self.f.close()


def request_key(model, messages, params):
    """A stable id for a request: same model, messages and sampling params, same key."""
    params = {k: v for k, v in params.items() if v is not None}
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def sidecar(out, name, ext=None):
    root, out_ext = os.path.splitext(out)
    return f"{root}.{name}{ext or out_ext or '.jsonl'}"


# -----------------------------------------------------------------------------
# reading prompts and released teacher data

def check_messages(msgs, where):
    if not isinstance(msgs, list) or not msgs:
        die(f"{where}: 'messages' must be a non-empty list")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            die(f"{where}: each message needs a role (system, user or assistant) and a string content")
    if msgs[-1]["role"] != "user":
        die(f"{where}: the last message must be the user's")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def iter_records(path):
    """(where, index, record) for every record of a .jsonl, .json (an array) or .parquet file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            die(f"{path}: reading parquet needs pyarrow (pip install pyarrow)")
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        records = (rec for batch in batches for rec in batch.to_pylist())
        yield from ((f"{path}: row {i + 1}", i, rec) for i, rec in enumerate(records))
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            try:
                data = json.load(f)
            except ValueError as e:
                die(f"{path}:{getattr(e, 'lineno', '?')}: not valid JSON ({getattr(e, 'msg', e)})")
            if not isinstance(data, list):
                die(f"{path}: a JSON array of records is expected")
            yield from ((f"{path}: record {i + 1}", i, rec) for i, rec in enumerate(data))
            return
        i = 0
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    die(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', e)})")
                yield f"{path}:{lineno}", i, rec
                i += 1


def detect_format(rec, path):
    if path.endswith(".parquet") or "teacher_response" in rec:
        return "paper"
    if "turns" in rec or ("question_id" in rec and "text" in rec):
        return "fastchat"
    if "uid" in rec:
        return "arena_hard"
    if "instruction" in rec:
        return "alpaca_eval" if "generator" in rec else "minillm"
    if "messages" in rec or "prompt" in rec:
        return "ours"
    die(f"{path}: cannot tell the format from the first record's keys ({', '.join(sorted(rec))}); pass --format")


def load_answers(path):
    """question id -> answer (a string, or a list of turns) from an Arena-Hard or FastChat answer file."""
    answers = {}
    for where, _, rec in iter_records(path):
        try:
            qid = str(rec["uid"] if "uid" in rec else rec["question_id"])
            if "choices" in rec:     # FastChat llm_judge: choices[0].turns
                answers[qid] = rec["choices"][0]["turns"]
            elif "messages" in rec:  # Arena-Hard: the assistant's content is {"answer": ...}
                content = rec["messages"][-1]["content"]
                answers[qid] = content["answer"] if isinstance(content, dict) else content
            else:                    # FastChat's original answer table
                answers[qid] = rec["text"]
        except (KeyError, IndexError, TypeError) as e:
            die(f"{where}: not an answer record (no {e})")
    return answers


def user(text):
    return [{"role": "user", "content": text}]


def row_ours(rec, i, answers):
    row = {**rec, "id": str(rec.get("id", i))}
    if "messages" not in row:
        if not isinstance(row.get("prompt"), str):
            raise KeyError("'messages' nor a 'prompt' string")
        row["messages"] = user(row.pop("prompt"))
    return [row]


def row_paper(rec, i, answers):
    content = rec["content"]
    row = {k: v for k, v in rec.items() if k not in ("content", "teacher_response")}
    return [{**row, "id": str(rec.get("id", i)), "messages": user(content) if isinstance(content, str) else content,
             "teacher": rec.get("teacher_response")}]


def row_alpaca_eval(rec, i, answers):
    return [{"id": str(i), "messages": user(rec["instruction"]), "teacher": rec.get("output"),
             "model": rec.get("generator"), "dataset": rec.get("dataset")}]


def row_minillm(rec, i, answers):
    inp, out = rec.get("input") or "", rec.get("output")
    if rec.get("instances"):   # Self-Instruct's own file: one instance each
        inp, out = rec["instances"][0].get("input") or "", rec["instances"][0].get("output")
    if isinstance(out, list):  # S-NI keeps several references: the first one
        out = out[0] if out else None
    row = {k: v for k, v in rec.items() if k not in ("instruction", "input", "output", "prompt", "instances")}
    text = f"{rec['instruction']}\n\n{inp}" if inp else rec["instruction"]  # AlpacaEval joins them so too
    return [{**row, "id": str(rec.get("id", i)), "messages": user(text), "teacher": out}]


def row_arena_hard(rec, i, answers):
    uid = str(rec["uid"])
    if "messages" in rec:      # a model_answer file on its own
        ans = rec["messages"][-1]["content"]
        return [{"id": uid, "messages": user(rec["messages"][0]["content"]), "model": rec.get("model"),
                 "teacher": ans["answer"] if isinstance(ans, dict) else ans}]
    return [{"id": uid, "messages": user(rec["prompt"]), "category": rec.get("category"), "teacher": answers.get(uid)}]


def row_fastchat(rec, i, answers):
    qid, turns = str(rec["question_id"]), rec["turns"] if "turns" in rec else [rec["text"]]
    ans = answers.get(qid)
    if not ans:                # later turns need the earlier answers: a prompt set asks the first one
        return [{"id": qid, "messages": user(turns[0]), "category": rec.get("category")}]
    rows, msgs = [], []
    for t, (q, a) in enumerate(zip(turns, [ans] if isinstance(ans, str) else ans), 1):
        msgs = msgs + user(q)  # one row per turn, each with the conversation so far
        rows.append({"id": qid if t == 1 else f"{qid}-turn{t}", "messages": msgs, "teacher": a, "category": rec.get("category")})
        msgs = msgs + [{"role": "assistant", "content": a}]
    return rows


CONVERTERS = {"ours": row_ours, "paper": row_paper, "alpaca_eval": row_alpaca_eval, "minillm": row_minillm,
              "arena_hard": row_arena_hard, "fastchat": row_fastchat}


def import_file(path, fmt="auto", answers=None):
    """Rows {"id", "messages", "teacher", ...} from any supported file (no "teacher" for prompts only)."""
    if not os.path.isfile(path):
        die(f"{path}: no such file")
    answer_map = load_answers(answers) if answers else {}
    rows, seen = [], {}
    for where, i, rec in iter_records(path):
        if not isinstance(rec, dict):
            die(f"{where}: a JSON object is expected")
        fmt = detect_format(rec, path) if fmt == "auto" else fmt
        try:
            new = CONVERTERS[fmt](rec, i, answer_map)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            die(f"{where}: not a {fmt} record (no {e})")
        for row in new:
            row = {k: v for k, v in row.items() if v is not None}
            row["messages"] = check_messages(row["messages"], where)
            if not isinstance(row.get("teacher", ""), str):
                die(f"{where}: the teacher's answer must be a string")
            if fmt != "ours":
                row.setdefault("source", fmt)
            if row["id"] in seen:
                die(f"{where}: duplicate id {row['id']!r} (first at {seen[row['id']]})")
            seen[row["id"]] = where
            rows.append(row)
    return rows


def read_rows(path):
    """Rows of our JSONL format ({"id", "messages", "teacher"?, ...}); a bad line dies naming file:line."""
    return import_file(path, fmt="ours")


# -----------------------------------------------------------------------------
# bookkeeping: where answers go, what they cost, what the filters say

def token_counter(model):
    """(count(text), how): the model's tiktoken encoding, or about 4 characters per token offline."""
    box = {}

    def load():
        try:
            import tiktoken
            try:
                box["enc"] = tiktoken.encoding_for_model(model)
            except KeyError:  # a name tiktoken does not know: assume the newest encoding
                box["enc"] = tiktoken.get_encoding("o200k_base")
        except Exception as e:  # tiktoken downloads encodings on first use, which fails offline
            box["err"] = e
    t = threading.Thread(target=load, daemon=True)  # and that download has no timeout of its own
    t.start()
    t.join(20)
    if "enc" in box:
        return (lambda s: len(box["enc"].encode(s, disallowed_special=()))), f"tiktoken {box['enc'].name}"
    why = type(box["err"]).__name__ if "err" in box else "timed out"
    print(f"note: no tiktoken encoding for {model!r} ({why}, offline?); estimating 4 characters per token")
    return (lambda s: (len(s) + 3) // 4), "about 4 characters per token"


class Collector:
    """Answers land here: accepted rows in the output, filtered ones in <out>.rejects.jsonl, failures
    in <out>.failed.jsonl. A prompt's status is the first of: done, filtered, failed, pending."""

    def __init__(self, args):
        self.args, self.lock, self.used, self.failed_now = args, threading.Lock(), Counter(), 0
        self.out, self.rejects, self.failed = (JsonlStore(args.out), JsonlStore(sidecar(args.out, "rejects")),
                                               JsonlStore(sidecar(args.out, "failed")))
        self.refusal = re.compile(args.refusal_filter) if args.refusal_filter else None
        for store in (self.out, self.rejects, self.failed):
            for rec in store.records.values():
                self.charge(rec.get("usage"), rec.get("batch", False))
        self.spent_before = self.spent

    def price(self, tokens_in, tokens_out, batch=False):
        a = self.args
        return ((a.price_in or 0) * tokens_in + (a.price_out or 0) * tokens_out) / 1e6 * (BATCH_PRICE if batch else 1)

    def charge(self, usage, batch=False):
        tin, tout = (usage or {}).get("prompt_tokens", 0), (usage or {}).get("completion_tokens", 0)
        with self.lock:
            self.used.update({"in": tin, "out": tout, "micro$": round(self.price(tin, tout, batch) * 1e6)})

    @property
    def spent(self):
        return self.used["micro$"] / 1e6

    def over_budget(self):
        return self.args.max_cost is not None and self.spent >= self.args.max_cost

    def filter_reason(self, row):
        if not row["teacher"].strip():
            return "empty"
        if row.get("finish_reason") == "length" and not self.args.keep_truncated:
            return "truncated"
        if row.get("finish_reason") == "content_filter":
            return "content_filter"
        if self.refusal is not None and self.refusal.search(row["teacher"]):
            return "refusal"
        return None

    def finish(self, job, text, finish_reason, usage, model=None, batch=False):
        row = {k: v for k, v in job["row"].items() if k not in ("teacher", "usage", "finish_reason")}
        extras = {"finish_reason": finish_reason, "usage": usage, "system": job.get("system"), "batch": batch or None}
        row.update(teacher=text, model=model or self.args.model, key=job["key"], **{k: v for k, v in extras.items() if v})
        reason = self.filter_reason(row)
        if (self.out.append(row) if reason is None else self.rejects.append({**row, "reason": reason})):
            self.charge(usage, batch)  # an answer stored before (a rerun of an import) was paid before

    def fail(self, job, reason, attempts=1, usage=None):
        self.charge(usage)
        with self.lock:
            self.failed_now += 1
        self.failed.append({"key": job["key"], "id": job["row"]["id"], "reason": reason, "attempts": attempts,
                            "usage": usage, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, unique=False)

    def refilter(self):
        """Filtered answers that today's flags accept (say --keep-truncated) move to the output, free."""
        for key, rec in list(self.rejects.records.items()):
            if key not in self.out and self.filter_reason(rec) is None:
                self.out.append({k: v for k, v in rec.items() if k != "reason"})

    def status(self, key):
        for name, store in (("done", self.out), ("filtered", self.rejects), ("failed", self.failed)):
            if key in store:
                return name, store.records[key].get("reason")
        return "pending", None

    def summary(self, jobs):
        status, why = Counter(), {"failed": Counter(), "filtered": Counter()}
        for job in jobs:
            s, reason = self.status(job["key"])
            status[s] += 1
            if reason:
                why[s][reason] += 1
        detail = {s: f" ({', '.join(f'{r} {n}' for r, n in c.most_common())})" if c else "" for s, c in why.items()}
        print(f"summary: {len(jobs)} prompts: {status['done']} done, {status['failed']} failed{detail['failed']}, "
              f"{status['filtered']} filtered{detail['filtered']}, {status['pending']} pending")
        no_prices = " (no --price-in/--price-out)" if self.args.price_in is None and self.args.price_out is None else ""
        print(f"tokens: {self.used['in']:,} in, {self.used['out']:,} out; cost ${self.spent:.4f} in all, "
              f"${self.spent - self.spent_before:.4f} this run{no_prices}")
        if status["failed"]:
            print("rerun the same command to retry the failed prompts")

    def close(self):
        for store in (self.out, self.rejects, self.failed):
            store.close()


# -----------------------------------------------------------------------------
# three ways to get answers: the live API, the Batch API, a local model

def live(args, col, todo):
    client = make_client(args.base_url, args.api_key_env, args.timeout)

    def work(job):
        try:
            res = chat_with_retry(client, args.model, job["sent"], temperature=args.temperature,
                                  max_tokens=args.max_tokens, retries=args.retries, extra=args.extra_body)
        except RetryError as e:
            return col.fail(job, e.reason, e.attempts, e.usage)
        col.finish(job, res["text"], res["finish_reason"], res["usage"])

    run_pool(todo, work, args.concurrency, desc="teacher", stop=col.over_budget,
             status=lambda: f"failed={col.failed_now} cost=${col.spent:.4f}")


def batch_api(args, col, todo, jobs):
    client = make_client(args.base_url, args.api_key_env, args.timeout)

    def call(fn, **kw):
        return with_retry(lambda attempt: fn(**kw), args.retries, client.api_key)

    path = sidecar(args.out, "batch", ".json")
    while True:
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
        elif (state := submit_batch(args, client, call, col, todo, path)) is None:
            return
        if "batch_id" not in state:
            # killed between upload and create: the batch may exist already, and must not be paid twice
            found = [b for b in call(client.batches.list, limit=100).data if b.input_file_id == state["input_file_id"]]
            state["batch_id"] = (found[0] if found else call(client.batches.create, input_file_id=state["input_file_id"],
                                                             endpoint="/v1/chat/completions", completion_window="24h")).id
            write_json(path, state)
        batch = call(client.batches.retrieve, batch_id=state["batch_id"])
        if batch.status not in BATCH_ACTIVE:
            merge_batch(client, call, col, {j["key"]: j for j in jobs}, batch, state)
            os.remove(path)
            return
        done = batch.request_counts.completed if batch.request_counts else 0
        print(f"batch {batch.id}: {batch.status}, {done}/{len(state['keys'])} done"
              + ("" if args.wait else "; rerun this command to collect the results"))
        if not args.wait:
            return
        time.sleep(args.poll_interval)


def submit_batch(args, client, call, col, todo, path):
    chosen, estimate = [], 0.0
    for job in todo:  # a batch cannot be stopped halfway: it must fit the budget up front
        cost = col.price(job["tokens_in"], args.max_tokens or 0, batch=True)
        if args.max_cost is not None and col.spent + estimate + cost > args.max_cost:
            break
        chosen.append(job)
        estimate += cost
    if not chosen:
        print("nothing to submit" + (f" within --max-cost ${args.max_cost}" if todo else ""))
        return None

    def line(job):  # the very request a live run would send
        body = {"model": args.model, "messages": job["sent"], **args.extra_body}
        body.update({k: v for k, v in (("temperature", args.temperature), ("max_tokens", args.max_tokens)) if v is not None})
        return json.dumps({"custom_id": job["key"], "method": "POST", "url": "/v1/chat/completions", "body": body},
                          ensure_ascii=False) + "\n"
    data = "".join(map(line, chosen)).encode("utf-8")
    with open(sidecar(args.out, "batch_input"), "wb") as f:  # a copy to look at; the upload sends `data`
        f.write(data)
    upload = call(client.files.create, file=("batch_input.jsonl", data), purpose="batch")
    state = {"input_file_id": upload.id, "keys": [j["key"] for j in chosen], "model": args.model}
    write_json(path, state)
    state["batch_id"] = call(client.batches.create, input_file_id=upload.id, endpoint="/v1/chat/completions",
                             completion_window="24h").id
    write_json(path, state)
    print(f"submitted batch {state['batch_id']}: {len(chosen)} requests, estimated cost at most ${estimate:.4f}")
    return state


def merge_batch(client, call, col, jobs_by_key, batch, state):
    """Results land exactly like live answers; a request with no result fails with the batch's status."""
    seen = set()
    for file_id in (batch.output_file_id, batch.error_file_id):
        for n, line in enumerate(call(client.files.content, file_id=file_id).text.split("\n") if file_id else [], 1):
            try:
                rec = json.loads(line) if line.strip() else None
                job = rec and jobs_by_key.get(rec["custom_id"])
            except (ValueError, KeyError, TypeError):
                print(f"note: batch {batch.id}, file {file_id}:{n}: unreadable result line, skipped")
                continue
            if not job or job["key"] in seen:
                continue
            seen.add(job["key"])
            resp = rec.get("response") or {}
            if resp.get("status_code") != 200:
                col.fail(job, f"http_{resp['status_code']}" if resp.get("status_code") else
                         f"batch_{(rec.get('error') or {}).get('code', 'error')}")
                continue
            try:
                text, finish, usage = parse_completion(resp.get("body"))
            except ValueError:
                col.fail(job, "malformed")
                continue
            if text.strip():
                col.finish(job, text, finish, usage, batch=True)
            else:
                col.fail(job, "empty", 1, usage)
    for key in state["keys"]:
        if key not in seen and key in jobs_by_key:
            col.fail(jobs_by_key[key], f"batch_{batch.status}")
    print(f"batch {batch.id}: {batch.status}, merged {len(seen)} results")


def local(args, col, todo):
    import torch
    from model import Transformer, load_tokenizer, render_prompt, stop_token_ids, generate  # only this path needs it
    try:
        model, tok = Transformer.from_pretrained(args.model), load_tokenizer(args.model)
    except Exception as e:
        die(f"--model: cannot load {args.model}: {one_line(e)}")
    stop = stop_token_ids(tok)

    def work(batch):
        prompts = [render_prompt(tok, job["sent"]) for job in batch]
        with torch.no_grad():
            # a seed per request, so an answer does not depend on its batch (or on a resume)
            seeds = [(int(job["key"][:8], 16) + args.seed) % 2**32 for job in batch]
            outs = generate(model, prompts, n=1, max_new_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=1.0, stop_ids=stop, seed=seeds)
        for job, ids, o in zip(batch, prompts, outs):
            tokens = o.tokens[:-1] if o.stopped else o.tokens  # the stop token is not part of the text
            col.finish(job, tok.decode(tokens, skip_special_tokens=True), "stop" if o.stopped else "length",
                       {"prompt_tokens": len(ids), "completion_tokens": len(o.tokens)})

    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    run_pool(batches, work, 1, desc="local", unit="batch")


# -----------------------------------------------------------------------------

def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)  # atomic: a kill leaves the old state or the new one, never half


def write_split(args, col):
    """<out>.train.jsonl and <out>.test.jsonl. Test rows are chosen by a hash of their id, so the split
    depends neither on the order answers arrived in nor on the machine."""
    digest = lambda r: hashlib.sha256(r["id"].encode()).hexdigest()  # noqa: E731
    rows = sorted(col.out.records.values(), key=digest)
    n_test = (sum(int(digest(r)[:8], 16) < args.test_size * 2 ** 32 for r in rows) if args.test_size < 1
              else min(int(args.test_size), len(rows)))
    for name, part in (("test", rows[:n_test]), ("train", rows[n_test:])):
        with open(sidecar(args.out, name) + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in part)
        os.replace(sidecar(args.out, name) + ".tmp", sidecar(args.out, name))
    print(f"split: {len(rows) - n_test} rows in {sidecar(args.out, 'train')}, {n_test} in {sidecar(args.out, 'test')}")


def make_jobs(args, rows):
    """One request per distinct prompt, keyed by everything that changes the answer."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    params = {"temperature": args.temperature, "max_tokens": args.max_tokens, **args.extra_body}
    if args.backend == "local":
        params["backend"] = "local"
    count, args.tokens_how = token_counter(args.model) if args.backend == "api" else (len, "characters")
    jobs = {}
    for row in rows:
        sent = system + row["messages"]
        key = request_key(args.model, sent, params)
        if key not in jobs:  # asking the same thing twice would only pay twice for one answer
            jobs[key] = {"key": key, "row": row, "sent": sent, "system": args.system,
                         "tokens_in": sum(count(m["content"]) + 4 for m in sent) + 3}
    if len(jobs) < len(rows):
        print(f"note: {len(rows) - len(jobs)} prompts repeat an earlier one and are asked once")
    return list(jobs.values())


def estimate(args, col, todo):
    tin, tout = sum(j["tokens_in"] for j in todo), (args.max_tokens or 0) * len(todo)
    msg = f"estimate: {len(todo)} requests, {tin:,} input tokens ({args.tokens_how})"
    msg += f", at most {tout:,} output tokens" if args.max_tokens else " (output unknown without --max-tokens)"
    if args.price_in is not None or args.price_out is not None:
        msg += f"; cost at most ${col.price(tin, tout, args.batch_api):.4f}"
    if args.max_cost is not None:
        msg += f"; --max-cost ${args.max_cost}, ${col.spent:.4f} spent so far"
    print(msg)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Collect a teacher's answers, robustly and resumably.")
    p.add_argument("--prompts", required=True, help="input file: .jsonl, .json or .parquet")
    p.add_argument("--format", default="auto", choices=["auto", *CONVERTERS], help="input format (auto: from the first record)")
    p.add_argument("--answers", help="answers to --prompts: an Arena-Hard model_answer or a FastChat answer file")
    p.add_argument("--out", required=True, help="output JSONL; <out>.rejects/.failed/.batch files sit next to it")
    p.add_argument("--import-only", action="store_true", help="convert the answers already in --prompts, no API call")
    p.add_argument("--backend", default="api", choices=["api", "local"])
    p.add_argument("--model", help="the teacher's model name (a checkpoint path with --backend local)")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint (default: the SDK's, or $OPENAI_BASE_URL)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable that holds the API key")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--system", help="system prompt sent before each conversation (stored as 'system', not in messages)")
    p.add_argument("--extra", help="JSON object of extra request fields, e.g. '{\"max_completion_tokens\": 1536}'")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=6, help="retries per request after the first attempt")
    p.add_argument("--backoff", type=float, default=BACKOFF_BASE, help="seconds before the first retry (then doubled)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call with --backend local")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--batch-api", action="store_true", help="use the OpenAI Batch API (rerun to collect)")
    p.add_argument("--wait", action="store_true", help="with --batch-api: poll until the batch ends")
    p.add_argument("--poll-interval", type=float, default=60.0, help="seconds between polls with --wait")
    p.add_argument("--price-in", type=float, help="$ per million input tokens")
    p.add_argument("--price-out", type=float, help="$ per million output tokens")
    p.add_argument("--max-cost", type=float, help="stop at this many $ spent on --out, all runs together")
    p.add_argument("--keep-truncated", action="store_true", help="keep answers cut at --max-tokens")
    p.add_argument("--refusal-filter", nargs="?", const=REFUSAL, metavar="REGEX", help="filter refusals (a default regex)")
    p.add_argument("--test-size", type=float, help="also write <out>.train/.test.jsonl: a fraction, or a number of rows")
    p.add_argument("--dry-run", action="store_true", help="print the estimate and stop")
    args = p.parse_args(argv)
    if not args.import_only and not args.model:
        die("--model: required (the teacher's model name, or a checkpoint path with --backend local)")
    if args.max_cost is not None and (args.price_in is None or args.price_out is None):
        die("--max-cost: needs --price-in and --price-out")
    for flag, value, low in (("--concurrency", args.concurrency, 1), ("--batch-size", args.batch_size, 1),
                             ("--retries", args.retries, 0)):
        if value < low:
            die(f"{flag}: must be at least {low}")
    if args.test_size is not None and (args.test_size <= 0 or (args.test_size >= 1 and args.test_size % 1)):
        die("--test-size: a fraction in (0, 1) or a whole number of rows")
    if args.batch_api and args.backend == "local":
        die("--batch-api: only with --backend api")
    try:
        args.extra_body = json.loads(args.extra) if args.extra else {}
    except ValueError as e:
        die(f"--extra: not valid JSON ({e})")
    if not isinstance(args.extra_body, dict):
        die("--extra: a JSON object is expected")
    try:
        re.compile(args.refusal_filter or "")
    except re.error as e:
        die(f"--refusal-filter: not a valid regex ({e})")
    if args.backend == "local":  # model.py needs concrete values, and the key records them
        args.max_tokens, args.temperature = args.max_tokens or 1536, 1.0 if args.temperature is None else args.temperature
    return args


def main(argv=None):
    global BACKOFF_BASE
    args = parse_args(argv)
    BACKOFF_BASE = args.backoff
    rows = import_file(args.prompts, args.format, args.answers)
    col = Collector(args)
    try:
        if args.import_only:
            answered = [r for r in rows if "teacher" in r]
            if not answered:
                die(f"{args.prompts}: holds no teacher answers (give --answers FILE, or drop --import-only)")
            if len(answered) < len(rows):
                print(f"note: {len(rows) - len(answered)} rows have no teacher answer and are left out")
            # the id is in the key: released data may answer the same prompt twice, and both rows count
            jobs = [{"key": request_key(r.get("model", "import"), r["messages"], {"id": r["id"]}), "row": r} for r in answered]
            for job in jobs:
                r = job["row"]
                col.finish(job, r["teacher"], r.get("finish_reason"), r.get("usage"), model=r.get("model") or args.model or "unknown")
        else:
            jobs = make_jobs(args, rows)
            col.refilter()
            todo = [j for j in jobs if j["key"] not in col.out and j["key"] not in col.rejects]
            print(f"{len(jobs)} prompts: {len(jobs) - len(todo)} already answered, {len(todo)} to request")
            if args.backend == "api" and todo:
                estimate(args, col, todo)
            if args.dry_run:
                return
            if col.over_budget():
                print(f"budget reached: ${col.spent:.4f} spent of --max-cost ${args.max_cost}; raise it to go on")
            elif args.backend == "local":
                local(args, col, todo)
            elif args.batch_api:
                batch_api(args, col, todo, jobs)
            elif todo:
                live(args, col, todo)
            if col.over_budget() and any(col.status(j["key"])[0] in ("pending", "failed") for j in jobs):
                print(f"stopped at the budget: ${col.spent:.4f} spent of --max-cost ${args.max_cost}")
        col.summary(jobs)
        if args.test_size:
            write_split(args, col)
    except (FatalAPIError, RetryError) as e:
        die(f"stopped: {one_line(e)}")
    except KeyboardInterrupt:
        die("interrupted; rerun the same command to resume")
    finally:
        col.close()


if __name__ == "__main__":
    main()
