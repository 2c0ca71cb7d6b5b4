"""
Evaluate checkpoints the way the GAD paper does, plus judge-free metrics; write tables and plots.

    # judge-free metrics only (offline): two checkpoints and the teacher on two test sets
    python evaluate.py --models out/gad/final seqkd=out/seqkd/final teacher \
        --test-sets dolly=data/dolly_test.jsonl vicuna=data/vicuna_test.jsonl --out-dir out/eval

    # add the paper's GPT-4o judge (any OpenAI-compatible endpoint; the key comes from $OPENAI_API_KEY)
    python evaluate.py --models out/gad/final teacher --test-sets data/lmsys_test.jsonl \
        --judge --judge-model gpt-4o --both-orders --out-dir out/eval

    # training curves of a train_gad.py run -> out/gad/metrics.png
    python evaluate.py --plot-metrics out/gad/metrics.jsonl

--models takes a list of `[name=]spec`; spec is one of
    teacher            the answers in the test set's `teacher` field
    DIR or FILE.gguf   a checkpoint model.py loads: answers are generated here (greedy, 1536 new
                       tokens by default) and cached in <out-dir>/generations.jsonl, keyed by the
                       checkpoint's files, the prompt and the generation settings
    FILE.jsonl/.json   an answers file: our JSONL (answer in `answer`, else `teacher`; this run's
                       answers/*.jsonl too) or any format prepare_teacher.py imports, e.g. AlpacaEval's
                       model_outputs.json; matched to prompts by id when the last user turn agrees
                       too, else by that turn's text
--test-sets takes `[name=]FILE` in our JSONL format or any single file prepare_teacher.py imports
(MiniLLM's dolly/self-inst/vicuna valid.jsonl, Self-Instruct's user_oriented_instructions.jsonl,
AlpacaEval, an Arena-Hard model_answer/X.jsonl with X's answers as the teacher's, FastChat
question.jsonl); a question file plus a separate answers file is first joined with
`prepare_teacher.py --import-only --answers`. Names default to the file's base name.

Judge protocol (MiniLLM / GAD), only with --judge: the judge writes its own reference answer for each prompt, then
scores (model answer = Assistant 1, reference = Assistant 2) from 1 to 10 in one pairwise prompt;
score = 100 * s_model / (s_model + s_ref), so 50 = parity. --both-orders also asks with the
answers swapped and averages the two, cancelling position bias. A reply whose first line is not
two scores is retried, then counted as failed and listed (a prompt fails if any order fails).
References and judgments are cached in <out-dir>/judge_cache.jsonl, so a rerun costs nothing.

Judge-free metrics, per answer, against the test set's teacher answer:
    len     answer length in tokens of the student tokenizer (--tokenizer, default: the first
            checkpoint's), else in whitespace-separated words
    cut     percent of answers cut at the length limit (generation did not stop; for answers
            files and the teacher: finish_reason == "length")
    p1..p6  BLEU's clipped n-gram precision, in percent, corpus level: over all prompts,
            sum of min(count in answer, count in teacher) / sum of n-grams in the answer. Words
            are lowercased \\w+ runs and single punctuation marks. No brevity penalty: a short
            answer can score high, so read it next to len.
    rougeL  ROUGE-L F1 in percent (LCS over the same words, beta = 1), mean over prompts
    dscore  mean raw discriminator score D(prompt, answer) when --discriminator is given
    judge   the judge score above, when --judge is given
Every mean comes with a 95% percentile bootstrap interval over prompts (seeded).
Outputs in --out-dir: results.json (every number, per prompt too), results.md (one table of
models x test sets per metric), results.png (needs matplotlib), answers/<model>__<set>.jsonl.
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter

import numpy as np
from tqdm import tqdm

import prepare_teacher as pt
from model import LoadError, Transformer, end_of_turn_id, generate, load_tokenizer, render_prompt, stop_token_ids

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
# metric key -> (table title, format); the order is the order of results.md
METRICS = {
    "judge": ("judge score (50 = parity with the judge's reference)", "{:.1f}"),
    "rougeL": ("ROUGE-L F1 vs teacher (%)", "{:.1f}"),
    **{f"p{n}": (f"clipped {n}-gram precision vs teacher (%)", "{:.1f}") for n in range(1, MAX_N + 1)},
    "len": ("answer length (tokens)", "{:.0f}"),
    "cut": ("answers cut at the length limit (%)", "{:.1f}"),
    "dscore": ("mean discriminator score", "{:.3f}"),
}


class EvalError(Exception):
    """Bad input or setup: main() prints it as one line and exits non-zero."""


# -----------------------------------------------------------------------------
# judge-free metrics

def words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def ngrams(toks, n):
    return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))


def clipped_ngram_matches(cand, ref, n):
    """(matches, total) for BLEU's modified precision: each answer n-gram counts at most as often
    as it appears in the reference. Kept as a pair so the corpus-level ratio can be bootstrapped."""
    c, r = ngrams(cand, n), ngrams(ref, n)
    return sum(min(k, r[g]) for g, k in c.items()), max(len(cand) - n + 1, 0)


def lcs_length(a, b):
    """Length of the longest common subsequence. This is the textbook DP table
    L[i][j] = L[i-1][j-1] + 1 if a[i] == b[j] else max(L[i-1][j], L[i][j-1]), computed one row at a
    time with the row packed into the bits of a Python int (Allison-Dix / Hyyro): a zero bit marks
    where the row steps up. A pure-Python double loop is ~300x slower on 1000-word answers
    (0.3 s per pair); tests check this against the plain DP."""
    if not a or not b:
        return 0
    match = {}
    for j, tok in enumerate(b):
        match[tok] = match.get(tok, 0) | (1 << j)
    full = (1 << len(b)) - 1
    row = full
    for tok in a:
        u = row & match.get(tok, 0)
        row = ((row + u) | (row - u)) & full
    return len(b) - bin(row).count("1")


def rouge_l(cand, ref):
    """ROUGE-L F1 (beta = 1) between two token lists, in [0, 1]."""
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(cand), lcs / len(ref)
    return 2 * p * r / (p + r)


def bootstrap(num, den=None, n_boot=1000, seed=0):
    """Mean of num (or sum(num)/sum(den), a corpus-level ratio) with a 95% percentile interval
    from resampling prompts with replacement."""
    num = np.asarray(num, dtype=np.float64)
    n = len(num)
    if n == 0 or (den is not None and np.sum(den) == 0):
        return {"mean": None, "lo": None, "hi": None, "n": n}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    if den is None:
        mean, stats = num.mean(), num[idx].mean(axis=1)
    else:
        den = np.asarray(den, dtype=np.float64)
        mean = num.sum() / den.sum()
        d = den[idx].sum(axis=1)
        stats = num[idx].sum(axis=1) / np.where(d > 0, d, np.nan)
        stats = stats[~np.isnan(stats)]
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": float(mean), "lo": float(lo), "hi": float(hi), "n": n}


# -----------------------------------------------------------------------------
# data: test sets, model specs, answers files

def parse_spec(spec):
    """`name=path` -> (name, path); a bare path -> (None, path)."""
    name, sep, rest = spec.partition("=")
    if sep and re.fullmatch(r"[\w.+-]+", name) and rest:
        return name, rest
    return None, spec


def default_name(path):
    base = os.path.basename(os.path.normpath(path))
    return re.sub(r"\.(jsonl|json|gguf)$", "", base) or path


def pt_call(fn, *args, flag):
    """prepare_teacher.py's readers exit with "prepare_teacher.py: file:line: why" on bad input: keep
    the why, name our flag."""
    try:
        return fn(*args)
    except SystemExit as e:
        raise EvalError(f"{flag}: {str(e).removeprefix(pt.PROG + ': ')}") from None


def load_rows(path, flag):
    """Rows in our data format from our JSONL or any format prepare_teacher.py imports."""
    if not os.path.isfile(path):
        raise EvalError(f"{flag}: {path}: no such file")
    rows = pt_call(pt.import_file, path, flag=flag)
    if not rows:
        raise EvalError(f"{flag}: {path}: no rows")
    return rows


def prompt_text(messages):
    """The question shown to the judge: the user turn, or the whole conversation when there is
    more than one turn."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def norm_text(s):
    return " ".join(s.split())


