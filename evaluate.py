"""
Score checkpoints the way the GAD paper does, plus judge-free metrics; pick a run's best checkpoint.

    # judge-free metrics (offline): two checkpoints and the teacher on two test sets -> out/eval/
    python evaluate.py --models out/gad/ckpt-002400/generator seqkd=out/seqkd/ckpt-002400/generator teacher \
        --test-sets dolly=data/dolly_test.jsonl vicuna=data/vicuna_test.jsonl
    # add the paper's GPT-4o judge (any OpenAI-compatible endpoint; the key comes from $OPENAI_API_KEY)
    python evaluate.py --models out/gad/ckpt-002400/generator teacher --test-sets data/lmsys_test.jsonl \
        --judge --judge-model gpt-4o --both-orders
    # every checkpoint of a train_gad.py run against its step -> out/demo/eval/, and the best one named
    python evaluate.py --run out/demo --test-sets data/demo.test.jsonl --models teacher --max-new-tokens 128 \
        --markers "arr,matey,ahoy,aye,pirate" --select-by marker
    # training curves of a train_gad.py run -> out/demo/metrics.png
    python evaluate.py --plot-metrics out/demo/metrics.jsonl

A model (--models [name=]spec) is `teacher`, the test set's own `teacher` answers; a checkpoint DIR or
.gguf, answered greedily and cached in <out-dir>/generations.jsonl by checkpoint files, prompt and
settings; or an answers file (`answer`, else `teacher`; this program's answers/*.jsonl too), matched to
the prompts by id where the last user turn agrees too, else by that turn's text. --run DIR adds each
DIR/ckpt-NNNNNN/generator and names the best by --select-by (ties: the earlier step). Test sets and
answers files are our JSONL or any single file prepare_teacher.py imports (MiniLLM's dolly/self-inst/
vicuna, Self-Instruct, AlpacaEval, Arena-Hard, FastChat).

Judge (MiniLLM / GAD protocol): the judge writes its own reference answer per prompt, then scores the
model's answer (Assistant 1) and the reference (Assistant 2) 1-10 in one prompt; score = 100 * s_model /
(s_model + s_ref), 50 = parity. A reply without two scores on its first line is retried, then counted as
failed. Replies are cached in <out-dir>/judge_cache.jsonl: a rerun pays only for what is missing.

Judge-free metrics (p1..p6 and rougeL against the test set's teacher answer, never for `teacher` itself):
  len     tokens of the student tokenizer (--tokenizer, default the first checkpoint's), else words
  cut     % of answers cut at the length limit (files and teacher: finish_reason == "length")
  p1..p6  BLEU's clipped n-gram precision (%), corpus level, on lowercased \\w+ runs and punctuation
          marks; no brevity penalty, so read it next to len
  rougeL  ROUGE-L F1 (%) by the rouge-score package with Porter stemming, as MiniLLM and
          Super-NaturalInstructions report it; its tokenizer keeps ASCII letters and digits only
  marker  % of answers with any --markers word (whole words, any case)
  dscore  mean raw D(prompt, answer) with --discriminator
Means carry 95% bootstrap intervals over prompts. Writes results.json (per prompt too), results.md,
results.png, answers/<model>__<set>.jsonl. Exit: 0; 2 bad input or setup (one line; files already
written stay whole); 3 the judge scored less than --min-judged of some model's prompts (the rest is
written); 130 Ctrl-C (the caches are kept).
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from contextlib import closing, nullcontext

import numpy as np
import torch
from rouge_score import rouge_scorer
from tqdm import tqdm

from api import (FatalAPIError, RetryError, chat_with_retry, exit_now, make_client, one_line, redact_url, request_key,
                 run_pool)
from charts import plot_metrics, pyplot, save_png
from data import DataError, JsonlStore, jsonl, render_prompt, write_atomic
from flags import FRACTION, NONNEG, NONNEG_INT, POS, POS_INT, key_env, number
from generate import generate
from importers import import_file
from health import has_loop
from loading import LoadError, end_of_turn_id, load_model, load_tokenizer, read_json, resolve_checkpoint, stop_token_ids
from oracle import kl_along

PROG = "evaluate.py"
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
    "[System]\n{prompt}\n\n"
)
JUDGE_PROMPT = (
    "We would like to request your feedback on the performance of two AI assistants in response to "
    "the user question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of "
    "details of their responses. Each assistant receives an overall score on a scale of 1 to 10, "
    "where a higher score indicates better overall performance.\nPlease first output a single line "
    "containing only two values indicating the scores for Assistant 1 and 2, respectively. The two "
    "scores are separated by a space. In the subsequent line, please provide a comprehensive "
    "explanation of your evaluation, avoiding any potential bias and ensuring that the order in "
    "which the responses were presented does not affect your judgment."
)
JUDGE_PAIR_MAX_TOKENS = 512  # the scores are on the first line; FastChat's reviewer used 512 too
MAX_N = 6
# metric key -> (table title, format), in the order of results.md; all but len and cut: higher is better
METRICS = {
    "judge": ("judge score (50 = parity with the judge's reference)", "{:.1f}"),
    "rougeL": ("ROUGE-L F1 vs teacher (%)", "{:.1f}"),
    **{f"p{n}": (f"clipped {n}-gram precision vs teacher (%)", "{:.1f}") for n in range(1, MAX_N + 1)},
    "marker": ("answers with a marker word (%)", "{:.1f}"),
    "len": ("answer length ({unit})", "{:.0f}"),
    "cut": ("answers cut at the length limit (%)", "{:.1f}"),
    "dscore": ("mean discriminator score", "{:.3f}"),
    "loop": ("answers that loop: a 1-3-word unit 4 times in a row (%)", "{:.1f}"),
    "distinct2": ("distinct word pairs per answer (%)", "{:.1f}"),
}
# with --oracle, per student temperature tau: what only a local teacher can measure
ORACLE = {"forward_kl": "forward KL(teacher || student) along the teacher's answers, nats/token",
          "reverse_kl": "reverse KL(student || teacher) along the student's samples, nats/token",
          "loop_sampled": "sampled answers that loop (%)", "distinct2_sampled": "distinct word pairs per sampled answer (%)"}
ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


# -----------------------------------------------------------------------------
# judge-free metrics

def words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def clipped_ngram_matches(cand, ref, n):
    """(matches, total) for BLEU's modified precision: each answer n-gram counts at most as often
    as it appears in the reference. Kept as a pair so the corpus-level ratio can be bootstrapped."""
    c, r = (Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1)) for t in (cand, ref))
    return sum(min(k, r[g]) for g, k in c.items()), max(len(cand) - n + 1, 0)


def rouge_l(answer, reference):
    """ROUGE-L F1 in [0, 1]. The package's LCS is a plain Python table: 0.2 s for two 1000-word texts."""
    return ROUGE.score(reference, answer)["rougeL"].fmeasure  # score(target, prediction)


