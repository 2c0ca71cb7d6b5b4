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
JSONL (instruction, input, output), FastChat question.jsonl (+ --answers). Input files are only read.

Rows {"id", "messages", "teacher", "model", "finish_reason", "usage", "key", ...} are appended to --out
as answers arrive. Filtered answers (empty, truncated, refusals) go to <out>.rejects.jsonl and failed
requests to <out>.failed.jsonl, each with a reason. A rerun skips done and filtered prompts and retries
the failed ones; --max-cost is a budget for the output file over all its runs.

Exit status: 0 when the run did its work; 1 after a one-line error (nothing written is lost) or when
fewer than --min-success of this run's requests got an answer (the last line says so); 2 for bad flags
(argparse); 130 on Ctrl-C.
"""

import argparse
import contextlib
import hashlib
import json
import mmap
import os
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

try:
    import fcntl
except ImportError:  # no advisory locks on Windows: run one writer at a time yourself
    fcntl = None

import openai
from tqdm import tqdm

from data import DataError, check_row, read_jsonl, torn
from flags import FRACTION, NONNEG, NONNEG_INT, POS, POS_INT, key_env, key_env_problem

PROG = "prepare_teacher.py"
REFUSAL = (r"^\s*(I'?m sorry|I am sorry|I apologi[sz]e|As an AI\b|I (?:can(?:'|no)?t|cannot|won'?t|am unable to)"
           r" (?:help|assist|comply|provide|fulfill|do that))")
BATCH_PRICE = 0.5        # the Batch API's price, relative to live requests
BATCH_ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


# -----------------------------------------------------------------------------
# one request: the SDK retries the transport, we retry the answers it cannot judge

class FatalAPIError(Exception):
    """An error no retry can fix (bad key, no access, unknown model): the run stops."""


class RetryError(Exception):
    """One request failed for good; .reason is short ("http_500", "timeout", "empty", ...), .attempts
    counts the HTTP requests sent for it, .usage the tokens billed for its unusable answers."""
    def __init__(self, reason, attempts=1, usage=None):
        super().__init__(f"request failed after {attempts} attempts: {reason}")
        self.reason, self.attempts = reason, attempts
        self.usage = usage or {"prompt_tokens": 0, "completion_tokens": 0}


def make_client(base_url=None, api_key_env="OPENAI_API_KEY", timeout=60.0, max_retries=6, flag="--api-key-env"):
    """An OpenAI client. The SDK retries 408/409/429/5xx, timeouts and dropped connections itself, with
    exponential backoff, jitter and the server's Retry-After (up to 2 minutes; longer is not retried)."""
    if (problem := key_env_problem(api_key_env)):  # checked at parse time too; this is for library callers
        raise FatalAPIError(f"{flag} {problem}")
    if not (key := os.environ.get(api_key_env)):
        raise FatalAPIError(f"environment variable {api_key_env} is not set (for a server without keys, any value works)")
    return openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries)


def one_line(text, secret=None):
    """A message fit for a terminal and a log: one line, short, and no API key in it."""
    if isinstance(text, OSError) and text.strerror:  # a full disk, a file we may not write: name the file
        text = f"{text.filename}: {text.strerror}" if text.filename else text.strerror
    text = " ".join(str(text).split())
    if secret:
        text = text.replace(secret, "***")
    # servers echo keys back, sometimes half masked: keep only a recognisable prefix
    return re.sub(r"\b(sk-[A-Za-z0-9]{0,4})[A-Za-z0-9*_\-]{4,}", r"\1***", text)[:300]