def last_user(messages):
    return norm_text(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))


def match_answers(test_rows, ans_rows, path, set_name):
    """Answer text and cut flag for each test prompt: by id when the last user turn agrees too (ids
    from another source can collide), else by the last user turn's text."""
    by_id, by_text = {}, {}
    for r in ans_rows:
        text = r.get("answer", r.get("teacher"))
        if not isinstance(text, str):
            continue
        a = {"answer": text, "cut": r.get("finish_reason") == "length" or r.get("stopped") is False}
        q = last_user(r["messages"]) if r.get("messages") else None
        by_id.setdefault(str(r.get("id")), (q, a))
        if q:
            by_text.setdefault(q, a)
    out, missing = [], []
    for r in test_rows:
        q = last_user(r["messages"])
        qa = by_id.get(str(r["id"]))
        a = qa[1] if qa and qa[0] in (None, q) else by_text.get(q)
        if a is None:
            missing.append(r["id"])
        out.append(a)
    if missing:
        raise EvalError(f"--models: {path} has no answer for {len(missing)} of {len(test_rows)} prompts "
                        f"of test set '{set_name}' (first missing id: {missing[0]})")
    return out


def teacher_answers(rows, set_name):
    bad = [r["id"] for r in rows if not (isinstance(r.get("teacher"), str) and r["teacher"])]
    if bad:
        raise EvalError(f"--models teacher: {len(bad)} rows of test set '{set_name}' have no `teacher` answer "
                        f"(first id: {bad[0]})")
    return [{"answer": r["teacher"], "cut": r.get("finish_reason") == "length"} for r in rows]