def bootstrap(num, den=None, n_boot=1000, seed=0):
    """Mean of num (or sum(num)/sum(den), a corpus-level ratio) with a 95% percentile interval
    from resampling prompts with replacement."""
    num = np.asarray(num, dtype=np.float64)
    n = len(num)
    if n == 0 or (den is not None and np.sum(den) == 0):
        return {"mean": None, "lo": None, "hi": None, "n": n}
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    if den is None:
        mean, stats = num.mean(), num[idx].mean(axis=1)
    else:
        den = np.asarray(den, dtype=np.float64)
        mean, d = num.sum() / den.sum(), den[idx].sum(axis=1)
        stats = num[idx].sum(axis=1) / np.where(d > 0, d, np.nan)
        stats = stats[~np.isnan(stats)]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": float(mean), "lo": float(lo), "hi": float(hi), "n": n}


# -----------------------------------------------------------------------------
# inputs, all checked before any model loads

def parse_spec(spec):
    """`name=path` -> (name, path); a bare path -> (default name, path)."""
    name, sep, rest = spec.partition("=")
    if sep and re.fullmatch(r"[\w.+-]+", name) and rest:
        return name, rest
    return re.sub(r"\.(jsonl|json|gguf)$", "", os.path.basename(os.path.normpath(spec))) or spec, spec


def load_rows(path, flag):
    """Rows of our format from our JSONL or any format prepare_teacher.py imports, checked by data.py."""
    try:
        rows = import_file(path)
    except DataError as e:
        raise DataError(f"{flag}: {e}") from None
    if not rows:
        raise DataError(f"{flag}: {path}: no rows")
    return rows


def run_checkpoints(run):
    """{ckpt-NNNNNN: (step, its generator dir)} of a train_gad.py run, in step order; ckpt-*.tmp is
    one still being written."""
    if not os.path.isdir(run):
        raise DataError(f"--run {run}: not a directory")
    found = {}
    for d in filter(lambda d: re.fullmatch(r"ckpt-\d+", d), os.listdir(run)):
        gen = os.path.join(run, d, "generator")
        if os.path.isfile(os.path.join(gen, "config.json")):
            found[d] = (int(d[5:]), gen)
        else:
            print(f"note: {gen} has no config.json: {d} left out")
    if not found:
        raise DataError(f"--run {run}: no ckpt-NNNNNN/generator checkpoints in it")
    return dict(sorted(found.items(), key=lambda kv: kv[1][0]))


def load_inputs(args):
    """Test sets {name: rows}, models {name: (kind, path)} and the run's checkpoints."""
    sets, ckpts = {}, run_checkpoints(args.run) if args.run else {}
    for name, path in map(parse_spec, args.test_sets):
        if name in sets:
            raise DataError(f"--test-sets: two test sets named '{name}': use name=path")
        sets[name] = load_rows(path, "--test-sets")[:args.limit]
    models = {c: ("checkpoint", path) for c, (_, path) in ckpts.items()}
    for spec in args.models:
        name, path = parse_spec(spec)
        if name in models:
            raise DataError(f"--models: two models named '{name}': use name=path")
        if path == "teacher":
            models[name] = ("teacher", path)
        elif not os.path.exists(path):
            raise DataError(f"--models: {path}: no such file or directory")
        elif os.path.isdir(path) or path.endswith(".gguf"):
            models[name] = ("checkpoint", path)
        elif path.endswith((".jsonl", ".json")):
            models[name] = ("answers", path)
        else:
            raise DataError(f"--models: {spec}: not 'teacher', a checkpoint directory, a .gguf or an answers file")
    no_ref = [s for s, rows in sets.items() if not all(r.get("teacher") for r in rows)]
    if ckpts and args.select_by in ("rougeL", *(f"p{n}" for n in range(1, MAX_N + 1))) and no_ref:
        raise DataError(f"--select-by {args.select_by} compares with the teacher's answers: test set '{no_ref[0]}' lacks some")
    if args.discriminator:
        check_discriminator(args.discriminator)
    return sets, models, ckpts


def check_discriminator(path):
    """load_model(path, Discriminator) gives a checkpoint without a score head a fresh random one (right
    for train_gad.py, which starts D from the student); here that would score noise, silently."""
    if path.endswith(".gguf"):
        raise DataError(f"--discriminator: {path} is a GGUF file, a generator, never a discriminator "
                        "(give a run's ckpt-NNNNNN/discriminator)")
    arch = read_json(os.path.join(resolve_checkpoint(path), "config.json")).get("architectures") or ["none"]
    if not any(a.endswith("ForSequenceClassification") for a in arch):
        raise DataError(f"--discriminator: {path} is a {arch[0]} checkpoint, not a discriminator (a "
                        "*ForSequenceClassification with a score head, such as a run's ckpt-NNNNNN/discriminator)")