def api_error(err, secret=None, attempts=1, usage=None):
    """What an SDK error, raised after the SDK's own retries, means here: a RetryError when this request
    failed (the run goes on; a rerun asks again), a FatalAPIError when no request can succeed."""
    if isinstance(err, openai.APIConnectionError):  # a timeout is one too
        return RetryError("timeout" if isinstance(err, openai.APITimeoutError) else "connection", attempts, usage)
    if not isinstance(err, openai.APIStatusError):
        return FatalAPIError(one_line(f"{type(err).__name__}: {err}", secret))
    status, info = err.status_code, err.body if isinstance(err.body, dict) else {}
    info = info.get("error", info) if isinstance(info.get("error", info), dict) else {}
    code, message = str(info.get("code") or info.get("type") or ""), info.get("message") or err.message
    if (status == 429 and code != "insufficient_quota") or status in (408, 409) or status >= 500:
        return RetryError(f"http_{status}", attempts, usage)
    # a prompt that is too long or against a policy: record it as failed, the run goes on
    if status in (400, 413, 422) and re.search(r"context.length|too.long|too.large", f"{code} {message}", re.I):
        return RetryError("too_long", attempts, usage)
    if status in (400, 422) and re.search(r"content.policy|content.filter|invalid.prompt", f"{code} {message}", re.I):
        return RetryError("content_policy", attempts, usage)
    return FatalAPIError(one_line(f"HTTP {status} ({code or 'error'}): {message}", secret))


def request_body(model, messages, temperature=None, max_tokens=None):
    """A chat request's fields; sampling fields not given are left to the server."""
    body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    return {k: v for k, v in body.items() if v is not None}


def parse_completion(resp):
    """(text, finish_reason, usage) of a chat completion's JSON, live or from the Batch API."""
    try:
        choice = resp["choices"][0]
        text, usage = choice["message"]["content"] or "", resp.get("usage") or {}
        if not isinstance(text, str):
            raise TypeError("content is not a string")
        usage = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"malformed completion ({type(e).__name__})") from None
    return text, choice.get("finish_reason"), usage


def chat_with_retry(client, model, messages, *, temperature=None, max_tokens=None, retries=6, validate=None,
                    extra=None):
    """One chat completion with a usable answer: {"text", "finish_reason", "usage", "attempts"}.

    The SDK retries what goes wrong on the way (see make_client); this loop retries what only we can
    judge: malformed or empty answers, and those validate(text) rejects (False or ValueError). Both draw
    on one budget of `retries` retries, counted in HTTP requests ("attempts"); usage sums every answer
    billed. Raises RetryError when the budget runs out or the prompt itself is refused, FatalAPIError
    when no retry can help."""
    body = request_body(model, messages, temperature, max_tokens)
    usage, sent = Counter(prompt_tokens=0, completion_tokens=0), 0
    while True:
        try:
            raw = client.with_options(max_retries=retries - sent).chat.completions.with_raw_response.create(
                **body, extra_body=extra or None)
        except openai.OpenAIError as e:  # the SDK numbers its retries in a header of the request
            tried = int(e.request.headers.get("x-stainless-retry-count", 0)) + 1 if hasattr(e, "request") else 1
            raise api_error(e, client.api_key, sent + tried, dict(usage)) from None
        sent += raw.retries_taken + 1
        try:  # an HTML page or broken JSON under status 200 gets here too
            text, finish, used = parse_completion(json.loads(raw.content))
        except ValueError:
            reason = "malformed"
        else:
            usage.update(used)
            try:
                reason = "empty" if not text.strip() else None if validate is None or validate(text) else "invalid"
            except ValueError:
                reason = "invalid"
            if reason is None:
                return {"text": text, "finish_reason": finish, "usage": dict(usage), "attempts": sent}
        if sent > retries:
            raise RetryError(reason, sent, dict(usage))