# -----------------------------------------------------------------------------
# generation from checkpoints, cached

def fingerprint(path):
    """Names, sizes and mtimes of a checkpoint's weight files: a retrained checkpoint written to
    the same path must not be served from the cache."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path)
        if f.endswith((".safetensors", ".gguf", ".bin", ".json")))
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def gen_settings(args):
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "seed": args.seed if args.temperature > 0 else None}


def gen_key(ckpt_id, row, settings):
    blob = json.dumps([ckpt_id, str(row["id"]), row["messages"], settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def torch_setup(args):
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return torch, device, getattr(torch, dtype)


def generate_answers(path, rows, args, store):
    """Answers of checkpoint `path` for `rows`; only prompts missing from the cache are sampled."""
    settings = gen_settings(args)
    ckpt_id = [os.path.realpath(path), fingerprint(path)]
    keys = [gen_key(ckpt_id, r, settings) for r in rows]
    todo = [i for i, k in enumerate(keys) if k not in store]
    if todo:
        torch, device, dtype = torch_setup(args)
        tok = load_tokenizer(path)
        model = Transformer.from_pretrained(path, dtype=dtype, device=device)
        model.eval()
        stop = stop_token_ids(tok)
        prompts = {i: render_prompt(tok, rows[i]["messages"]) for i in todo}
        todo.sort(key=lambda i: -len(prompts[i]))  # similar lengths per batch: less padding
        bar = tqdm(total=len(todo), desc=f"generate {default_name(path)}", unit="prompt")
        for b in range(0, len(todo), args.batch_size):
            batch = todo[b:b + args.batch_size]
            outs = generate(model, [prompts[i] for i in batch], n=1, stop_ids=stop, **settings)
            for i, o in zip(batch, outs):
                toks = list(o.tokens)[:-1] if o.stopped else list(o.tokens)
                store.append({"key": keys[i], "checkpoint": os.path.realpath(path), "id": str(rows[i]["id"]),
                              "settings": settings, "answer": tok.decode(toks, skip_special_tokens=True),
                              "n_tokens": len(toks), "stopped": bool(o.stopped)})
            bar.update(len(batch))
        bar.close()
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    recs = [store.records[k] for k in keys]
    return [{"answer": r["answer"], "cut": not r["stopped"]} for r in recs]


def collect_answers(models, sets, args):
    """{(set, model): [{answer, cut}] in the set's order}; also written to <out-dir>/answers/."""
    gen_store = None
    if any(k == "checkpoint" for k, _ in models.values()):
        gen_store = pt_call(pt.JsonlStore, os.path.join(args.out_dir, "generations.jsonl"), flag="--out-dir")
    answers = {}
    try:
        for m, (kind, path) in models.items():
            ans_rows = load_rows(path, "--models") if kind == "answers" else None
            for s, rows in sets.items():
                if kind == "teacher":
                    answers[s, m] = teacher_answers(rows, s)
                elif kind == "answers":
                    answers[s, m] = match_answers(rows, ans_rows, path, s)
                else:
                    answers[s, m] = generate_answers(path, rows, args, gen_store)
                with open(os.path.join(args.out_dir, "answers", f"{m}__{s}.jsonl"), "w") as f:
                    for r, a in zip(rows, answers[s, m]):
                        f.write(json.dumps({"id": r["id"], "messages": r["messages"], "answer": a["answer"],
                                            "finish_reason": "length" if a["cut"] else "stop", "model": m},
                                           ensure_ascii=False) + "\n")
    finally:
        if gen_store is not None:
            gen_store.close()
    return answers


def discriminator_scores(path, rows, answers, args):
    """Raw D(prompt, answer). The answer ends with the end-of-turn token unless it was cut,
    exactly like the training data (EOS symmetry)."""
    from discriminator import Discriminator  # here: evaluating without a discriminator needs none of it
    torch, device, dtype = torch_setup(args)
    tok = load_tokenizer(path)
    eot = end_of_turn_id(tok)
    disc = Discriminator.from_pretrained(path, dtype=dtype, device=device).eval()
    seqs = [render_prompt(tok, r["messages"]) + tok.encode(a["answer"], add_special_tokens=False)
            + ([] if a["cut"] else [eot]) for r, a in zip(rows, answers)]
    scores = []
    for b in range(0, len(seqs), args.batch_size):
        batch = seqs[b:b + args.batch_size]
        lengths = torch.tensor([len(s) for s in batch], device=device)
        ids = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long, device=device)
        for j, s in enumerate(batch):
            ids[j, :len(s)] = torch.tensor(s, device=device)
        with torch.no_grad():
            scores += disc(ids, lengths).float().cpu().tolist()
    del disc
    return scores