def prompt_text(messages):
    """The question shown to the judge: the user turn, or the whole conversation."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def norm_text(s):
    return " ".join(s.split())


def match_answers(test_rows, ans_rows, path, set_name):
    """Answer text and cut flag for each test prompt: by id when the last user turn agrees too (ids
    from another source can collide), else by the last user turn's text."""
    last_user = lambda r: norm_text(next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user"))
    by_id, by_text = {}, {}
    for r in ans_rows:
        if isinstance(text := r.get("answer", r.get("teacher")), str):
            a = {"answer": text, "cut": r.get("finish_reason") == "length" or r.get("stopped") is False}
            by_id.setdefault(r["id"], (last_user(r), a))
            by_text.setdefault(last_user(r), a)
    out = []
    for r in test_rows:
        q, hit = last_user(r), by_id.get(r["id"])
        out.append(hit[1] if hit and hit[0] == q else by_text.get(q))
    missing = [r["id"] for r, a in zip(test_rows, out) if a is None]
    if missing:
        raise DataError(f"--models: {path} has no answer for {len(missing)} of {len(test_rows)} prompts "
                        f"of test set '{set_name}' (first missing id: {missing[0]})")
    return out


def teacher_answers(rows, set_name):
    bad = [r["id"] for r in rows if not r.get("teacher")]
    if bad:
        raise DataError(f"--models teacher: {len(bad)} rows of test set '{set_name}' have no `teacher` answer "
                        f"(first id: {bad[0]})")
    return [{"answer": r["teacher"], "cut": r.get("finish_reason") == "length"} for r in rows]


def cut_teacher(row, tok, n):
    """The row with its teacher answer cut to n tokens and marked cut, as train_gad.py cuts it for
    training: what a student that samples at most n tokens is compared with."""
    ids = tok.encode(row.get("teacher") or "", add_special_tokens=False)
    if len(ids) <= n:
        return row
    return {**row, "teacher": tok.decode(ids[:n], skip_special_tokens=True), "finish_reason": "length"}


# -----------------------------------------------------------------------------
# answers: generated from checkpoints (cached), read from files, or the teacher's

def fingerprint(path):
    """Names, sizes and mtimes of a checkpoint's files: a checkpoint retrained into the same path must
    not be served from the cache."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".gguf", ".json")))
    blob = ";".join(f"{os.path.basename(f)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def torch_setup(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))


def generate_answers(name, path, rows, args, store):
    """Answers of checkpoint `path` (model `name`) for `rows`; only prompts missing from the cache are sampled."""
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed if args.temperature > 0 else None}
    ckpt_id = [os.path.realpath(path), fingerprint(path)]
    keys = [hashlib.sha256(json.dumps([ckpt_id, r["id"], r["messages"], settings], sort_keys=True).encode()).hexdigest()
            for r in rows]
    todo = [i for i, k in enumerate(keys) if k not in store]
    if todo:
        device, dtype = torch_setup(args)
        tok = load_tokenizer(path)
        model = load_model(path, dtype=dtype, device=device).eval()
        stop, prompts = stop_token_ids(tok, path), {i: render_prompt(tok, rows[i]["messages"]) for i in todo}
        todo.sort(key=lambda i: -len(prompts[i]))  # similar lengths per batch: less padding
        for b in tqdm(range(0, len(todo), args.batch_size), desc=f"generate {name}", unit="batch"):
            batch = todo[b:b + args.batch_size]
            outs = generate(model, [prompts[i] for i in batch], n=1, stop_ids=stop, **settings)
            for i, o in zip(batch, outs):  # cached batch by batch: Ctrl-C loses one batch at most
                toks = o.tokens[:-1] if o.stopped else o.tokens
                store.append({"key": keys[i], "checkpoint": ckpt_id[0], "id": rows[i]["id"], "settings": settings,
                              "answer": tok.decode(toks, skip_special_tokens=True), "n_tokens": len(toks),
                              "stopped": bool(o.stopped)})
    return [{"answer": store.records[k]["answer"], "cut": not store.records[k]["stopped"]} for k in keys]


def collect_answers(models, sets, args):
    """{(set, model): [{answer, cut}] in the set's order}; also written to <out-dir>/answers/."""
    answers = {}
    generating = any(kind == "checkpoint" for kind, _ in models.values())  # else no cache file is made
    with closing(JsonlStore(os.path.join(args.out_dir, "generations.jsonl"))) if generating else nullcontext() as store:
        for m, (kind, path) in models.items():
            ans_rows = load_rows(path, "--models") if kind == "answers" else None
            for s, rows in sets.items():
                if kind == "teacher":
                    answers[s, m] = teacher_answers(rows, s)
                elif kind == "answers":
                    answers[s, m] = match_answers(rows, ans_rows, path, s)
                else:
                    answers[s, m] = generate_answers(m, path, rows, args, store)
                write_atomic(os.path.join(args.out_dir, "answers", f"{m}__{s}.jsonl"), jsonl(
                    {"id": r["id"], "messages": r["messages"], "answer": a["answer"], "model": m,
                     "finish_reason": "length" if a["cut"] else "stop"} for r, a in zip(rows, answers[s, m])))
    return answers


def discriminator_scores(path, rows, answers, args):
    """Raw D(prompt, answer). The answer ends with the end-of-turn token unless it was cut,
    exactly like the training data (EOS symmetry)."""
    from discriminator import Discriminator  # here: evaluating without a discriminator needs none of it
    device, dtype = torch_setup(args)
    tok = load_tokenizer(path)
    disc, eot = load_model(path, Discriminator, dtype=dtype, device=device).eval(), end_of_turn_id(tok)
    seqs = [torch.tensor(render_prompt(tok, r["messages"]) + tok.encode(a["answer"], add_special_tokens=False)
                         + ([] if a["cut"] else [eot])) for r, a in zip(rows, answers)]
    scores = []
    for b in range(0, len(seqs), args.batch_size):
        batch = seqs[b:b + args.batch_size]
        ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True).to(device)  # D reads each row's length
        with torch.no_grad():
            scores += disc(ids, torch.tensor([len(s) for s in batch], device=device)).float().cpu().tolist()
    return scores


# -----------------------------------------------------------------------------
# the judge

SCORE = r"(\d+(?:\.\d+)?)\s*(?:/\s*10\b|out of 10\b)?"
LABELLED = re.compile(r"\b(?:assistant|answer|response)\s*#?\s*([12])\b(?:'s)?(?:\s*(?:score|rating))?\s*[:=(\-–]?\s*"
                      + SCORE, re.I)
NUMBERED = re.compile(r"^\s*([12])\s*[.):]\s*" + SCORE + r"\s*$", re.M)


def parse_scores(text):
    """The two scores of a judge reply (Assistant 1's, Assistant 2's); ValueError for anything else,
    and the reply is asked for again. The protocol asks for them alone on the first line ("8 7", also
    read as "8/10 7/10" or "**8** **7**"). Replies that label them ("Assistant 1: 8/10" and "Assistant 2:
    6/10", on one line or two) or number them ("1. 8" and "2. 6") are read by their labels, in the
    opening lines; a number that belongs to a label is never taken for a score."""
    lines = [l.replace("*", "").strip() for l in text.splitlines() if l.strip()]
    head = "\n".join(lines[:3])
    for pattern in (LABELLED, NUMBERED):
        found = {}
        for label, score in pattern.findall(head):
            found.setdefault(label, set()).add(float(score))
        if found:
            if sorted(found) != ["1", "2"] or any(len(v) > 1 for v in found.values()):
                raise ValueError(f"not one score for each assistant: {head[:80]!r}")
            return check_scores((found["1"].pop(), found["2"].pop()), head)
    first = lines[0] if lines else ""
    if re.search(r"assistant|answer|response", first, re.I):  # labelled in a way not read above
        raise ValueError(f"first line is not two scores: {first[:80]!r}")
    nums = re.findall(SCORE, first)
    if len(nums) != 2:
        raise ValueError(f"first line is not two scores: {first[:80]!r}")
    return check_scores(tuple(map(float, nums)), first)


def check_scores(s, where):
    if not all(0 <= x <= 10 for x in s) or sum(s) == 0:
        raise ValueError(f"scores out of range: {where[:80]!r}")
    return s


def pair_messages(question, a1, a2):
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(question=question, answer_1=a1, answer_2=a2, prompt=JUDGE_PROMPT)}]


