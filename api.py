"""
Requests to an OpenAI-compatible chat API, for the teacher (prepare_teacher.py) and the judge
(evaluate.py): the client, one request with the retries only we can judge, a thread pool with a
progress bar, request keys for caches, and messages that never show a key.

    from api import chat_with_retry, make_client, run_pool
    client = make_client(base_url=None, api_key_env="OPENAI_API_KEY", timeout=120, max_retries=6)
    res = chat_with_retry(client, "gpt-4o", messages, temperature=0.0, max_tokens=512, retries=6)
    res["text"], res["finish_reason"], res["usage"], res["attempts"]

The SDK retries what goes wrong on the way (connections, timeouts, 408/409/429/5xx, with backoff and
the server's Retry-After) and classifies errors by exception class; chat_with_retry retries what
only the caller can judge (empty, malformed or invalid answers) from the same budget.
"""

import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

import openai
from tqdm import tqdm

from flags import key_env_problem


class FatalAPIError(Exception):
    """An error no retry can fix (bad key, no access, unknown model): the run stops."""


class RetryError(Exception):
    """One request failed for good; .reason is short ("http_500", "timeout", "empty", ...), .attempts
    counts the HTTP requests sent for it, .usage the tokens billed for its unusable answers."""
    def __init__(self, reason, attempts=1, usage=None):
        super().__init__(f"request failed after {attempts} attempts: {reason}")
        self.reason, self.attempts = reason, attempts
        self.usage = usage or {"prompt_tokens": 0, "completion_tokens": 0}


# Per thread, what the HTTP client saw of the request in flight, through an httpx event hook on every
# try the SDK makes: how many were sent ("attempts": requests the server saw, however the SDK ended),
# and the last one's deadline.
_sent = threading.local()


def _on_request(request):
    _sent.n = getattr(_sent, "n", 0) + 1
    limit = (request.extensions.get("timeout") or {}).get("read")
    if limit:
        _sent.deadline = request.extensions["trace"] = Deadline(time.monotonic() + limit)


class Deadline:
    """One request's deadline: its timeout from the first byte sent to the last byte received, however
    slowly the server sends (httpx bounds each read, not the request). An httpcore trace callback: the
    connection's socket (each request opens its own, see make_client) gets a timer that shuts it down
    at the deadline; the read in progress then ends, and the SDK counts a failed request."""

    def __init__(self, at):
        self.at, self.timer, self.expired = at, None, False

    def __call__(self, event, info):
        if event == "connection.connect_tcp.complete":
            sock = info["return_value"].get_extra_info("socket")
            self.timer = threading.Timer(max(0.0, self.at - time.monotonic()), self.expire, (sock,))
            self.timer.daemon = True
            self.timer.start()
        elif event.endswith("response_closed.complete") and self.timer is not None:
            self.timer.cancel()

    def expire(self, sock):
        self.expired = True
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # closed already
            pass


def make_client(base_url=None, api_key_env="OPENAI_API_KEY", timeout=60.0, max_retries=6, flag="--api-key-env"):
    """An OpenAI client. The SDK retries 408/409/429/5xx, timeouts and dropped connections itself, with
    exponential backoff, jitter and the server's Retry-After."""
    if (problem := key_env_problem(api_key_env)):  # checked at parse time too; this is for library callers
        raise FatalAPIError(f"{flag} {problem}")
    if not (key := os.environ.get(api_key_env)):
        raise FatalAPIError(f"environment variable {api_key_env} is not set (for a server without keys, any value works)")
    # a new connection per request: its socket is where the request's deadline acts (Deadline); a
    # handshake costs little next to a model's answer
    limits = type(openai.DEFAULT_CONNECTION_LIMITS)(max_connections=1000, max_keepalive_connections=0)
    http = openai.DefaultHttpxClient(event_hooks={"request": [_on_request]}, limits=limits)
    return openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries, http_client=http)


def one_line(text, secret=None):
    """A message fit for a terminal and a log: one line, short, and no API key in it."""
    if isinstance(text, OSError) and text.strerror:  # a full disk, a file we may not write: name the file
        text = f"{text.filename}: {text.strerror}" if text.filename else text.strerror
    text = " ".join(str(text).split())
    if secret:
        text = text.replace(secret, "***")
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", text)  # user:password@ in a URL, and keys in its query
    text = re.sub(r"([?&][\w-]*(?:key|token|secret|sig|pass|auth)[\w-]*=)[^&\s]+", r"\1***", text, flags=re.I)
    text = re.sub(r"\b(Basic|Bearer)\s+[A-Za-z0-9+/=._-]{8,}", r"\1 ***", text)  # an echoed Authorization header
    # servers echo keys back, sometimes half masked: keep only a recognisable prefix
    return re.sub(r"\b(sk-[A-Za-z0-9]{0,4})[A-Za-z0-9*_\-]{4,}", r"\1***", text)[:300]