# -----------------------------------------------------------------------------
# the judge

def parse_scores(text):
    """The two scores on the first non-empty line of a judge reply; ValueError otherwise."""
    line = next((l for l in text.splitlines() if l.strip()), "")
    line = re.sub(r"/\s*10\b", " ", line.replace("*", ""))  # tolerate "8/10 7/10" and **bold**
    nums = re.findall(r"\d+(?:\.\d+)?", line)
    if len(nums) != 2:
        raise ValueError(f"first line is not two scores: {line[:80]!r}")
    s = (float(nums[0]), float(nums[1]))
    if not all(0 <= x <= 10 for x in s) or sum(s) == 0:
        raise ValueError(f"scores out of range: {line[:80]!r}")
    return s


def pair_messages(question, a1, a2):
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(question=question, answer_1=a1,
                                                              answer_2=a2, prompt=JUDGE_PROMPT)}]


def run_calls(client, args, calls, store, kind):
    """Make the uncached calls ({key, messages, max_tokens, validate}) on a thread pool, caching each
    reply as it comes. Returns ({key: text}, {key: failure reason}); failures are not cached, so a
    rerun tries them again."""
    todo = {c["key"]: c for c in calls if c["key"] not in store}
    if todo:
        print(f"judge: {len(todo)} {kind} calls to {args.judge_model} ({len(set(c['key'] for c in calls)) - len(todo)} cached)")

    def call(c):
        try:
            r = pt.chat_with_retry(client, args.judge_model, c["messages"], temperature=args.judge_temperature,
                                   max_tokens=c["max_tokens"], retries=args.judge_retries, validate=c["validate"])
        except pt.RetryError as e:
            return str(e)
        store.append({"key": c["key"], "kind": kind, "judge": args.judge_model, "text": r["text"],
                      "finish_reason": r["finish_reason"], "usage": r["usage"], "attempts": r["attempts"]})
        return None

    errors = pt.run_pool(list(todo.values()), call, concurrency=args.judge_workers, desc=kind, unit="call")
    failed = {k: e for k, e in zip(todo, errors) if e is not None}
    return {c["key"]: store.records[c["key"]]["text"] for c in calls if c["key"] in store}, failed