def run_calls(client, args, calls, store, kind):
    """Make the uncached calls {key: (messages, max_tokens, validate)} on a thread pool, caching each
    reply as it comes. Returns ({key: text}, {key: why it failed}); failures are not cached, so a rerun
    tries them again."""
    todo = [k for k in calls if k not in store]
    if todo:
        print(f"judge: {len(todo)} {kind} calls to {args.judge_model} ({len(calls) - len(todo)} cached)", flush=True)

    def call(k):
        msgs, max_tokens, validate = calls[k]
        try:
            r = chat_with_retry(client, args.judge_model, msgs, temperature=args.judge_temperature,
                                   max_tokens=max_tokens, retries=args.judge_retries, validate=validate)
        except RetryError as e:
            return str(e)
        store.append({"key": k, "kind": kind, "judge": args.judge_model, **r})

    errors = run_pool(todo, call, concurrency=args.judge_workers, desc=kind, unit="call")
    return {k: store.records[k]["text"] for k in calls if k in store}, dict(zip(todo, errors))


def judge(client, args, store, sets, answers):
    """Per (set, model): one record per prompt, {"id", "score", "order1": [s_model, s_ref], ...}."""
    key = lambda msgs, max_tokens: request_key(args.judge_model, msgs, {"temperature": args.judge_temperature,
                                                                           "max_tokens": max_tokens})
    # 1. the judge's own reference answer, once per prompt, shared by every model
    ref_key = {(s, r["id"]): key(r["messages"], args.judge_max_tokens) for s, rows in sets.items() for r in rows}
    refs, ref_failed = run_calls(client, args, {ref_key[s, r["id"]]: (r["messages"], args.judge_max_tokens, None)
                                                for s, rows in sets.items() for r in rows}, store, "reference")
    # 2. one pairwise prompt per answer and order; 1 = model first (paper order), 2 = swapped
    orders = (1, 2) if args.both_orders else (1,)
    calls, plan = {}, {}
    for (s, m), ans in answers.items():
        for r, a in zip(sets[s], ans):
            ref = refs.get(ref_key[s, r["id"]])
            for o in orders if ref is not None else ():
                pair = (a["answer"], ref) if o == 1 else (ref, a["answer"])
                msgs = pair_messages(prompt_text(r["messages"]), *pair)
                plan[s, m, r["id"], o] = k = key(msgs, JUDGE_PAIR_MAX_TOKENS)
                calls[k] = (msgs, JUDGE_PAIR_MAX_TOKENS, parse_scores)
    texts, failed = run_calls(client, args, calls, store, "judgment")
    out = {}
    for (s, m) in answers:
        out[s, m] = recs = []
        for r in sets[s]:
            rec, rk = {"id": r["id"], "score": None}, ref_key[s, r["id"]]
            recs.append(rec)
            if rk not in refs:
                rec["failed"] = f"reference: {ref_failed.get(rk)}"
                continue
            for o in orders:
                if (k := plan[s, m, r["id"], o]) not in texts:
                    rec["failed"] = f"order {o}: {failed.get(k)}"
                    break
                s1, s2 = parse_scores(texts[k])
                rec[f"order{o}"] = [s1, s2] if o == 1 else [s2, s1]  # [model, reference]
            else:
                rec["score"] = float(np.mean([100 * rec[f"order{o}"][0] / sum(rec[f"order{o}"]) for o in orders]))
    return out


# -----------------------------------------------------------------------------
# the oracle judge: exact KLs to a local teacher (oracle.py), and how the samples loop

def oracle_temperature(args, rows, set_name):
    """--oracle-temperature, else the temperature the test set's teacher answers were sampled at."""
    if args.oracle_temperature is not None:
        return args.oracle_temperature
    found = {r.get("temperature") for r in rows}
    if len(found) != 1 or None in found:
        raise DataError(f"--oracle: test set '{set_name}' does not say at what temperature its answers were sampled "
                        "(a 'temperature' field in every row, one value): give --oracle-temperature")
    return float(found.pop())


def check_oracle_vocab(args, models):
    """A KL between two vocabularies means nothing: every checkpoint must read the oracle's tokens."""
    vocab = load_tokenizer(args.oracle).get_vocab()
    for m, (kind, path) in models.items():
        if kind == "checkpoint" and load_tokenizer(path).get_vocab() != vocab:
            raise DataError(f"--oracle {args.oracle}: its tokenizer differs from that of --models {m} ({path}); "
                            "a KL over two vocabularies means nothing")


def sample_stats(samples, tok, n_prompts, k):
    """Per prompt, the fraction of its k samples that loop and their mean distinct-2."""
    texts = [tok.decode(x.tokens[:-1] if x.stopped else x.tokens, skip_special_tokens=True) for x in samples]
    loops = [float(np.mean([has_loop(t) for t in texts[i * k:(i + 1) * k]])) for i in range(n_prompts)]
    d2 = [float(np.mean([distinct2(t) for t in texts[i * k:(i + 1) * k]])) for i in range(n_prompts)]
    return loops, d2