def run_pool(items, fn, concurrency=8, desc=None, stop=None, status=None, unit="req"):
    """fn(item) for every item on `concurrency` threads, with a progress bar (rate, ETA). No new item
    starts once stop() is true. An exception from fn (FatalAPIError, ...) or Ctrl-C stops the pool at
    once and is raised here; requests in flight are abandoned, which a resumable caller can afford.
    Returns fn's results in the order of items (None for those never run)."""
    items, halt = list(items), threading.Event()

    def task(item):
        return None if halt.is_set() or (stop is not None and stop()) else fn(item)

    pool = ThreadPoolExecutor(max(1, min(concurrency, len(items))))
    futures = {pool.submit(task, item): i for i, item in enumerate(items)}
    results = [None] * len(items)
    try:
        with tqdm(total=len(items), desc=desc, unit=unit, dynamic_ncols=True) as bar:
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
                if status is not None:
                    bar.set_postfix_str(status(), refresh=False)
    except BaseException:
        halt.set()  # not waiting for the requests in flight: see exit_now
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


# -----------------------------------------------------------------------------
# the output: append-only JSONL that survives kill -9 and a full disk, and never eats an input

class JsonlStore:
    """Append-only JSONL of records keyed by record[key], locked against a second writer. .records maps
    key -> record (the last wins where a key repeats, which only append(unique=False) allows).

    Opening changes nothing in a file that is not recognisably this program's own: every complete line
    must be a JSON object with the key field, or DataError is raised. In a file of ours, a torn last line
    (what a kill or a full disk in the middle of a write leaves: the start of a line of UTF-8 text, which
    may end inside a character) is cut off."""

    def __init__(self, path, key="key"):
        self.path, self.key, self.lock, self.records = path, key, threading.Lock(), {}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise DataError(f"{path}: in use by another running process") from None
            self.load()
        except BaseException:
            os.close(self.fd)
            raise

    def load(self):
        for where, rec in read_jsonl(self.path, torn_ok=True):
            if not isinstance(rec, dict) or self.key not in rec:
                raise DataError(f"{where}: not a line this program wrote (a JSON object with a {self.key!r} "
                                f"field is expected); {self.path} is left as it is")
            self.records[rec[self.key]] = rec
        self.size, tail = os.fstat(self.fd).st_size, b""
        if self.size:
            with mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ) as m:  # the bytes after the last newline
                tail = m[m.rfind(b"\n") + 1:]
        if not tail:
            return
        try:
            json.loads(tail)
        except ValueError:  # torn: cut off, but only from a file that is recognisably ours
            if not self.records or not torn(tail):
                raise DataError(f"{self.path}: ends in an incomplete line that this program cannot tell for its own; "
                                "left as it is (cut it off yourself if it is a leftover)") from None
            os.ftruncate(self.fd, self.size - len(tail))
            print(f"{PROG}: {self.path}: repaired a torn last line ({len(tail)} bytes dropped)", file=sys.stderr)
            self.size -= len(tail)
        else:  # a whole record (checked above) that lacks only its newline
            self.write(b"\n")

    def write(self, data):
        """data at the end of the file, synced; a failed write (a full disk) is undone, so the file keeps
        whole lines only, and the error names the file."""
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            os.fsync(self.fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            e.filename = self.path
            raise
        self.size += len(data)

    def append(self, record, unique=True):
        """False (and nothing written) when unique and the record's key is stored already."""
        with self.lock:
            if unique and record[self.key] in self.records:
                return False
            self.write(jsonl([record]))
            self.records[record[self.key]] = record
            return True

    def __contains__(self, key):
        return key in self.records

    def close(self):
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1  # an abandoned request finishing later then fails to write, harmlessly


def jsonl(records):
    """Records as JSONL bytes: text as it is (no \\u escapes), what is not JSON as its str()."""
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records).encode("utf-8")


def write_atomic(path, data):
    """Replace a whole file: a kill or a full disk leaves the old one or the new one, never half."""
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        e.filename = e.filename or path  # a full disk (from fsync) names no file itself
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise


def request_key(model, messages, params):
    """A stable id for a request: same model, messages and sampling params, same key."""
    params = {k: v for k, v in params.items() if v is not None}
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def sidecar(out, name, ext=None):
    root, out_ext = os.path.splitext(out)
    return f"{root}.{name}{ext or out_ext or '.jsonl'}"