def judge(client, args, store, sets, answers):
    """Judge scores per (set, model): list of per-prompt records."""
    params = {"temperature": args.judge_temperature}
    # 1. the judge's own reference answer, once per prompt, shared by every model
    ref_key = {}
    calls = []
    for s, rows in sets.items():
        for r in rows:
            k = pt.request_key(args.judge_model, r["messages"], {**params, "max_tokens": args.judge_max_tokens})
            ref_key[s, r["id"]] = k
            # chat_with_retry already retries an empty reply
            calls.append({"key": k, "messages": r["messages"], "max_tokens": args.judge_max_tokens, "validate": None})
    refs, ref_failed = run_calls(client, args, calls, store, "reference")
    # 2. one pairwise prompt per answer and order; 1 = model first (paper order), 2 = swapped
    orders = (1, 2) if args.both_orders else (1,)
    calls, plan = [], {}
    for (s, m), ans in answers.items():
        for r, a in zip(sets[s], ans):
            rk = ref_key[s, r["id"]]
            if rk not in refs:
                continue
            q = prompt_text(r["messages"])
            for o in orders:
                msgs = pair_messages(q, a["answer"], refs[rk]) if o == 1 else pair_messages(q, refs[rk], a["answer"])
                k = pt.request_key(args.judge_model, msgs, {**params, "max_tokens": JUDGE_PAIR_MAX_TOKENS})
                plan[s, m, r["id"], o] = k
                calls.append({"key": k, "messages": msgs, "max_tokens": JUDGE_PAIR_MAX_TOKENS, "validate": parse_scores})
    texts, failed = run_calls(client, args, calls, store, "judgment")
    out = {}
    for (s, m) in answers:
        recs = []
        for r in sets[s]:
            rec = {"id": r["id"], "score": None}
            rk = ref_key[s, r["id"]]
            if rk not in refs:
                rec["failed"] = f"reference: {ref_failed.get(rk)}"
                recs.append(rec)
                continue
            per = []
            for o in orders:
                k = plan[s, m, r["id"], o]
                if k not in texts:
                    rec["failed"] = f"order {o}: {failed.get(k)}"
                    break
                s1, s2 = parse_scores(texts[k])
                sm, sr = (s1, s2) if o == 1 else (s2, s1)
                rec[f"order{o}"] = [sm, sr]
                per.append(100 * sm / (sm + sr))
            if "failed" not in rec:
                rec["score"] = sum(per) / len(per)
            recs.append(rec)
        out[s, m] = recs
    return out


# -----------------------------------------------------------------------------
# summaries, table, charts

