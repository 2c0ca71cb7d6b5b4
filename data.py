"""
The data format that prepare_teacher.py writes and train_gad.py and evaluate.py read, the JSONL
files all the scripts read and write, and a row as the student's tokens.

    from data import DataError, JsonlStore, read_jsonl, read_rows, tokenize_rows, write_atomic
    rows = read_rows("data/demo.train.jsonl")              # checked {"id", "messages", "teacher", ...}
    for where, rec in read_jsonl("out/demo/metrics.jsonl", torn_ok=True):
        ...                                                 # where = "out/demo/metrics.jsonl:12"
    store = JsonlStore("out/cache.jsonl")                   # append-only, locked, survives kill -9
    write_atomic("out/results.json", data)                  # the old file or the new one, never half
    toks, skipped = tokenize_rows(rows, tok, eot, max_prompt_len=2048, max_new_tokens=1536)

One row per line: {"id": str, "messages": [{"role": "system" | "user" | "assistant", "content": str},
..., ending with a user turn], "teacher": str}; other keys (model, finish_reason, usage, source, ...)
are kept as they are. Every problem is a DataError whose message is one line naming file:line.
"""

import codecs
import contextlib
import json
import mmap
import os
import sys
import threading
from collections import Counter

try:
    import fcntl
except ImportError:  # no advisory locks on Windows: run one writer at a time yourself
    fcntl = None

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Unusable input: the message is one line that names the file (and line) and what is wrong."""


def read_jsonl(path, torn_ok=False):
    """(where, record) for every non-empty line of a JSONL file, streamed.

    A last line without its newline that does not parse is what a kill in the middle of a write
    leaves. With torn_ok (a file this program appends to itself, such as metrics.jsonl) it is
    skipped with a warning on stderr; otherwise it is an error like any other bad line. The file
    is never modified here: only its owner may repair it (see JsonlStore)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a JSONL file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except ValueError as e:  # a UnicodeDecodeError too: a cut may split a multi-byte character
                if torn_ok and torn(raw):
                    print(f"{path}: ignoring a torn last line ({len(raw)} bytes without a newline)", file=sys.stderr)
                    return
                if isinstance(e, UnicodeDecodeError):
                    raise DataError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
                raise DataError(f"{where}: not valid JSON ({getattr(e, 'msg', e)})") from None


def torn(line):
    """Whether a last line that does not parse is what a kill mid-write leaves: no newline, and its
    bytes the start of UTF-8 text (a cut may split a character; garbage bytes are not a cut)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(line)
    except UnicodeDecodeError:
        return False
    return not line.endswith(b"\n")


def check_messages(msgs, where):
    """The conversation, checked and stripped to role + content; it must end with the user's turn."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i + 1} needs a role of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i + 1}: 'content' must be a string, "
                            f"not {type(m.get('content')).__name__}")
    if msgs[-1]["role"] != "user":
        raise DataError(f"{where}: the last message must be the user's, not the {msgs[-1]['role']}'s")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def check_row(rec, where, need_teacher=True, index=0):
    """One row of our format, checked: id as a string (the row index when absent), messages, and
    the teacher's answer as a string (required when need_teacher). Other keys stay as they are."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a JSON object is expected, not {type(rec).__name__}")
    if "messages" not in rec:
        raise DataError(f"{where}: no 'messages' field")
    teacher = rec.get("teacher")
    if teacher is None and need_teacher:
        raise DataError(f"{where}: no 'teacher' answer")
    if teacher is not None and not isinstance(teacher, str):
        raise DataError(f"{where}: 'teacher' must be a string, not {type(teacher).__name__}")
    return {**rec, "id": str(rec.get("id", index)), "messages": check_messages(rec["messages"], where)}


def read_rows(path, need_teacher=True):
    """Every row of a data file, checked; a repeated id is an error (it would skew any per-prompt
    statistic and make resumed collection ambiguous)."""
    rows, seen = [], {}
    for i, (where, rec) in enumerate(read_jsonl(path)):
        row = check_row(rec, where, need_teacher, index=i)
        if row["id"] in seen:
            raise DataError(f"{where}: duplicate id {row['id']!r} (first at {seen[row['id']]})")
        seen[row["id"]] = where
        rows.append(row)
    return rows


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
            print(f"{self.path}: repaired a torn last line ({len(tail)} bytes dropped)", file=sys.stderr)
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


# -----------------------------------------------------------------------------
# a row as the student's tokens: its prompt through the chat template, the teacher's answer ending
# exactly like a student sample

def render_prompt(tok, messages):
    """Token ids of a conversation rendered with the chat template, ready for the assistant's turn."""
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # a template's own raise_exception(), or one that cannot handle this conversation
        raise DataError(f"the chat template of {tok.name_or_path or 'the tokenizer'} fails on it "
                        f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    # the template already writes any BOS it wants; adding special tokens again would double it
    return tok(text, add_special_tokens=False)["input_ids"]


def tokenize_rows(rows, tok, eot, max_prompt_len, max_new_tokens, source="data"):
    """Prompt ids (chat template) and teacher ids. A teacher answer ends with the end-of-turn token
    exactly like a student sample that stopped, unless it was cut: over the length limit, or cut
    by the API (finish_reason "length") at any length. Then it ends like a cut sample, with no
    end-of-turn: D must never tell the two apart by how they end. Rows with nothing to learn from are
    left out and counted by reason (skipped): a prompt over max_prompt_len, a blank teacher answer."""
    out, skipped = [], Counter()
    for r in rows:
        if not (r.get("teacher") or "").strip():
            skipped["a blank teacher answer"] += 1
            continue
        try:
            prompt = render_prompt(tok, r["messages"])
        except DataError as e:
            raise DataError(f"{source}: row {r['id']}: {e}") from None
        if len(prompt) > max_prompt_len:
            skipped["a prompt over --max-prompt-len"] += 1
            continue
        t_ids = tok(r["teacher"], add_special_tokens=False)["input_ids"]
        cut = len(t_ids) >= max_new_tokens or r.get("finish_reason") == "length"
        t_ids = t_ids[:max_new_tokens] if cut else t_ids + [eot]
        out.append({**r, "prompt": prompt, "teacher_ids": t_ids})
    return out, skipped


def student_response(tokens, stopped, eot):
    """A sample as D sees it: whichever stop token ended it becomes the end-of-turn token the
    teacher's answers end with (EOS symmetry)."""
    return tokens[:-1] + [eot] if stopped else tokens