def same_file(a, b):
    try:
        return os.path.samefile(a, b)  # also through links and other spellings of the path
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(args):
    """Refuse, before any work, to write where an input is or where no file can be: an input file is
    never modified, whichever of this run's files (the output, its side files) it coincides with."""
    files = [args.out, sidecar(args.out, "batch", ".json")]
    files += [sidecar(args.out, n) for n in ("rejects", "failed", "batch_input", "train", "test")]
    for path in files + [f + ".tmp" for f in files]:
        for flag, given in (("--prompts", args.prompts), ("--answers", args.answers)):
            if given and same_file(path, given):
                raise DataError(f"--out: this run would write {path}, which is the {flag} file; "
                                "an input is never written to: choose another --out")
    if os.path.isdir(args.out):
        raise DataError(f"--out: {args.out} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise DataError(f"--out: cannot create the directory {parent} ({e.strerror})") from None


# -----------------------------------------------------------------------------
# reading prompts and released teacher data

def iter_records(path):
    """(where, record) for every record of a .jsonl, .json (an array) or .parquet file."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:  # pyarrow's errors are OSError (I/O) or ValueError (ArrowInvalid: not parquet)
            batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
            for i, rec in enumerate(rec for batch in batches for rec in batch.to_pylist()):
                yield f"{path}: row {i + 1}", rec
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable parquet file ({one_line(e)})") from None
    elif path.endswith(".json"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x})") from None
        except ValueError as e:
            raise DataError(f"{path}:{getattr(e, 'lineno', '?')}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a JSON array of records is expected")
        yield from ((f"{path}: record {i + 1}", rec) for i, rec in enumerate(data))
    else:
        yield from read_jsonl(path)


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
    raise DataError(f"{path}: cannot tell the format from the first record's keys ({', '.join(sorted(rec))}); pass --format")


def load_answers(path):
    """question id -> answer (a string, or a list of turns) from an Arena-Hard or FastChat answer file."""
    if not os.path.isfile(path):
        raise DataError(f"--answers: {path}: no such file")
    answers = {}
    for where, rec in iter_records(path):
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
            raise DataError(f"{where}: not an answer record (no {e})") from None
    return answers


FORMATS = ("ours", "paper", "alpaca_eval", "minillm", "arena_hard", "fastchat")


def convert(fmt, rec, i, answers):
    """Rows of our format from record number i of a `fmt` file (FastChat's turns make several); a field
    the format must have and lacks raises KeyError (or IndexError, TypeError)."""
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    rid = str(rec.get("id", i))
    if fmt == "ours":
        row = {**rec, "id": rid}
        if "messages" not in row:
            if not isinstance(row.get("prompt"), str):
                raise KeyError("'messages' nor a 'prompt' string")
            row["messages"] = user(row.pop("prompt"))
        return [row]
    if fmt == "paper":
        content, row = rec["content"], {k: v for k, v in rec.items() if k not in ("content", "teacher_response")}
        return [{**row, "id": rid, "messages": user(content) if isinstance(content, str) else content,
                 "teacher": rec.get("teacher_response")}]
    if fmt == "alpaca_eval":
        return [{"id": str(i), "messages": user(rec["instruction"]), "teacher": rec.get("output"),
                 "model": rec.get("generator"), "dataset": rec.get("dataset")}]
    if fmt == "minillm":
        inp, out = rec.get("input") or "", rec.get("output")
        if rec.get("instances"):   # Self-Instruct's own file: one instance each
            inp, out = rec["instances"][0].get("input") or "", rec["instances"][0].get("output")
        if isinstance(out, list):  # S-NI keeps several references: the first one
            out = out[0] if out else None
        row = {k: v for k, v in rec.items() if k not in ("instruction", "input", "output", "prompt", "instances")}
        text = f"{rec['instruction']}\n\n{inp}" if inp else rec["instruction"]  # AlpacaEval joins them so too
        return [{**row, "id": rid, "messages": user(text), "teacher": out}]
    if fmt == "arena_hard":
        uid = str(rec["uid"])
        if "messages" in rec:      # a model_answer file on its own
            ans = rec["messages"][-1]["content"]
            return [{"id": uid, "messages": user(rec["messages"][0]["content"]), "model": rec.get("model"),
                     "teacher": ans["answer"] if isinstance(ans, dict) else ans}]
        return [{"id": uid, "messages": user(rec["prompt"]), "category": rec.get("category"), "teacher": answers.get(uid)}]
    # fastchat: a question file, with --answers one row per turn
    qid, turns = str(rec["question_id"]), rec["turns"] if "turns" in rec else [rec["text"]]
    ans = answers.get(qid)
    if not ans:                    # later turns need the earlier answers: a prompt set asks the first one
        return [{"id": qid, "messages": user(turns[0]), "category": rec.get("category")}]
    rows, msgs = [], []
    for t, (q, a) in enumerate(zip(turns, [ans] if isinstance(ans, str) else ans), 1):
        msgs = msgs + user(q)      # one row per turn, each with the conversation so far
        rows.append({"id": qid if t == 1 else f"{qid}-turn{t}", "messages": msgs, "teacher": a, "category": rec.get("category")})
        msgs = msgs + [{"role": "assistant", "content": a}]
    return rows


def import_file(path, fmt="auto", answers=None):
    """Rows {"id", "messages", "teacher", ...} from any supported file (no "teacher" for prompts only),
    each checked by data.check_row. Raises DataError naming file:line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    answer_map = load_answers(answers) if answers else {}
    rows, seen = [], {}
    for i, (where, rec) in enumerate(iter_records(path)):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a JSON object is expected, not {type(rec).__name__}")
        fmt = detect_format(rec, path) if fmt == "auto" else fmt
        try:
            new = convert(fmt, rec, i, answer_map)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise DataError(f"{where}: not a {fmt} record (no {e})") from None
        for row in new:
            row = check_row({k: v for k, v in row.items() if v is not None}, where, need_teacher=False)
            if fmt != "ours":
                row.setdefault("source", fmt)
            if row["id"] in seen:
                raise DataError(f"{where}: duplicate id {row['id']!r} (first at {seen[row['id']]})")
            seen[row["id"]] = where
            rows.append(row)
    return rows


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
        self.args, self.lock, self.used, self.now = args, threading.Lock(), Counter(), Counter()
        self.refusal = re.compile(args.refusal_filter) if args.refusal_filter else None
        self.stores = []
        try:
            for path in (args.out, sidecar(args.out, "rejects"), sidecar(args.out, "failed")):
                self.stores.append(JsonlStore(path))
        except BaseException:
            self.close()
            raise
        self.out, self.rejects, self.failed = self.stores
        for store in self.stores:
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
        with self.lock:
            self.now["answered"] += 1
        if (self.out.append(row) if reason is None else self.rejects.append({**row, "reason": reason})):
            self.charge(usage, batch)  # an answer stored before (a rerun of an import) was paid before

    def fail(self, job, reason, attempts=1, usage=None):
        self.charge(usage)
        with self.lock:
            self.now["failed"] += 1
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

    def shortfall(self):
        """The line that ends a run where too few of its requests got an answer, or None."""
        got, tried = self.now["answered"], self.now["answered"] + self.now["failed"]
        if tried and (got == 0 or got < self.args.min_success * tried):
            return (f"only {got} of {tried} requests got an answer this run (--min-success {self.args.min_success}); "
                    f"reasons in {self.failed.path}")

    def close(self):
        for store in self.stores:
            store.close()


# -----------------------------------------------------------------------------
# three ways to get answers: the live API, the Batch API, a local model

def live(args, col, todo):
    client = make_client(args.base_url, args.api_key_env, args.timeout, args.retries)

    def work(job):
        try:
            res = chat_with_retry(client, args.model, job["sent"], temperature=args.temperature,
                                  max_tokens=args.max_tokens, retries=args.retries, extra=args.extra_body)
        except RetryError as e:
            return col.fail(job, e.reason, e.attempts, e.usage)
        col.finish(job, res["text"], res["finish_reason"], res["usage"])

    run_pool(todo, work, args.concurrency, desc="teacher", stop=col.over_budget,
             status=lambda: f"failed={col.now['failed']} cost=${col.spent:.4f}")


def batch_api(args, col, todo, jobs):
    """The Batch API: a run uploads and submits, a later one (or this one with --wait, polling every
    --poll-interval) merges the results once the batch has ended; <out>.batch.json holds the state between
    runs. The SDK retries each call; what it cannot fix stops the run, and a rerun picks up from the state."""
    client = make_client(args.base_url, args.api_key_env, args.timeout, args.retries)
    path = sidecar(args.out, "batch", ".json")
    if os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
    elif (state := upload_batch(args, client, col, todo, path)) is None:
        return
    if "batch_id" not in state:
        # a run killed between upload and create may have created the batch: it must not be paid twice
        found = [b for b in client.batches.list(limit=100).data if b.input_file_id == state["input_file_id"]]
        state["batch_id"] = (found[0] if found else client.batches.create(
            input_file_id=state["input_file_id"], endpoint="/v1/chat/completions", completion_window="24h")).id
        write_atomic(path, json.dumps(state).encode())
        print(f"submitted batch {state['batch_id']}: {len(state['keys'])} requests")
    while (batch := client.batches.retrieve(batch_id=state["batch_id"])).status in BATCH_ACTIVE:
        done = batch.request_counts.completed if batch.request_counts else 0
        print(f"batch {batch.id}: {batch.status}, {done}/{len(state['keys'])} done"
              + ("" if args.wait else "; rerun this command to collect the results"))
        if not args.wait:
            return
        time.sleep(args.poll_interval)
    merge_batch(client, col, {j["key"]: j for j in jobs}, batch, state)
    os.remove(path)


def upload_batch(args, client, col, todo, path):
    """The requests that fit the budget, uploaded; their state, or None when none fits."""
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
    data = jsonl({"custom_id": job["key"], "method": "POST", "url": "/v1/chat/completions",  # what a live run sends
                  "body": {**request_body(args.model, job["sent"], args.temperature, args.max_tokens), **args.extra_body}}
                 for job in chosen)
    write_atomic(sidecar(args.out, "batch_input"), data)  # a copy to look at; the upload sends `data`
    upload = client.files.create(file=("batch_input.jsonl", data), purpose="batch")
    state = {"input_file_id": upload.id, "keys": [j["key"] for j in chosen], "model": args.model}
    write_atomic(path, json.dumps(state).encode())
    print(f"uploaded {len(chosen)} requests, estimated cost at most ${estimate:.4f}")
    return state


def merge_batch(client, col, jobs_by_key, batch, state):
    """Results land exactly like live answers; a request with no result fails with the batch's status."""
    seen = set()
    for file_id in (batch.output_file_id, batch.error_file_id):
        for n, line in enumerate(client.files.content(file_id=file_id).text.split("\n") if file_id else [], 1):
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
    from loading import load_tokenizer, render_prompt, stop_token_ids  # only this path needs them
    from model import Transformer, generate
    try:
        model, tok = Transformer.from_pretrained(args.model), load_tokenizer(args.model)
    except Exception as e:
        raise DataError(f"--model: cannot load {args.model}: {one_line(e)}") from None
    stop = stop_token_ids(tok)
    for b in tqdm(range(0, len(todo), args.batch_size), desc="local", unit="batch"):
        batch = todo[b:b + args.batch_size]
        prompts = [render_prompt(tok, job["sent"]) for job in batch]
        # a seed per request, so an answer does not depend on its batch (or on a resume)
        seeds = [(int(job["key"][:8], 16) + args.seed) % 2**32 for job in batch]
        outs = generate(model, prompts, n=1, max_new_tokens=args.max_tokens, temperature=args.temperature,
                        top_p=1.0, stop_ids=stop, seed=seeds)
        for job, ids, o in zip(batch, prompts, outs):
            tokens = o.tokens[:-1] if o.stopped else o.tokens  # the stop token is not part of the text
            col.finish(job, tok.decode(tokens, skip_special_tokens=True), "stop" if o.stopped else "length",
                       {"prompt_tokens": len(ids), "completion_tokens": len(o.tokens)})


# -----------------------------------------------------------------------------

def write_split(args, col):
    """<out>.train.jsonl and <out>.test.jsonl. Test rows are chosen by a hash of their id, so the split
    depends neither on the order answers arrived in nor on the machine."""
    digest = lambda r: hashlib.sha256(r["id"].encode()).hexdigest()  # noqa: E731
    rows = sorted(col.out.records.values(), key=digest)
    n_test = (sum(int(digest(r)[:8], 16) < args.test_size * 2 ** 32 for r in rows) if args.test_size < 1
              else min(int(args.test_size), len(rows)))
    for name, part in (("test", rows[:n_test]), ("train", rows[n_test:])):
        write_atomic(sidecar(args.out, name), jsonl(part))
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


# argparse types (with flags.py's): a nonsense value stops the run before it starts, with argparse's error
def test_size(text):
    size = POS(text)
    if size >= 1 and size != int(size):
        raise argparse.ArgumentTypeError(f"{text} is neither a fraction below 1 nor a whole number of rows")
    return size


def json_object(text):
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


def regex(text):
    try:
        re.compile(text)
    except re.error:
        raise ValueError(text) from None
    return text


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description="Collect a teacher's answers, robustly and resumably.")
    a = p.add_argument
    a("--prompts", required=True, help="input file: .jsonl, .json or .parquet")
    a("--format", default="auto", choices=["auto", *FORMATS], help="input format (auto: from the first record)")
    a("--answers", help="answers to --prompts: an Arena-Hard model_answer or a FastChat answer file")
    a("--out", required=True, help="output JSONL; <out>.rejects/.failed/.batch files sit next to it")
    a("--import-only", action="store_true", help="convert the answers already in --prompts, no API call")
    a("--backend", default="api", choices=["api", "local"])
    a("--model", help="the teacher's model name (a checkpoint path with --backend local)")
    a("--base-url", help="OpenAI-compatible endpoint (default: the SDK's, or $OPENAI_BASE_URL)")
    a("--api-key-env", type=key_env, default="OPENAI_API_KEY", metavar="NAME",
      help="name of the environment variable that holds the API key")
    a("--temperature", type=NONNEG)
    a("--max-tokens", type=POS_INT)
    a("--system", help="system prompt sent before each conversation (stored as 'system', not in messages)")
    a("--extra", type=json_object, default={}, dest="extra_body",
      help="JSON object of extra request fields, e.g. '{\"max_completion_tokens\": 1536}'")
    a("--concurrency", type=POS_INT, default=8)
    a("--timeout", type=POS, default=120.0, help="seconds per HTTP request")
    a("--retries", type=NONNEG_INT, default=6, help="retries per prompt after the first request: the SDK's (429, "
      "5xx, timeouts, with backoff and Retry-After) and ours (empty or malformed answers) together")
    a("--min-success", type=FRACTION, default=0.5, metavar="FRACTION", help="exit 1 when fewer than this fraction "
      "of this run's requests got an answer (and always when none did); what did arrive is kept")
    a("--batch-size", type=POS_INT, default=16, help="prompts per generate() call with --backend local")
    a("--seed", type=int, default=1337)
    a("--batch-api", action="store_true", help="use the OpenAI Batch API (rerun to collect)")
    a("--wait", action="store_true", help="with --batch-api: poll until the batch ends")
    a("--poll-interval", type=POS, default=60.0, help="seconds between polls with --wait")
    a("--price-in", type=NONNEG, help="$ per million input tokens")
    a("--price-out", type=NONNEG, help="$ per million output tokens")
    a("--max-cost", type=NONNEG, help="stop at this many $ spent on --out, all runs together")
    a("--keep-truncated", action="store_true", help="keep answers cut at --max-tokens")
    a("--refusal-filter", type=regex, nargs="?", const=REFUSAL, metavar="REGEX", help="filter refusals (a default regex)")
    a("--test-size", type=test_size,
      help="also write <out>.train/.test.jsonl: a fraction in (0, 1), or a whole number of rows")
    a("--dry-run", action="store_true", help="print the estimate and stop")
    args = p.parse_args(argv)
    if not args.import_only and not args.model:
        p.error("--model is required (the teacher's model name, or a checkpoint path with --backend local)")
    if args.max_cost is not None and (args.price_in is None or args.price_out is None):
        p.error("--max-cost needs --price-in and --price-out")
    if args.batch_api and args.backend == "local":
        p.error("--batch-api works only with --backend api")
    if args.backend == "local":  # model.py needs concrete values, and the key records them
        args.max_tokens, args.temperature = args.max_tokens or 1536, 1.0 if args.temperature is None else args.temperature
    return args


def collect(args, col, rows):
    """The run itself; returns the jobs it was about (for the summary)."""
    if args.import_only:
        answered = [r for r in rows if "teacher" in r]
        if not answered:
            raise DataError(f"{args.prompts}: holds no teacher answers (give --answers FILE, or drop --import-only)")
        if len(answered) < len(rows):
            print(f"note: {len(rows) - len(answered)} rows have no teacher answer and are left out")
        # the id is in the key: released data may answer the same prompt twice, and both rows count
        jobs = [{"key": request_key(r.get("model", "import"), r["messages"], {"id": r["id"]}), "row": r} for r in answered]
        for job in jobs:
            r = job["row"]
            col.finish(job, r["teacher"], r.get("finish_reason"), r.get("usage"), model=r.get("model") or args.model or "unknown")
        return jobs
    jobs = make_jobs(args, rows)
    col.refilter()
    todo = [j for j in jobs if j["key"] not in col.out and j["key"] not in col.rejects]
    print(f"{len(jobs)} prompts: {len(jobs) - len(todo)} already answered, {len(todo)} to request")
    if args.backend == "api" and todo:
        estimate(args, col, todo)
    if args.dry_run:
        return None
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
    return jobs


def main(argv=None):
    """The exit status (see the docstring at the top); every error is one line, the last one printed."""
    args = parse_args(argv)
    col, secret, code = None, os.environ.get(args.api_key_env), 1
    try:
        check_outputs(args)
        rows = import_file(args.prompts, args.format, args.answers)
        col = Collector(args)
        jobs = collect(args, col, rows)
        if jobs is None:
            return 0
        col.summary(jobs)
        if args.test_size:
            write_split(args, col)
        if not (msg := col.shortfall()):
            return 0
        msg = f"failed: {msg}"
    except KeyboardInterrupt:
        code, msg = 130, "interrupted; what arrived is kept: rerun the same command to resume"
    except openai.OpenAIError as e:  # from the Batch API's calls, after the SDK's retries
        msg = f"stopped: {api_error(e, secret)}"
    except (FatalAPIError, RetryError) as e:
        msg = f"stopped: {e}"
    except (DataError, OSError) as e:  # OSError: a full disk, a file we may not write; what was written stays whole
        msg = e
    finally:
        if col is not None:
            col.close()
    sys.stdout.flush()  # the error comes after everything else, also where stdout and stderr share a pipe
    print(f"{PROG}: {one_line(msg, secret)}", file=sys.stderr)
    return code


def exit_now(code):
    """Exit with `code`. After a stop (an error, Ctrl-C) requests may be in flight, and ThreadPoolExecutor
    would wait for them at exit, up to their timeouts; every answer kept is on disk already: leave now."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    sys.exit(0)


if __name__ == "__main__":
    exit_now(main())