def summarize(per, args):
    """Per-prompt records of one (set, model) -> {metric: {mean, lo, hi, n}, ...}."""
    b = lambda num, den=None: bootstrap(num, den, args.bootstrap, args.seed)
    res = {"len": b([p["len"] for p in per]), "cut": b([100.0 * p["cut"] for p in per])}
    with_ref = [p for p in per if "rougeL" in p]
    if with_ref:
        res["rougeL"] = b([p["rougeL"] for p in with_ref])
        for n in range(1, MAX_N + 1):
            res[f"p{n}"] = b([100.0 * p["ngram"][n - 1][0] for p in with_ref], [p["ngram"][n - 1][1] for p in with_ref])
    if any("dscore" in p for p in per):
        res["dscore"] = b([p["dscore"] for p in per])
    if any("judge" in p for p in per):
        ok = [p["judge"] for p in per if p["judge"]["score"] is not None]
        res["judge"] = b([j["score"] for j in ok])
        res["judge"]["n_failed"] = len(per) - len(ok)
        res["judge"]["failed"] = {str(p["id"]): p["judge"]["failed"] for p in per if p["judge"]["score"] is None}
        res["judge"]["s_model"] = float(np.mean([j["order1"][0] for j in ok])) if ok else None
        res["judge"]["s_ref"] = float(np.mean([j["order1"][1] for j in ok])) if ok else None
        if args.both_orders and ok:
            # how much the judge favours Assistant 1: the position bias the second order cancels
            res["judge"]["order1_score"] = float(np.mean([100 * j["order1"][0] / sum(j["order1"]) for j in ok]))
            res["judge"]["order2_score"] = float(np.mean([100 * j["order2"][0] / sum(j["order2"]) for j in ok]))
    return res


def cell(m, fmt):
    if m is None:
        return "-"
    s = "-" if m["mean"] is None else f"{fmt.format(m['mean'])} [{fmt.format(m['lo'])}, {fmt.format(m['hi'])}]"
    return s + (f" ({m['n_failed']} failed)" if m.get("n_failed") else "")


