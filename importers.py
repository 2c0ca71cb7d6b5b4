"""
Released prompt sets and teacher data, read as rows of our format (data.py): the paper's parquet
(content, teacher_response), AlpacaEval model_outputs.json, MiniLLM JSONL (instruction, input,
output; Dolly, Self-Instruct, Vicuna), Arena-Hard question.jsonl and model_answer files, FastChat
question.jsonl with its answer files, and our own JSONL (messages, or a prompt string).

    from importers import import_file
    rows = import_file("dolly_valid.jsonl")                                   # the format from its keys
    rows = import_file("question.jsonl", answers="model_answer/gpt-4-0314.jsonl")

Every problem is a DataError naming file:line (or row); input files are only read.
"""

import json
import os

from data import DataError, check_row, read_jsonl


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
            raise DataError(f"{path}: not a readable parquet file ({' '.join(str(e).split())[:200]})") from None
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
