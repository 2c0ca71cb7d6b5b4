"""
The data format that prepare_teacher.py writes and train_gad.py and evaluate.py read, and the one
JSONL reader all the scripts use.

    from data import DataError, read_jsonl, read_rows
    rows = read_rows("data/demo.train.jsonl")              # checked {"id", "messages", "teacher", ...}
    for where, rec in read_jsonl("out/demo/metrics.jsonl", torn_ok=True):
        ...                                                 # where = "out/demo/metrics.jsonl:12"

One row per line: {"id": str, "messages": [{"role": "system" | "user" | "assistant", "content": str},
..., ending with a user turn], "teacher": str}; other keys (model, finish_reason, usage, source, ...)
are kept as they are. Every problem is a DataError whose message is one line naming file:line.
"""

import codecs
import json
import sys

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Unusable input: the message is one line that names the file (and line) and what is wrong."""


def read_jsonl(path, torn_ok=False):
    """(where, record) for every non-empty line of a JSONL file, streamed.

    A last line without its newline that does not parse is what a kill in the middle of a write
    leaves. With torn_ok (a file this program appends to itself, such as metrics.jsonl) it is
    skipped with a warning on stderr; otherwise it is an error like any other bad line. The file
    is never modified here: only its owner may repair it (see prepare_teacher.JsonlStore)."""
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