def markdown(results, models, sets, length_unit):
    parts = []
    for key, (title, fmt) in METRICS.items():
        title = f"answer length ({length_unit})" if key == "len" else title
        if not any(key in results[s][m] for s in sets for m in models):
            continue
        lines = [f"### {title}", "", "| model | " + " | ".join(f"{s} (n={len(sets[s])})" for s in sets) + " |",
                 "|---|" + "---|" * len(sets)]
        lines += [f"| {m} | " + " | ".join(cell(results[s][m].get(key), fmt) for s in sets) + " |" for m in models]
        parts.append("\n".join(lines))
    return "Mean [95% bootstrap interval]\n\n" + "\n\n".join(parts) + "\n"


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_results(results, models, sets, path, length_unit):
    plt = pyplot()
    if plt is None:
        print(f"note: matplotlib is not installed, {path} not written")
        return False
    keys = [k for k in ("judge", "rougeL", "p4", "len") if any(k in results[s][m] for s in sets for m in models)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    width = 0.8 / len(models)
    for ax, key in zip(axes[0], keys):
        for j, m in enumerate(models):
            vals = [results[s][m].get(key) or {"mean": None} for s in sets]
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(sets))]
            mean = [v["mean"] if v["mean"] is not None else np.nan for v in vals]
            err = [[mu - v["lo"] if v["mean"] is not None else 0 for mu, v in zip(mean, vals)],
                   [v["hi"] - mu if v["mean"] is not None else 0 for mu, v in zip(mean, vals)]]
            ax.bar(xs, mean, width, yerr=err, capsize=2, label=m)
        if key == "judge":
            ax.axhline(50, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(sets)), list(sets), rotation=20)
        ax.set_title(f"answer length ({length_unit})" if key == "len" else METRICS[key][0], fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# panel title -> train_gad.py metrics drawn in it
TRAIN_PANELS = [("discriminator accuracy", ["d_acc"]), ("discriminator loss", ["d_loss"]),
                ("rewards", ["r_teacher", "r_student"]), ("response length (tokens)", ["resp_len_mean", "resp_len_max"]),
                ("KL to reference (k3)", ["kl"]), ("generator loss", ["sft_loss", "policy_loss"])]


def plot_metrics(path, out):
    """Training curves from train_gad.py's metrics.jsonl; absent fields just leave a panel out."""
    if not os.path.isfile(path):
        raise EvalError(f"--plot-metrics: {path}: no such file")
    rows = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i >= len(lines) - 1:  # a torn last line from a run killed mid-write
                print(f"note: {path}:{i}: skipping a torn last line")
                continue
            raise EvalError(f"--plot-metrics: {path}:{i}: not valid JSON") from None
        if not isinstance(rec, dict):
            raise EvalError(f"--plot-metrics: {path}:{i}: a JSON object is expected")
        rows.append(rec)
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    panels = [(t, [k for k in ks if any(num(r.get(k)) for r in rows)]) for t, ks in TRAIN_PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    if not panels:
        raise EvalError(f"--plot-metrics: {path}: none of {', '.join(k for _, ks in TRAIN_PANELS for k in ks)} found")
    plt = pyplot()
    if plt is None:
        print(f"note: matplotlib is not installed, {out} not written")
        return False
    step = lambda i, r: r["step"] if num(r.get("step")) else i
    # where the stage changes (warmup -> gad), drawn in every panel
    bounds = [(step(i, r), r["stage"]) for i, r in enumerate(rows)
              if r.get("stage") is not None and (i == 0 or r.get("stage") != rows[i - 1].get("stage"))]
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, ks) in zip(axes.flat, panels):
        for k in ks:
            pts = [(step(i, r), r[k]) for i, r in enumerate(rows) if num(r.get(k))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, lw=1)
        for x, stage in bounds[1:]:
            ax.axvline(x, color="gray", ls=":", lw=0.8)
            ax.text(x, ax.get_ylim()[1], f" {stage}", fontsize=7, va="top", color="gray")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if len(ks) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return True


# -----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[], help="[name=]spec: teacher, a checkpoint, or an answers file")
    p.add_argument("--test-sets", nargs="+", default=[], help="[name=]file: our JSONL or an importable format")
    p.add_argument("--out-dir", default="out/eval")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts of each test set")
    # generation
    p.add_argument("--max-new-tokens", type=int, default=1536)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the paper)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokenizer", default=None, help="for answer lengths; default: the first checkpoint's")
    # judge
    p.add_argument("--judge", action="store_true", help="score with the judge (costs API calls)")
    p.add_argument("--judge-model", default="gpt-4o")
    p.add_argument("--judge-base-url", default=None, help="any OpenAI-compatible endpoint")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    p.add_argument("--judge-temperature", type=float, default=0.0)
    p.add_argument("--judge-max-tokens", type=int, default=2048, help="for the judge's reference answers")
    p.add_argument("--judge-workers", type=int, default=8)
    p.add_argument("--judge-retries", type=int, default=6)
    p.add_argument("--both-orders", action="store_true", help="also judge with the answers swapped, and average")
    # the rest
    p.add_argument("--discriminator", default=None, help="a discriminator checkpoint: adds the mean D score")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--plot-metrics", default=None, help="train_gad.py's metrics.jsonl: draw the training curves")
    p.add_argument("--plot-out", default=None, help="PNG for --plot-metrics (default: next to it)")
    args = p.parse_args(argv)
    if not args.plot_metrics and not (args.models and args.test_sets):
        p.error("give --models and --test-sets, or --plot-metrics")
    if bool(args.models) != bool(args.test_sets):
        p.error("--models and --test-sets go together")
    for flag in ("max_new_tokens", "batch_size", "judge_workers", "bootstrap", "judge_max_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    return args


def evaluate(args):
    sets = {}
    for spec in args.test_sets:
        name, path = parse_spec(spec)
        name = name or default_name(path)
        if name in sets:
            raise EvalError(f"--test-sets: two test sets named '{name}': use name=path")
        sets[name] = load_rows(path, "--test-sets")[:args.limit]
    models = {}
    for spec in args.models:
        name, path = parse_spec(spec)
        if path == "teacher":
            kind = "teacher"
        elif os.path.isdir(path) or path.endswith(".gguf"):
            kind = "checkpoint"
        elif path.endswith((".jsonl", ".json")):
            kind = "answers"
        else:
            raise EvalError(f"--models: {spec}: not 'teacher', a checkpoint directory, a .gguf or an answers file")
        if kind != "teacher" and not os.path.exists(path):
            raise EvalError(f"--models: {path}: no such file or directory")
        name = name or default_name(path)
        if name in models:
            raise EvalError(f"--models: two models named '{name}': use name=path")
        models[name] = (kind, path)
    os.makedirs(os.path.join(args.out_dir, "answers"), exist_ok=True)

    # answers of every model on every set
    answers = collect_answers(models, sets, args)

    # judge-free metrics
    tok_path = args.tokenizer or next((p for k, p in models.values() if k == "checkpoint"), None)
    if tok_path:
        tok = load_tokenizer(tok_path)
        count = lambda t: len(tok.encode(t, add_special_tokens=False))
    else:
        count = lambda t: len(t.split())
    per = {}
    for (s, m), ans in answers.items():
        per[s, m] = []
        for r, a in zip(sets[s], ans):
            p = {"id": r["id"], "len": count(a["answer"]), "cut": a["cut"]}
            if isinstance(r.get("teacher"), str) and r["teacher"]:
                cw, rw = words(a["answer"]), words(r["teacher"])
                p["rougeL"] = 100 * rouge_l(cw, rw)
                p["ngram"] = [clipped_ngram_matches(cw, rw, n) for n in range(1, MAX_N + 1)]
            per[s, m].append(p)
    if args.discriminator:
        for (s, m), ans in tqdm(answers.items(), desc="discriminator", unit="set"):
            for p, d in zip(per[s, m], discriminator_scores(args.discriminator, sets[s], ans, args)):
                p["dscore"] = d
    if args.judge:
        client = pt.make_client(base_url=args.judge_base_url, api_key_env=args.judge_api_key_env)
        judge_store = pt_call(pt.JsonlStore, os.path.join(args.out_dir, "judge_cache.jsonl"), flag="--out-dir")
        try:
            judged = judge(client, args, judge_store, sets, answers)
        finally:
            judge_store.close()
        for k, recs in judged.items():
            for p, j in zip(per[k], recs):
                p["judge"] = j

    results = {s: {m: summarize(per[s, m], args) for m in models} for s in sets}
    config = {k: v for k, v in vars(args).items() if k not in ("plot_metrics", "plot_out")}
    config["length_unit"] = f"tokens, {default_name(tok_path)} tokenizer" if tok_path else "whitespace words"
    config["tokenizer"] = tok_path
    out = {"config": config, "models": {m: {"kind": k, "path": p} for m, (k, p) in models.items()},
           "test_sets": {s: len(r) for s, r in sets.items()}, "results": results,
           "per_prompt": {s: {m: per[s, m] for m in models} for s in sets}}
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    md = markdown(results, list(models), sets, config["length_unit"])
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(md)
    png = plot_results(results, list(models), sets, os.path.join(args.out_dir, "results.png"), config["length_unit"])
    print(md)
    for s in sets:
        for m in models:
            j = results[s][m].get("judge")
            if j and j["n_failed"]:
                print(f"warning: judge failed on {j['n_failed']} prompts of {m} on {s} (listed in results.json)")
    print(f"wrote {args.out_dir}/results.json, results.md" + (", results.png" if png else ""))
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.plot_metrics:
            plot_metrics(args.plot_metrics, args.plot_out or os.path.splitext(args.plot_metrics)[0] + ".png")
        if args.models:
            evaluate(args)
    except (EvalError, LoadError, pt.FatalAPIError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