def oracle_judge(args, sets, models, answers):
    """{(set, model): per-prompt oracle records}: forward and reverse KL at each --oracle-taus, loops and
    distinct-2 of the samples; and, as model "oracle", the teacher model's own greedy and sampled answers
    (with its hidden system prompt), the yardstick for loops."""
    device, dtype = torch_setup(args)
    otok = load_tokenizer(args.oracle)
    oracle = load_model(args.oracle, dtype=dtype, device=device).eval()
    eot, ostop, taus, k = end_of_turn_id(otok), stop_token_ids(otok, args.oracle), args.oracle_taus, args.oracle_samples
    per = {}
    for s, rows in sets.items():
        T = oracle_temperature(args, rows, s)
        o_prompts = [render_prompt(otok, ([{"role": "system", "content": sy}] if (sy := args.oracle_system or
                                          r.get("system")) else []) + r["messages"]) for r in rows]
        # the teacher's answers ending like a sample that stopped, unless they were cut
        t_ans = [otok(r["teacher"], add_special_tokens=False)["input_ids"]
                 + ([] if r.get("finish_reason") == "length" else [eot]) for r in rows]
        greedy = generate(oracle, o_prompts, max_new_tokens=args.max_new_tokens, temperature=0, stop_ids=ostop)
        loops, d2 = sample_stats(generate(oracle, o_prompts, n=k, max_new_tokens=args.max_new_tokens, temperature=T,
                                          stop_ids=ostop, seed=args.seed), otok, len(rows), k)
        g_loops, g_d2 = sample_stats(greedy, otok, len(rows), 1)
        per[s, "oracle"] = [{"id": r["id"], "loop": g_loops[i], "distinct2": g_d2[i], "loop_sampled": {T: loops[i]},
                             "distinct2_sampled": {T: d2[i]}} for i, r in enumerate(rows)]
        for m, (kind, path) in models.items():
            if kind != "checkpoint":
                continue
            student, tok = load_model(path, dtype=dtype, device=device).eval(), load_tokenizer(path)
            stop = stop_token_ids(tok, path)
            s_prompts = [render_prompt(tok, r["messages"]) for r in rows]
            fwd = kl_along(student, taus, [p + a for p, a in zip(s_prompts, t_ans)], oracle, T,
                           [p + a for p, a in zip(o_prompts, t_ans)], list(map(len, t_ans)), "forward", device)
            recs = [{"id": r["id"], "forward_kl": {tau: fwd[tau][i] for tau in taus}, "reverse_kl": {},
                     "loop_sampled": {}, "distinct2_sampled": {}} for i, r in enumerate(rows)]
            for tau in tqdm(taus, desc=f"oracle {m}", unit="tau"):
                xs = generate(student, s_prompts, n=k, max_new_tokens=args.max_new_tokens, temperature=tau,
                              stop_ids=stop, seed=args.seed)
                rev = kl_along(student, [tau], [s_prompts[x.prompt_index] + x.tokens for x in xs], oracle, T,
                               [o_prompts[x.prompt_index] + x.tokens for x in xs], [len(x.tokens) for x in xs],
                               "reverse", device)[tau]
                loops, d2 = sample_stats(xs, tok, len(rows), k)
                for i, rec in enumerate(recs):
                    rec["reverse_kl"][tau] = float(np.mean(rev[i * k:(i + 1) * k]))
                    rec["loop_sampled"][tau], rec["distinct2_sampled"][tau] = loops[i], d2[i]
            per[s, m] = recs
            del student
    return per


def paired(per, sets, specs, args):
    """For each --paired A:B, per test set and metric and tau, the mean over prompts of A minus B with a
    bootstrap interval over the same prompts; A and B may each be several models joined by + (seeds), whose
    values are averaged per prompt first."""
    out = {}
    for spec in specs:
        a, b = ([n for n in side.split("+")] for side in spec.split(":"))
        for s in sets:
            recs = {m: per.get((s, m)) for m in a + b}
            if any(r is None for r in recs.values()):
                continue
            res = out.setdefault(s, {}).setdefault(spec.replace(":", " - "), {})
            for key in ("forward_kl", "reverse_kl", "loop_sampled"):
                for tau in recs[a[0]][0][key]:
                    diff = [np.mean([recs[m][i][key][tau] for m in a]) - np.mean([recs[m][i][key][tau] for m in b])
                            for i in range(len(sets[s]))]
                    res.setdefault(key, {})[tau] = bootstrap([(100.0 if key == "loop_sampled" else 1.0) * d
                                                              for d in diff], None, args.bootstrap, args.seed)
    return out


def oracle_markdown(results, models, sets, pairs):
    parts = []
    for s in sets:
        ms = [m for m in models if "forward_kl" in results[s][m]]
        if not ms:
            continue
        taus = list(results[s][ms[0]]["forward_kl"])
        head = ([f"forward KL, tau {t}" for t in taus] + [f"reverse KL, tau {t}" for t in taus] + ["greedy loops (%)"]
                + [f"sampled loops (%), tau {t}" for t in taus])
        rows = [f"| {m} | " + " | ".join([cell(results[s][m][key][t], fmt) for key, fmt in (
            ("forward_kl", "{:.3f}"), ("reverse_kl", "{:.3f}")) for t in taus] + [cell(results[s][m]["loop"], "{:.1f}")]
            + [cell(results[s][m]["loop_sampled"][t], "{:.1f}") for t in taus]) + " |" for m in ms]
        o = results[s]["oracle"]
        (T, o_loop), = o["loop_sampled"].items()
        parts.append("\n".join([f"### oracle: {s} (n={len(sets[s])})", "", "| model | " + " | ".join(head) + " |",
                                 "|---|" + "---|" * len(head), *rows, "",
                                 f"The teacher model itself: greedy loops {cell(o['loop'], '{:.1f}')}%, sampled at its "
                                 f"temperature {T} {cell(o_loop, '{:.1f}')}%."]))
        for name, res in (pairs.get(s) or {}).items():
            parts.append(f"Paired difference {name} on {s}, over the same prompts: " + "; ".join(
                f"{key} at tau {t} {cell(v, '{:+.1f}' if key == 'loop_sampled' else '{:+.3f}')}"
                for key, by_tau in res.items() for t, v in by_tau.items()))
    return "\n\n".join(parts) + "\n" if parts else ""


# -----------------------------------------------------------------------------
# summaries, tables, charts

