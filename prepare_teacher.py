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
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections import Counter

import openai
from tqdm import tqdm

from api import (FatalAPIError, RetryError, api_error, chat_with_retry, exit_now, make_client, one_line,
                 parse_completion, request_body, request_key, run_pool)
from data import DataError, JsonlStore, jsonl, write_atomic
from flags import FRACTION, NONNEG, NONNEG_INT, POS, POS_INT, key_env
from importers import FORMATS, import_file

PROG = "prepare_teacher.py"
REFUSAL = (r"^\s*(I'?m sorry|I am sorry|I apologi[sz]e|As an AI\b|I (?:can(?:'|no)?t|cannot|won'?t|am unable to)"
           r" (?:help|assist|comply|provide|fulfill|do that))")
BATCH_PRICE = 0.5        # the Batch API's price, relative to live requests
BATCH_ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


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
        # $ booked by the requests in flight, and how many they are
        self.reserved, self.in_flight, self.room = 0.0, 0, threading.Condition(self.lock)
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

    def reserve(self, cost):
        """Book a request's worst case before it is sent. While it does not fit under --max-cost next to
        the requests in flight, wait for them (their real cost is usually below their worst case); False,
        and nothing booked, once none is in flight and it still does not fit."""
        with self.room:
            while self.args.max_cost is not None and self.spent + self.reserved + cost > self.args.max_cost:
                if not self.in_flight:
                    return False
                self.room.wait()
            self.reserved += cost
            self.in_flight += 1
            return True

    def release(self, costs):
        with self.room:
            self.reserved -= sum(costs)
            self.in_flight -= len(costs)
            self.room.notify_all()

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
        extras = {"finish_reason": finish_reason, "usage": usage, "system": job.get("system"), "batch": batch or None,
                  "temperature": None if model else self.args.temperature}  # what an oracle needs (evaluate.py)
        row.update(teacher=text, model=model or self.args.model, key=job["key"],
                   **{k: v for k, v in extras.items() if v or (k == "temperature" and v == 0)})
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
        budget = f" of the --max-cost ${self.args.max_cost}" if self.args.max_cost is not None else ""
        print(f"tokens: {self.used['in']:,} in, {self.used['out']:,} out; cost ${self.spent:.4f} in all{budget}, "
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
        # each send (ours and every retry of an unusable answer, which is billed too) books its worst
        # case first, so concurrent requests can never together spend past --max-cost
        worst, booked = col.price(job["tokens_in"], args.max_tokens or 0), []

        def book():
            if not col.reserve(worst):
                return False
            booked.append(worst)
            return True

        if not book():
            return None  # stays pending: a rerun with a larger --max-cost asks it
        try:
            res = chat_with_retry(client, args.model, job["sent"], temperature=args.temperature,
                                  max_tokens=args.max_tokens, retries=args.retries, extra=args.extra_body,
                                  before_retry=book)
        except RetryError as e:
            col.fail(job, e.reason, e.attempts, e.usage)
        else:
            col.finish(job, res["text"], res["finish_reason"], res["usage"])
        finally:
            col.release(booked)  # after the real cost is charged: the room it frees is real

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
    from data import render_prompt  # only this path needs torch and a model
    from generate import generate
    from loading import load_model, load_tokenizer, stop_token_ids
    try:
        model, tok = load_model(args.model), load_tokenizer(args.model)
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
    if args.max_cost is not None and args.max_tokens is None and not args.import_only:
        p.error("--max-cost needs --max-tokens: each request's worst case (its prompt and --max-tokens at your "
                "prices) is booked before it is sent")
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
    if args.max_cost is not None and any(col.status(j["key"])[0] == "pending" for j in jobs):
        print(f"stopped at the budget: ${col.spent:.4f} spent of --max-cost ${args.max_cost} (each request books "
              "its worst case before it is sent)")
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


if __name__ == "__main__":
    exit_now(main())
