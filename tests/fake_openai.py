"""
A fake OpenAI-compatible server for tests (stdlib only), on real HTTP over loopback.

    with FakeOpenAI(faults=seeded_faults(0.3, ["429", "500", "drop"])) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="k")

It serves POST /v1/chat/completions and, for the Batch API, POST /v1/files (multipart),
GET /v1/files/{id}/content, POST /v1/batches, GET /v1/batches and GET /v1/batches/{id}.
Answers are a pure function of model and messages, so two runs can be compared.
The openai SDK retries 429/5xx/timeouts/dropped connections itself, with a backoff of 0.5 s and more:
fast_sdk_retries(monkeypatch) shrinks it for a test (Retry-After is still honoured as sent).

Faults: `faults(prompt, attempt)` returns None or one of
  "429" (with Retry-After), "500", "503", "slow" (answers after `slow_s`), "drop" (closes the
  socket with no response), "malformed" (broken JSON), "nochoices" (JSON without choices),
  "empty" (empty content), "length" (truncated answer), "refusal", "html" (an HTML page with
  status 200, as a misconfigured proxy sends), "401", "400_model", "400_context", "trickle" (the
  answer one byte every `trickle_s`, each within any read timeout), "trickle_headers" (the status
  line and headers so).
`prompt` is the last user message, `attempt` counts that prompt's requests from 1.
`batch_faults(prompt)` does the same for batch lines ("500", "empty", "malformed" or None).
"""