def distinct2(text):
    """Distinct word pairs of an answer over its word pairs (1 for an answer of fewer than two words)."""
    w = re.findall(r"\w+", text.lower())
    pairs = list(zip(w, w[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def per_prompt_metrics(rows, answers, count, markers, vs_teacher):
    """Judge-free metrics of one model's answers on one test set, one record per prompt."""
    out = []
    for r, a in zip(rows, answers):
        p = {"id": r["id"], "len": count(a["answer"]), "cut": a["cut"], "loop": has_loop(a["answer"]),
             "distinct2": distinct2(a["answer"])}
        if markers is not None:
            p["marker"] = bool(markers.search(a["answer"]))
        if vs_teacher and r.get("teacher"):
            p["rougeL"] = 100 * rouge_l(a["answer"], r["teacher"])
            p["ngram"] = [clipped_ngram_matches(words(a["answer"]), words(r["teacher"]), n) for n in range(1, MAX_N + 1)]
        out.append(p)
    return out


def summarize(per, args):
    """Per-prompt records of one (set, model) -> {metric: {mean, lo, hi, n}, ...}."""
    b = lambda num, den=None: bootstrap(num, den, args.bootstrap, args.seed)
    res = {"len": b([p["len"] for p in per]), "cut": b([100.0 * p["cut"] for p in per])} if per and "len" in per[0] else {}
    if per and "loop" in per[0]:
        res["loop"], res["distinct2"] = b([100.0 * p["loop"] for p in per]), b([100.0 * p["distinct2"] for p in per])
    for key in ORACLE:  # per tau
        if per and key in per[0]:
            scale = 100.0 if key in ("loop_sampled", "distinct2_sampled") else 1.0
            res[key] = {tau: b([scale * p[key][tau] for p in per]) for tau in per[0][key]}
    if any("marker" in p for p in per):
        res["marker"] = b([100.0 * p["marker"] for p in per])
    if with_ref := [p for p in per if "rougeL" in p]:
        res["rougeL"] = b([p["rougeL"] for p in with_ref])
        for n in range(1, MAX_N + 1):
            res[f"p{n}"] = b([100.0 * p["ngram"][n - 1][0] for p in with_ref], [p["ngram"][n - 1][1] for p in with_ref])
    if any("dscore" in p for p in per):
        res["dscore"] = b([p["dscore"] for p in per])
    if any("judge" in p for p in per):
        ok = [p["judge"] for p in per if p["judge"]["score"] is not None]
        res["judge"] = j = b([x["score"] for x in ok])
        j["n_failed"] = len(per) - len(ok)
        j["failed"] = {p["id"]: p["judge"]["failed"] for p in per if p["judge"]["score"] is None}
        j["s_model"] = float(np.mean([x["order1"][0] for x in ok])) if ok else None
        j["s_ref"] = float(np.mean([x["order1"][1] for x in ok])) if ok else None
        if args.both_orders and ok:
            # how much the judge favours Assistant 1: the position bias the second order cancels
            j["order1_score"] = float(np.mean([100 * x["order1"][0] / sum(x["order1"]) for x in ok]))
            j["order2_score"] = float(np.mean([100 * x["order2"][0] / sum(x["order2"]) for x in ok]))
    return res


def cell(m, fmt):
    """One table cell: mean [interval]; empty where the metric does not apply (a model against itself)."""
    if m is None:
        return ""
    s = "-" if m["mean"] is None else f"{fmt.format(m['mean'])} [{fmt.format(m['lo'])}, {fmt.format(m['hi'])}]"
    return s + (f" ({m['n_failed']} failed)" if m.get("n_failed") else "")


def markdown(results, models, sets, unit):
    parts = []
    for key, (title, fmt) in METRICS.items():
        if any(key in results[s][m] for s in sets for m in models):
            rows = [f"| {m} | " + " | ".join(cell(results[s][m].get(key), fmt) for s in sets) + " |" for m in models]
            parts.append("\n".join([f"### {title.format(unit=unit)}", "", "| model | " + " | ".join(
                f"{s} (n={len(sets[s])})" for s in sets) + " |", "|---|" + "---|" * len(sets), *rows]))
    return "Mean [95% bootstrap interval]\n\n" + "\n\n".join(parts) + "\n"


def interval(vals):
    """Means and error-bar half-widths of bootstrap records; NaN, drawn as nothing, where absent."""
    vals = [v if v and v["mean"] is not None else {"mean": np.nan, "lo": np.nan, "hi": np.nan} for v in vals]
    mean = np.array([v["mean"] for v in vals])
    return mean, np.nan_to_num([mean - [v["lo"] for v in vals], [v["hi"] for v in vals] - mean])


def plot_results(plt, results, models, sets, path, unit):
    keys = [k for k in ("judge", "rougeL", "p4", "marker", "len") if any(k in results[s][m] for s in sets for m in models)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    width = 0.8 / len(models)
    for ax, key in zip(axes[0], keys):
        for j, m in enumerate(models):
            mean, err = interval([results[s][m].get(key) for s in sets])
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(sets))]
            ax.bar(xs, mean, width, yerr=err, capsize=2, label=m)
        if key == "judge":
            ax.axhline(50, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(sets)), list(sets), rotation=20)
        ax.set_title(METRICS[key][0].format(unit=unit), fontsize=9)
    axes[0][0].legend(fontsize=8)
    save_png(plt, fig, path)


def plot_checkpoints(plt, results, ckpts, others, sets, key, best, path, unit):
    """The --select-by score of each checkpoint against its step with its 95% interval, one line per
    test set; the other models (the teacher, a baseline) as dashed levels."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = [step for step, _ in ckpts.values()]
    for s in sets:
        mean, err = interval([results[s][c].get(key) for c in ckpts])
        line, = ax.plot(steps, mean, marker="o", label=s)
        ax.fill_between(steps, mean - err[0], mean + err[1], color=line.get_color(), alpha=0.2)
        for m in others:
            if (results[s][m].get(key) or {}).get("mean") is not None:
                ax.axhline(results[s][m][key]["mean"], color=line.get_color(), ls="--", lw=0.8, label=f"{m} ({s})")
    if best:
        ax.axvline(ckpts[best][0], color="gray", ls=":", label=f"best: {best}")
    ax.set(xlabel="step", title=METRICS[key][0].format(unit=unit))
    ax.legend(fontsize=8)
    save_png(plt, fig, path)


# -----------------------------------------------------------------------------

def plot_oracle(plt, results, models, sets, path):
    """Reverse against forward KL, one line per model through its sampling temperatures (Caccia et al.
    2018: a model is a curve, not a point); lower left is closer to the teacher both ways."""
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.5), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for m in (m for m in models if "forward_kl" in results[s][m]):
            taus = list(results[s][m]["forward_kl"])
            x = [results[s][m]["forward_kl"][t]["mean"] for t in taus]
            y = [results[s][m]["reverse_kl"][t]["mean"] for t in taus]
            line, = ax.plot(x, y, marker="o", label=m)
            for t, xi, yi in zip(taus, x, y):
                ax.annotate(f"{t:g}", (xi, yi), fontsize=7, color=line.get_color(), xytext=(3, 3),
                            textcoords="offset points")
        ax.set(xlabel="forward KL(teacher || student), nats/token", ylabel="reverse KL(student || teacher), nats/token",
               title=f"{s}: the oracle, across student temperatures")
        ax.legend(fontsize=8)
    save_png(plt, fig, path)


def select_checkpoint(results, ckpts, sets, key):
    """The checkpoint with the highest mean `key` over the test sets (max() keeps the first of equals:
    the earlier step). Returns (its record for results.json, the line that names it)."""
    scores = {c: float(np.mean(means)) for c in ckpts
              if None not in (means := [(results[s][c].get(key) or {}).get("mean") for s in sets])}
    if not scores:  # the judge failed on every prompt: the exit status says so
        return {"by": key, "best": None, "scores": {}}, f"no checkpoint has a {key} score: none named best"
    best = max(scores, key=scores.get)
    (step, path), fmt = ckpts[best], METRICS[key][1]
    if len(sets) == 1:
        how = key + " " + cell(results[next(iter(sets))][best][key], fmt)
    else:
        how = f"mean {key} over {len(sets)} test sets {fmt.format(scores[best])}"
    line = f"best checkpoint by {key}: {os.path.dirname(path)} (step {step}; {how})"
    return {"by": key, "best": best, "step": step, "path": path, "scores": scores}, line


def evaluate(args):
    """Everything but --plot-metrics; returns the exit status."""
    sets, models, ckpts = load_inputs(args)
    try:  # before any model loads: a bad --out-dir costs nothing
        os.makedirs(os.path.join(args.out_dir, "answers"), exist_ok=True)
    except OSError as e:
        why = "exists and is not a directory" if os.path.isfile(args.out_dir) else f"cannot be created ({e.strerror})"
        raise DataError(f"--out-dir {args.out_dir}: {why}") from None
    if args.oracle:
        check_oracle_vocab(args, models)
        names = set(models)
        for spec in args.paired:
            sides = spec.split(":")
            if len(sides) != 2 or not all(n in names for side in sides for n in side.split("+")):
                raise DataError(f"--paired {spec}: A:B with A and B among --models ({', '.join(names)}), joined by +")
    if args.judge:  # now, not after an hour of generation: a missing key shows at once
        client = make_client(args.judge_base_url, args.judge_api_key_env, timeout=args.judge_timeout,
                                max_retries=args.judge_retries, flag="--judge-api-key-env")
    tok_name, tok_path = next(((m, p) for m, (k, p) in models.items() if k == "checkpoint"), (None, None))
    if args.tokenizer:
        tok_name, tok_path = parse_spec(args.tokenizer)[0], args.tokenizer
    tok = load_tokenizer(tok_path) if tok_path else None
    if args.teacher_max_tokens:
        if tok is None:
            raise DataError("--teacher-max-tokens counts tokens: give --tokenizer or a checkpoint")
        sets = {s: [cut_teacher(r, tok, args.teacher_max_tokens) for r in rows] for s, rows in sets.items()}
    count = (lambda t: len(tok.encode(t, add_special_tokens=False))) if tok else (lambda t: len(t.split()))
    markers = re.compile(r"\b(" + "|".join(map(re.escape, args.markers)) + r")\b", re.I) if args.markers else None

    answers = collect_answers(models, sets, args)
    per = {(s, m): per_prompt_metrics(sets[s], ans, count, markers, vs_teacher=models[m][0] != "teacher")
           for (s, m), ans in answers.items()}
    if args.discriminator:
        for (s, m), ans in tqdm(answers.items(), desc="discriminator", unit="set"):
            for p, d in zip(per[s, m], discriminator_scores(args.discriminator, sets[s], ans, args)):
                p["dscore"] = d
    if args.oracle:
        for (s, m), recs in oracle_judge(args, sets, models, answers).items():
            if m == "oracle":
                per[s, m] = recs
            else:
                for p, o in zip(per[s, m], recs):
                    p.update(o)
    if args.judge:
        with closing(JsonlStore(os.path.join(args.out_dir, "judge_cache.jsonl"))) as store:
            for k, recs in judge(client, args, store, sets, answers).items():
                for p, j in zip(per[k], recs):
                    p["judge"] = j

    names = list(models) + (["oracle"] if args.oracle else [])
    results = {s: {m: summarize(per[s, m], args) for m in names} for s in sets}
    unit = f"tokens, {tok_name} tokenizer" if tok_path else "whitespace words"
    out = {"config": {**{k: v for k, v in vars(args).items() if k not in ("plot_metrics", "plot_out")},
                      "judge_base_url": redact_url(args.judge_base_url),
                      "length_unit": unit, "tokenizer": tok_path},
           "models": {m: {"kind": k, "path": p, **({"step": ckpts[m][0]} if m in ckpts else {})} for m, (k, p) in models.items()},
           "test_sets": {s: len(r) for s, r in sets.items()}, "results": results,
           "per_prompt": {s: {m: per[s, m] for m in names} for s in sets}}
    if args.oracle:
        out["paired"] = pairs = paired(per, sets, args.paired, args)
    best_line = ""
    if ckpts:
        out["selection"], best_line = select_checkpoint(results, ckpts, sets, args.select_by)
    md = markdown(results, list(models), sets, unit)
    if args.oracle:
        md += "\n" + oracle_markdown(results, list(models), sets, pairs)
    write_atomic(os.path.join(args.out_dir, "results.json"), json.dumps(out, indent=1).encode())
    write_atomic(os.path.join(args.out_dir, "results.md"), (md + (f"\n{best_line}\n" if best_line else "")).encode())
    written = ["results.json", "results.md"]
    if (plt := pyplot()) is None:
        print("note: matplotlib is not installed, no charts written")
    else:
        plot_results(plt, results, list(models), sets, os.path.join(args.out_dir, "results.png"), unit)
        written.append("results.png")
        if ckpts:
            plot_checkpoints(plt, results, ckpts, [m for m in models if m not in ckpts], sets, args.select_by,
                             out["selection"]["best"], os.path.join(args.out_dir, "checkpoints.png"), unit)
            written.append("checkpoints.png")
        if args.oracle:
            plot_oracle(plt, results, list(models), sets, os.path.join(args.out_dir, "oracle.png"))
            written.append("oracle.png")
    print(md)
    print(f"wrote {args.out_dir}/" + ", ".join(written))
    short = []
    for s in sets:
        for m in models:
            if (j := results[s][m].get("judge")) and j["n_failed"]:
                print(f"warning: judge failed on {j['n_failed']} prompts of {m} on {s} (listed in results.json)")
                if j["n"] < args.min_judged * len(sets[s]):
                    short.append(f"{j['n']} of {len(sets[s])} prompts of {m} on {s}")
    if best_line:
        print(best_line)
    if short:
        sys.stdout.flush()
        print(f"{PROG}: failed: the judge scored only {'; '.join(short)}, below --min-judged {args.min_judged} "
              "(results are written; a rerun retries the failed calls)", file=sys.stderr)
        return 3
    return 0


def float_list(text):
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of positive numbers is expected")
    return values


def word_list(text):
    """--markers: comma-separated words (the types for numbers and key names are flags.py's)."""
    if not (markers := [m.strip() for m in text.split(",") if m.strip()]):
        raise argparse.ArgumentTypeError("a comma-separated list of words is expected")
    return markers


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--models", nargs="+", default=[], help="[name=]spec: teacher, a checkpoint, or an answers file")
    a("--test-sets", nargs="+", default=[], help="[name=]file: our JSONL or an importable format")
    a("--run", help="a train_gad.py --out-dir: score each ckpt-*/generator, name the best")
    a("--select-by", choices=[k for k in METRICS if k not in ("len", "cut")],
      help="the score that picks the best checkpoint (default: judge with --judge, else rougeL)")
    a("--out-dir", help="default: out/eval, or RUN/eval with --run")
    a("--limit", type=POS_INT, help="only the first N prompts of each test set")
    # generation
    a("--max-new-tokens", type=POS_INT, default=1536)
    a("--temperature", type=NONNEG, default=0.0, help="0 = greedy (the paper)")
    a("--top-p", type=number(float, above=0, high=1), default=1.0)
    a("--seed", type=int, default=0, help="sampling and bootstrap seed")
    a("--batch-size", type=POS_INT, default=16)
    a("--device", help="default: cuda when available, else cpu")
    a("--dtype", choices=["float32", "bfloat16", "float16"])
    a("--tokenizer", help="counts lengths and --teacher-max-tokens; default: the first checkpoint's")
    a("--teacher-max-tokens", type=POS_INT, help="cut the teacher's answers to N tokens (counted as cut); set it "
      "to the students' --max-new-tokens to compare like with like")
    a("--markers", type=word_list, help="comma-separated words: adds the marker (persona) rate")
    # judge
    a("--judge", action="store_true", help="score with the judge (costs API calls)")
    a("--judge-model", default="gpt-4o")
    a("--judge-base-url", help="any OpenAI-compatible endpoint")
    a("--judge-api-key-env", type=key_env, default="OPENAI_API_KEY", help="the NAME of the variable holding the key")
    a("--judge-temperature", type=NONNEG, default=0.0)
    a("--judge-max-tokens", type=POS_INT, default=2048, help="for the judge's reference answers")
    a("--judge-workers", type=POS_INT, default=8)
    a("--judge-retries", type=NONNEG_INT, default=6, help="per call: transport errors and unusable replies together")
    a("--judge-timeout", type=POS, default=120.0, help="seconds per HTTP request")
    a("--min-judged", type=FRACTION, default=0.9,
      help="exit 3 when the judge scored fewer than this fraction of some model's prompts on some set")
    a("--both-orders", action="store_true", help="also judge with the answers swapped, and average")
    # the oracle judge, for a teacher that is a local model (oracle.py)
    a("--oracle", help="the teacher model (a checkpoint or .gguf): exact forward and reverse KL of each checkpoint "
      "to it, and the loops of their samples")
    a("--oracle-system", help="the teacher's hidden system prompt (default: each row's 'system' field)")
    a("--oracle-temperature", type=POS, help="the teacher's temperature (default: the rows' 'temperature' field, "
      "the one the answers were sampled at)")
    a("--oracle-taus", type=float_list, default=float_list("0.5,0.7,1.0"), help="student sampling temperatures, "
      "comma-separated: one temperature misleads (Caccia et al. 2018)")
    a("--oracle-samples", type=POS_INT, default=2, help="student samples per prompt and temperature for the reverse KL")
    a("--paired", nargs="+", default=[], metavar="A:B", help="with --oracle: the difference A minus B over the same "
      "prompts, with its interval; A and B may be several models joined by + (seeds), averaged per prompt")
    # the rest
    a("--discriminator", help="a discriminator checkpoint (ckpt-*/discriminator): adds the mean D score")
    a("--bootstrap", type=POS_INT, default=1000, help="bootstrap resamples")
    a("--plot-metrics", help="train_gad.py's metrics.jsonl: draw the training curves")
    a("--plot-out", help="PNG for --plot-metrics (default: next to it)")
    args = p.parse_args(argv)
    if not (args.plot_metrics or args.test_sets):
        p.error("give --test-sets with --models and/or --run, or --plot-metrics")
    if bool(args.models or args.run) != bool(args.test_sets):
        p.error("--test-sets goes with --models and/or --run")
    args.select_by = args.select_by or ("judge" if args.judge else "rougeL")
    flag, given = {"judge": ("--judge", args.judge), "marker": ("--markers", args.markers),
                   "dscore": ("--discriminator", args.discriminator)}.get(args.select_by, ("", True))
    if args.run and not given:
        p.error(f"--select-by {args.select_by} needs {flag}")
    args.out_dir = args.out_dir or os.path.join(args.run or "out", "eval")
    if args.paired and not args.oracle:
        p.error("--paired compares the oracle's figures: it goes with --oracle")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.plot_metrics:
            plot_metrics(args.plot_metrics, args.plot_out or os.path.splitext(args.plot_metrics)[0] + ".png")
        return evaluate(args) if args.test_sets else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the caches in {args.out_dir} keep every answer and judgment made: "
              "rerun the same command to continue", file=sys.stderr)
        return 130
    # a full disk, an unwritable file (OSError): what was written before stays whole
    except (DataError, LoadError, FatalAPIError, OSError) as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    exit_now(main())  # not waiting for judge requests still in flight after an error or Ctrl-C