def redact_url(url):
    """A URL fit to write down: no user, password or token in it (http://user:pw@host/v1?key=...)."""
    if not url:
        return url
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
    u = urlsplit(url)
    netloc = ("***@" if "@" in u.netloc else "") + u.netloc.rsplit("@", 1)[-1]
    query = urlencode([(k, "***" if re.search(r"key|token|secret|sig|pass|auth", k, re.I) else v)
                       for k, v in parse_qsl(u.query, keep_blank_values=True)], safe="*")
    return urlunsplit((u.scheme, netloc, u.path, query, u.fragment))


def api_error(err, secret=None, attempts=1, usage=None):
    """What an SDK error, raised after the SDK's own retries, means here: a RetryError when this request
    failed (the run goes on; a rerun asks again), a FatalAPIError when no request can succeed."""
    if isinstance(err, openai.APITimeoutError) or getattr(getattr(_sent, "deadline", None), "expired", False):
        return RetryError("timeout", attempts, usage)
    if isinstance(err, openai.APIConnectionError):
        return RetryError("connection", attempts, usage)
    if not isinstance(err, openai.APIStatusError):
        return FatalAPIError(one_line(f"{type(err).__name__}: {err}", secret))
    what = f"{err.code or ''} {err.message}"
    if isinstance(err, openai.RateLimitError) and err.code != "insufficient_quota":  # no quota: no retry helps
        return RetryError(f"http_{err.status_code}", attempts, usage)
    if isinstance(err, (openai.InternalServerError, openai.ConflictError)) or err.status_code == 408:
        return RetryError(f"http_{err.status_code}", attempts, usage)
    # a prompt that is too long or against a policy: recorded as failed, the run goes on
    bad_prompt = isinstance(err, (openai.BadRequestError, openai.UnprocessableEntityError))
    if (bad_prompt or err.status_code == 413) and re.search(r"context.length|too.long|too.large", what, re.I):
        return RetryError("too_long", attempts, usage)
    if bad_prompt and re.search(r"content.policy|content.filter|invalid.prompt", what, re.I):
        return RetryError("content_policy", attempts, usage)
    return FatalAPIError(one_line(f"HTTP {err.status_code} ({err.code or err.type or 'error'}): {err.message}", secret))


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
                    extra=None, before_retry=None):
    """One chat completion with a usable answer: {"text", "finish_reason", "usage", "attempts"}.

    The SDK retries what goes wrong on the way (see make_client); this loop retries what only we can
    judge: malformed or empty answers, and those validate(text) rejects (False or ValueError). Both draw
    on one budget of `retries` retries, counted in HTTP requests ("attempts"); usage sums every answer
    billed. before_retry() is asked before each of our retries (a budget: False stops with "budget").
    Raises RetryError when the retries run out or the prompt itself is refused, FatalAPIError when no
    retry can help."""
    body = request_body(model, messages, temperature, max_tokens)
    usage, sent = Counter(prompt_tokens=0, completion_tokens=0), 0
    while True:
        _sent.n, _sent.deadline = 0, None
        try:
            raw = client.with_options(max_retries=retries - sent).chat.completions.with_raw_response.create(
                **body, extra_body=extra or None)
        except openai.OpenAIError as e:
            raise api_error(e, client.api_key, sent + max(_sent.n, 1), dict(usage)) from None
        finally:
            sent += _sent.n
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
        if before_retry is not None and not before_retry():
            raise RetryError("budget", sent, dict(usage))


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


def request_key(model, messages, params):
    """A stable id for a request: same model, messages and sampling params, same key."""
    params = {k: v for k, v in params.items() if v is not None}
    blob = json.dumps({"model": model, "messages": messages, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def exit_now(code):
    """Exit with `code`. After a stop (an error, Ctrl-C) requests may be in flight, and ThreadPoolExecutor
    would wait for them at exit, up to their timeouts; every answer kept is on disk already: leave now."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)
    sys.exit(0)