import email.parser
import email.policy
import hashlib
import json
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _hash(*parts):
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def seeded_faults(rate, kinds, seed=0, max_attempt=None):
    """Deterministic faults: a fault on (prompt, attempt) with probability `rate`, kind by hash.
    With max_attempt, attempts after it never fault (so every prompt can end done)."""
    def faults(prompt, attempt):
        if max_attempt is not None and attempt > max_attempt:
            return None
        h = int(_hash(seed, prompt, attempt)[:12], 16)
        if (h % 10_000) / 10_000 >= rate:
            return None
        return kinds[(h // 10_000) % len(kinds)]
    return faults


def fast_sdk_retries(monkeypatch, seconds=0.001):
    """The SDK's backoff between retries down to `seconds`: its constants INITIAL_RETRY_DELAY and
    MAX_RETRY_DELAY (openai/_base_client.py, read at each retry); a server's Retry-After still rules."""
    import openai._base_client as base
    monkeypatch.setattr(base, "INITIAL_RETRY_DELAY", seconds)
    monkeypatch.setattr(base, "MAX_RETRY_DELAY", seconds)


def answer_for(model, messages):
    """The fake teacher's answer: deterministic in model and messages (system prompt included)."""
    last = messages[-1]["content"]
    return f"[{model}] answer to: {last[:40]} #{_hash(model, json.dumps(messages, sort_keys=True))[:10]}"


def completion(model, messages, fault=None):
    text, finish = answer_for(model, messages), "stop"
    if fault == "empty":
        text = ""
    elif fault == "length":
        text, finish = text[:20], "length"
    elif fault == "refusal":
        text = "I'm sorry, but I can't help with that."
    chars = sum(len(m["content"]) for m in messages)
    return {
        "id": "chatcmpl-" + _hash(text)[:12], "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": chars // 4 + 1, "completion_tokens": len(text) // 4 + 1,
                  "total_tokens": chars // 4 + len(text) // 4 + 2},
    }


class FakeOpenAI:
    def __init__(self, faults=None, batch_faults=None, api_key=None, slow_s=1.0, delay=0.0,
                 retry_after="0", batch_polls=1, trickle_s=0.3):
        self.faults = faults or (lambda prompt, attempt: None)
        self.batch_faults = batch_faults or (lambda prompt: None)
        self.api_key = api_key          # when set, other keys get a 401 that echoes the key sent
        self.slow_s, self.delay, self.retry_after, self.trickle_s = slow_s, delay, retry_after, trickle_s
        self.batch_polls = batch_polls  # retrieves that answer "in_progress" before a batch completes
        self.lock = threading.Lock()
        self.attempts = Counter()       # prompt -> chat requests seen
        self.log = []                   # (time, prompt, fault) per chat request
        self.bodies = []                # JSON bodies of chat requests
        self.files, self.file_meta, self.batches = {}, {}, {}
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def chat(self, body, auth):
        """(status, headers, payload or None for a dropped connection, delay) for one chat request."""
        messages = body.get("messages") or [{"content": ""}]
        prompt = messages[-1].get("content", "")
        with self.lock:
            self.attempts[prompt] += 1
            fault = self.faults(prompt, self.attempts[prompt])
            if self.api_key is not None and auth != f"Bearer {self.api_key}":
                fault = "401"
            self.log.append((time.time(), prompt, fault))
            self.bodies.append(body)
        if fault == "401":
            sent = auth.removeprefix("Bearer ")
            return 401, {}, {"error": {"message": f"Incorrect API key provided: {sent}.", "type": "invalid_request_error",
                                       "code": "invalid_api_key"}}, 0
        if fault == "400_model":
            return 400, {}, {"error": {"message": f"The model `{body.get('model')}` does not exist", "type": "invalid_request_error",
                                       "code": "model_not_found"}}, 0
        if fault == "400_context":
            return 400, {}, {"error": {"message": "This model's maximum context length is 8 tokens.", "type": "invalid_request_error",
                                       "code": "context_length_exceeded"}}, 0
        if fault == "429":
            return 429, {"Retry-After": self.retry_after}, {"error": {"message": "Rate limit reached", "type": "requests",
                                                                      "code": "rate_limit_exceeded"}}, 0
        if fault in ("500", "503"):
            return int(fault), {}, {"error": {"message": "The server had an error", "type": "server_error"}}, 0
        if fault == "drop":
            return None, {}, None, 0
        if fault == "malformed":
            return 200, {}, b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "half', 0
        if fault == "html":
            return 200, {"Content-Type": "text/html"}, b"<html><body><h1>Welcome to nginx!</h1></body></html>", 0
        if fault == "nochoices":
            return 200, {}, {"id": "chatcmpl-x", "object": "chat.completion", "choices": []}, 0
        wait = self.slow_s if fault == "slow" else self.delay
        if fault in ("trickle", "trickle_headers"):
            return 200, {"X-Trickle": fault}, completion(body.get("model"), messages), 0
        return 200, {}, completion(body.get("model"), messages, fault), wait

    def run_batch(self, batch):
        """Answer every line of a batch's input file, as the real service does at completion."""
        out, err = [], []
        for i, line in enumerate(self.files[batch["input_file_id"]].decode().splitlines()):
            req = json.loads(line)
            body = req["body"]
            fault = self.batch_faults(body["messages"][-1]["content"])
            rid = f"batch_req_{batch['id']}_{i}"
            if fault == "500":
                err.append({"id": rid, "custom_id": req["custom_id"], "response": {
                    "status_code": 500, "request_id": rid, "body": {"error": {"message": "server error", "type": "server_error"}}},
                    "error": None})
                continue
            resp = completion(body["model"], body["messages"], fault)
            if fault == "malformed":
                resp = {"id": resp["id"], "choices": []}
            out.append({"id": rid, "custom_id": req["custom_id"], "response": {"status_code": 200, "request_id": rid, "body": resp},
                        "error": None})
        batch["status"] = "completed"
        batch["output_file_id"] = self.add_file("".join(json.dumps(r) + "\n" for r in out).encode(), "batch_output.jsonl")
        batch["error_file_id"] = self.add_file("".join(json.dumps(r) + "\n" for r in err).encode(), "batch_errors.jsonl") if err else None
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}

    def add_file(self, data, filename, purpose="batch_output"):
        fid = f"file-{len(self.files) + 1}"
        self.files[fid] = data
        self.file_meta[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                               "filename": filename, "purpose": purpose, "status": "processed"}
        return fid


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # clients that hang up (timeouts, kill -9) are expected
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's connection pool expects

    def log_message(self, *args):
        pass

    def send(self, status, payload, headers=None):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        trickle = (headers or {}).pop("X-Trickle", None)
        try:
            if trickle == "trickle_headers":  # written by hand, a byte at a time, with the body
                head = (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n").encode()
                return self.trickle(head + data)
            self.send_response(status)
            headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if trickle:
                return self.trickle(data)
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout) and closed its side
            self.close_connection = True

    def trickle(self, data):
        self.close_connection = True
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            time.sleep(self.server.fake.trickle_s)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_POST(self):
        fake, raw = self.server.fake, self.read_body()
        if self.path == "/v1/chat/completions":
            status, headers, payload, wait = fake.chat(json.loads(raw), self.headers.get("Authorization", ""))
            if status is None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            time.sleep(wait)
            return self.send(status, payload, headers)
        if self.path == "/v1/files":
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
            parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
            f = parts["file"]
            with fake.lock:
                fid = fake.add_file(f.get_payload(decode=True), f.get_filename(), parts["purpose"].get_content().strip())
            return self.send(200, fake.file_meta[fid])
        if self.path == "/v1/batches":
            body = json.loads(raw)
            with fake.lock:
                bid = f"batch_{len(fake.batches) + 1}"
                fake.batches[bid] = {
                    "id": bid, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
                    "completion_window": body["completion_window"], "status": "validating", "created_at": int(time.time()),
                    "output_file_id": None, "error_file_id": None, "polls": 0,
                    "request_counts": {"total": 0, "completed": 0, "failed": 0}}
                return self.send(200, _public(fake.batches[bid]))
        self.send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def do_GET(self):
        fake, parts = self.server.fake, self.path.split("?")[0].strip("/").split("/")
        with fake.lock:
            if parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content" and parts[2] in fake.files:
                return self.send(200, fake.files[parts[2]])
            if parts == ["v1", "batches"]:
                data = [_public(b) for b in reversed(list(fake.batches.values()))]
                return self.send(200, {"object": "list", "data": data, "has_more": False})
            if parts[:2] == ["v1", "batches"] and len(parts) == 3 and parts[2] in fake.batches:
                batch = fake.batches[parts[2]]
                if batch["status"] != "completed":
                    batch["polls"] += 1
                    if batch["polls"] > fake.batch_polls:
                        fake.run_batch(batch)
                    else:
                        batch["status"] = "in_progress"
                return self.send(200, _public(batch))
        self.send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})


def _public(batch):
    return {k: v for k, v in batch.items() if k != "polls"}
