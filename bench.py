"""
Measurements of nanoGAD's hot paths, one JSON line each. Ratios are taken within one run, so they
hold on a noisy shared machine where absolute numbers do not.

    python bench.py                       # sampler, logprobs, step; on cuda (bf16) when available, else cpu (fp32)
    python bench.py --only sampler --prompts 16 --new-tokens 128 --repeats 3 [--n 4] [--profile]
    python bench.py --only sampler --prompts 2 --n 8 --dtype float32,bfloat16   # GAD's shape, both dtypes
    python bench.py --only logprobs --tokens 4096 --vocab 152064 --hidden 896
    python bench.py --only step [--steps 3 --step-prompts 4 --step-samples 4 --step-new-tokens 64 --trl both]
    python bench.py --gpu-check           # one GPU, ~4 min, random weights: what a GPU session must report
    python bench.py --gpu-check --device cpu --tiny                           # the same at toy sizes (CI)

sampler:  model.generate against transformers' generate on the same weights, prompts and settings
          (temperature, top_p=1, top_k off), tokens counted alike: up to and including the stop
          token of each row. mode "stop" lets rows stop; mode "forced" makes every row run
          --new-tokens, which is the clean throughput ratio. Both run in the same dtype (each of
          --dtype's); `ratio` compares median times, `ratio_best` the best of the repeats, which
          another process's load on a shared machine disturbs less. --compile runs ours with
          generate(compile=True) (the warmup run pays the compilation).
logprobs: chunked_logprobs (what token_logprobs runs after the last layer) against full logits ->
          log_softmax -> gather, forward + backward into both h and the LM head. Each variant runs in
          a fresh process, so its peak memory is its own: ru_maxrss on cpu, max_memory_allocated on
          cuda, minus what the inputs already hold.
step:     a GAD step of train_gad.main (in this process) against a step of TRL's GRPOTrainer on the
          same prompts (the first of --step-data), batch and lengths, with a frozen reward model of the
          student's size; TRL in bf16 and fp32, ours against the faster. A second line: the FLOP/s of
          our D and G updates as a fraction of the bf16 and fp32 matrix rates measured in the same
          process, and peak memory. Without trl installed, the line says the comparison was skipped.
gpu-check: bf16 logits parity (ours vs fp32, vs transformers), flash-attn vs SDPA on padded and packed
          batches (when flash-attn is installed), the sampler vs transformers' generate (greedy tokens
          and tokens/s), and GAD steps on random SmolLM2-135M- and Qwen2.5-1.5B-shaped models with time
          per phase, peak memory and MFU. Random weights, a synthetic tokenizer and data made in the
          process: it needs no hub, no registry and no file beyond this repository.
"""

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from data import DataError, read_jsonl, read_rows
from discriminator import Discriminator, pad_id_for_scoring
from distributed import fast_bf16
from flags import NONNEG_INT, POS, POS_INT, number
from loading import (LoadError, config_from_hf, end_of_turn_id, load_tokenizer, read_gguf, read_json, render_prompt,
                     resolve_checkpoint, stop_token_ids)
from model import LOGPROB_CHUNK, ModelConfig, Transformer, chunked_logprobs, generate, token_logprobs
from train_gad import default_student, tokenize_rows

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 17 times 23?",
    "Say hello in Spanish.",
    "Who wrote Hamlet?",
    "What does a CPU do?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "I am planning a two-week trip through Japan in the spring with my partner, who is vegetarian and "
    "does not like crowded places. We like hiking, old temples, and small towns. Could you suggest an "
    "itinerary, with a few words on how to get between the places, and what food to look for?",
    "Explain, step by step, how a hash table works: how keys are turned into positions, what happens on "
    "collisions, why the table is resized as it fills, and what that means for the cost of inserts and "
    "lookups on average and in the worst case.",
    "My sourdough bread comes out dense and flat even though the starter bubbles well. I feed it once a "
    "day, use 75% hydration, bulk ferment for four hours at about 20 degrees and bake in a Dutch oven. "
    "What could be going wrong, and what should I change first?",
    "Write a short story, about two paragraphs, about a lighthouse keeper who finds a message in a "
    "bottle that seems to have been written by herself, twenty years in the future.",
    "Compare renting and buying a home for a young couple in a large city: think about the monthly "
    "cost, flexibility, maintenance, the risk of prices falling, and what they give up by tying savings "
    "into a deposit. Finish with a short recommendation.",
    "I keep procrastinating on a big report at work. It is due in three weeks, I have the data but I "
    "do not know how to structure it, and every time I open the document I end up reading email. "
    "Give me a concrete plan for the next three weeks.",
    "Summarize the main causes of the First World War, the alliance system, and why a regional "
    "conflict in the Balkans turned into a war across Europe, in a few short paragraphs.",
    "What are the differences between a list, a tuple, a set and a dictionary in Python, and when "
    "would you pick each? Give a small code example for each one.",
]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load_hf(path, dtype, device):
    from transformers import AutoModelForCausalLM
    if path.endswith(".gguf"):
        d, f = os.path.split(path)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).to(dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return m.to(device).eval()


def run_ours(model, prompts, a, stops, forced, seed):
    out = generate(model, prompts, n=a.n, max_new_tokens=a.new_tokens, temperature=a.temperature,
                   top_p=1.0, stop_ids=() if forced else stops, seed=seed, compile=a.compile)
    return sum(len(s.tokens) for s in out)


def run_hf(model, batch, a, stops, forced, pad_id, seed):
    ids, mask = batch
    torch.manual_seed(seed)
    # top_k=0: transformers otherwise applies top_k=50, a top-k over the vocab that we do not do.
    # With n > 1 transformers repeats each prompt before the prefill; ours prefills it once.
    # Forced: min_new_tokens masks the stop ids until the end, so every row runs the full length.
    kw = dict(do_sample=True, temperature=a.temperature, top_p=1.0, top_k=0, max_new_tokens=a.new_tokens,
              num_return_sequences=a.n, pad_token_id=pad_id, eos_token_id=stops,
              min_new_tokens=a.new_tokens if forced else 0)
    with torch.no_grad():
        seqs = model.generate(input_ids=ids, attention_mask=mask, **kw)
    count = 0
    for row in seqs[:, ids.shape[1]:].tolist():  # finished rows are padded out to the longest one
        ends = [i for i, t in enumerate(row) if t in stops]
        count += ends[0] + 1 if ends and not forced else len(row)
    return count


def bench_sampler(a, device, dtype):
    path = a.model or default_student()
    tok = load_tokenizer(path)
    stops = stop_token_ids(tok)
    ours = Transformer.from_pretrained(path, dtype=dtype, device=device).eval()
    hf = load_hf(path, dtype, device)
    qs = (QUESTIONS * (a.prompts // len(QUESTIONS) + 1))[:a.prompts]
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in qs]
    # the same token ids for both, left-padded for HF (our sampler takes ragged rows as they are)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)

    if a.profile:
        profile_ours(ours, prompts, a, device)
    t0 = time.perf_counter()
    run_ours(ours, prompts, a, stops, True, 0)  # warmup: allocator, kernels, lazy inits (and compilation)
    warmup_s = time.perf_counter() - t0
    run_hf(hf, (ids, mask), a, stops, True, pad_id, 0)
    for mode in ("stop", "forced"):
        forced = mode == "forced"
        rates = {"ours": [], "hf": []}
        times = {"ours": [], "hf": []}
        counts = {"ours": [], "hf": []}
        for r in range(a.repeats):  # alternate, so that drift in machine load hits both alike
            for name, fn in (("ours", lambda: run_ours(ours, prompts, a, stops, forced, r + 1)),
                             ("hf", lambda: run_hf(hf, (ids, mask), a, stops, forced, pad_id, r + 1))):
                sync(device)
                t0 = time.perf_counter()
                n_tok = fn()
                sync(device)
                dt = time.perf_counter() - t0
                times[name].append(dt)
                counts[name].append(n_tok)
                rates[name].append(n_tok / dt)
        med = {k: statistics.median(v) for k, v in rates.items()}
        best = {k: max(v) for k, v in rates.items()}
        emit(bench="sampler", mode=mode, model=os.path.basename(path), device=str(device),
             dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(), prompts=a.prompts,
             n=a.n, new_tokens=a.new_tokens, temperature=a.temperature, repeats=a.repeats, compile=a.compile,
             ours_tokens=counts["ours"], hf_tokens=counts["hf"],
             ours_s=round(statistics.median(times["ours"]), 3), hf_s=round(statistics.median(times["hf"]), 3),
             ours_tok_s=round(med["ours"], 1), hf_tok_s=round(med["hf"], 1),
             ratio=round(med["ours"] / med["hf"], 3), ratio_best=round(best["ours"] / best["hf"], 3),
             ours_warmup_s=round(warmup_s, 1))


def profile_ours(model, prompts, a, device):
    """Where model.generate spends its time, by op: a table on stderr."""
    from torch.profiler import ProfilerActivity, profile
    run_ours(model, prompts, a, [], True, 0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        run_ours(model, prompts, a, [], True, 0)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # by shape, since prefill and decode matmuls are the same op with very different costs
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=25, max_name_column_width=45)
    print(table, file=sys.stderr)


# -----------------------------------------------------------------------------
# log-probs

def naive_logprobs(h, w, targets, temperature=1.0):
    logits = (h @ w.t()).float() / temperature  # [B, T, V] held whole, and again by log_softmax
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


def logprobs_child(a, device, dtype):
    """One variant in this fresh process; prints {"peak_bytes", "s"} for the parent."""
    g = torch.Generator(device=device).manual_seed(0)
    # in place, so no transient copy raises ru_maxrss above what the inputs hold
    h = torch.randn(1, a.tokens, a.hidden, generator=g, device=device).mul_(0.5).to(dtype).requires_grad_()
    w = torch.randn(a.vocab, a.hidden, generator=g, device=device).mul_(0.02).to(dtype).requires_grad_()
    t = torch.randint(a.vocab, (1, a.tokens), generator=g, device=device)
    if a.logprobs_child == "naive":
        fn = naive_logprobs
    else:
        fn = lambda h, w, t: chunked_logprobs(h, w, t, chunk=a.chunk)[0]
    # the grads live as long as the weights in training, so they count as inputs, not as the peak
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    times = []
    for _ in range(a.logprob_repeats):  # the first run sets the peak; the others reuse freed memory
        t0 = time.perf_counter()
        fn(h, w, t).sum().backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_bytes": peak, "s": statistics.median(times)}))


def bench_logprobs(a, device, dtype):
    res = {}
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, os.path.abspath(__file__), "--logprobs-child", variant, "--device", str(device),
               "--dtype", str(dtype).removeprefix("torch."), "--tokens", str(a.tokens), "--vocab", str(a.vocab),
               "--hidden", str(a.hidden), "--chunk", str(a.chunk), "--threads", str(a.threads),
               "--logprob-repeats", str(a.logprob_repeats)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"bench.py: logprobs {variant} failed (rc {p.returncode}):\n{p.stderr[-2000:]}")
        res[variant] = json.loads(p.stdout.strip().splitlines()[-1])
    gib = lambda b: round(b / 2**30, 3)
    n, c = res["naive"], res["chunked"]
    emit(bench="logprobs", device=str(device), dtype=str(dtype).removeprefix("torch."), tokens=a.tokens,
         vocab=a.vocab, hidden=a.hidden, chunk=a.chunk, threads=torch.get_num_threads(),
         repeats=a.logprob_repeats,
         naive_peak_gib=gib(n["peak_bytes"]), chunked_peak_gib=gib(c["peak_bytes"]),
         naive_s=round(n["s"], 3), chunked_s=round(c["s"], 3),
         peak_ratio=round(n["peak_bytes"] / max(c["peak_bytes"], 1), 2), time_ratio=round(c["s"] / n["s"], 3))


def emit(**kw):
    print(json.dumps(kw), flush=True)


# -----------------------------------------------------------------------------
# what the measurements below share: train_gad.main in this process, FLOP counts, matrix rates

@contextlib.contextmanager
def to_stderr():
    """The trainers' progress lines go to stderr, so that stdout holds this script's JSON lines only."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def run_gad(flags, out_dir):
    """train_gad.main in this process (it starts and destroys a one-process group itself) -> its metrics
    records. Its final checkpoint is skipped: a benchmark times steps, and a 1.5B model's checkpoint
    (exports plus resume state, ~50 GB) would cost more disk and minutes than the steps themselves."""
    import checkpoint
    import train_gad
    try:
        with to_stderr(), patched(checkpoint, "save", lambda *a, **k: "(none: bench.py skips checkpoints)"):
            train_gad.main(flags + ["--eval-data", "", "--eval-prompts", "0", "--out-dir", out_dir, "--overwrite"])
    finally:
        if torch.distributed.is_initialized():  # main stopped midway: leave no group to the next run
            torch.distributed.destroy_process_group()
    return [rec for _, rec in read_jsonl(os.path.join(out_dir, "metrics.jsonl"))]


def after_first(recs, key):
    """The median of a metric over the steps after the first (which pays for lazy inits and warmup)."""
    return statistics.median(r[key] for r in recs[1:])


def update_flops(cfg, d_lens, g_lens, ref=True):
    """Useful FLOPs of one GAD step's D update and G update: counted on each sequence's own tokens,
    padding excluded (the usual convention of model FLOPs utilisation).

    A matrix product of [tokens, k] by a [k, m] weight is 2 k m FLOPs per token forward and twice
    that backward (the gradients of the input and of the weight), so a forward + backward through a
    model's matrices costs 6 x params x tokens, a forward alone 2 x params x tokens. The params are
    the body's (the blocks and the final norm; the embedding is a lookup, no product) plus, where
    logits are computed, the LM head's C x V, tied or not. (The body's norms and biases count as
    params too, a slight overcount: 0.03% of SmolLM2's body.)
    Causal attention over a sequence of L tokens, per layer: QK^T and PV are L^2 / 2 x H x hd
    multiply-adds each (the half below the diagonal), 2 L^2 H hd FLOPs forward, twice that backward.
    D's update: one forward + backward over every teacher and sample sequence (`d_lens`), no LM head
    (the score head, C per token, is left out).
    G's update: PPO over the samples (`g_lens`; log-probs run on L - 1 positions) through the body
    and the LM head; chunked_logprobs recomputes each chunk's logits in the backward pass (activation
    checkpointing), 2 C V more per token; and, with `ref`, the reference policy's forward for the KL."""
    with torch.device("meta"):
        m = Transformer(cfg)
    body = sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("model.embed_tokens", "lm_head")))
    head = cfg.hidden_size * cfg.vocab_size
    att = cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim  # x L^2: one causal forward's FLOPs / 2
    d_tok, d_sq = sum(d_lens), sum(L * L for L in d_lens)
    g_tok, g_sq = sum(L - 1 for L in g_lens), sum((L - 1) ** 2 for L in g_lens)
    d = 6 * body * d_tok + 6 * att * d_sq
    g = 6 * (body + head) * g_tok + 2 * head * g_tok + 6 * att * g_sq
    if ref:
        g += 2 * (body + head) * g_tok + 2 * att * g_sq
    return d, g


def step_lengths(rows, rec, n):
    """The sequence lengths of a step whose batch is all of `rows` (tokenized by train_gad), from its
    metrics: D sees each prompt's teacher answer and its n samples, G the samples. The metrics hold
    the mean response length only, so every sample counts as that long: the token sums are exact,
    the attention terms (sums of squares) approximate."""
    resp = rec["resp_len_mean"]
    samples = [len(r["prompt"]) + resp for r in rows for _ in range(n)]
    return [len(r["prompt"]) + len(r["teacher_ids"]) for r in rows] + samples, samples


def matmul_rate(m, k, n, dtype, device, reps=5, inner=1):
    """FLOP/s of an [m, k] @ [k, n] product (2 m k n FLOPs): the median of `reps` timings of `inner`
    products each, after two untimed ones."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, generator=g, device=device).to(dtype)
    w = torch.randn(k, n, generator=g, device=device).to(dtype)
    for _ in range(2):
        x @ w
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            x @ w
        sync(device)
        times.append((time.perf_counter() - t0) / inner)
    return 2 * m * k * n / statistics.median(times)


def maxrss_gib():
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux); it never goes down."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def student_config(path):
    """The ModelConfig of a .gguf file or HF directory, without reading its weights."""
    p = resolve_checkpoint(path)
    if p.endswith(".gguf"):
        return config_from_hf(read_gguf(p)[0], p)
    return config_from_hf(read_json(os.path.join(p, "config.json")), p)


# -----------------------------------------------------------------------------
# step: one GAD step of ours against one step of TRL's GRPOTrainer, on the same work

STEP_TEMPERATURE = 0.8  # the paper's sampling temperature, train_gad's default
OURS_EXTRA = ("ours also trains D (t_d: D's forward over each prompt's teacher answer and samples gives the "
              "rewards, then its update) and runs a reference forward for the KL (in t_g); TRL scores with a frozen "
              "reward model of the same size and, at beta=0, loads no reference")


def trl_step(policy, reward, tok, rows, a, bf16, out_dir, device):
    """Steps of TRL's GRPOTrainer on the same prompts, batch and lengths as ours -> per-step times and
    TRL's own mean completion length. Its settings (printed with the result): num_generations = n,
    16 completions per step for 4 x 4, temperature and top_p as ours with top_k off, no gradient
    checkpointing (ours has none either), TRL's defaults otherwise (loss "dapo", beta 0, lr 1e-6);
    logging, saving and reports off."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.logs = [], {}

        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):  # the end-of-training summary, with TRL's metrics
            self.logs.update(logs or {})

    cfg = GRPOConfig(output_dir=out_dir, max_steps=a.steps, per_device_train_batch_size=a.step_prompts * a.step_samples,
                     gradient_accumulation_steps=1, num_generations=a.step_samples,
                     max_completion_length=a.step_new_tokens, temperature=STEP_TEMPERATURE, top_p=1.0, top_k=0,
                     bf16=bf16, use_cpu=device.type == "cpu", gradient_checkpointing=False, logging_strategy="no",
                     save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    timer = Timer()
    with to_stderr():
        trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=cfg, processing_class=tok, callbacks=[timer],
                              train_dataset=Dataset.from_list([{"prompt": r["messages"]} for r in rows]))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    mean_len = timer.logs.get("completions/mean_length")
    return dict(s=statistics.median(timer.times[1:]), times=[round(t, 3) for t in timer.times],
                resp_len=None if mean_len is None else round(float(mean_len), 1),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else maxrss_gib())


def bench_step(a, device):
    """Ours (train_gad.main) against TRL's GRPOTrainer, both on the first --step-prompts prompts of
    --step-data, then the FLOP/s of our D and G updates against this process's matrix rates."""
    rows = read_rows(a.step_data)  # first, so that a bad file costs one line and no model load
    P, n, T = a.step_prompts, a.step_samples, a.step_new_tokens
    if len(rows) < P:
        raise DataError(f"{a.step_data}: {len(rows)} rows; --step-prompts {P} needs {P}")
    rows = rows[:P]
    path = a.model or default_student()
    tok = load_tokenizer(path)
    cfg = student_config(path)
    if a.step_threads:
        torch.set_num_threads(a.step_threads)
    # a file of exactly P prompts: every step's batch is all of them, for ours and for TRL alike, so
    # the prompt lengths of each step (for the FLOP count) are known
    toks, _ = tokenize_rows(rows, tok, end_of_turn_id(tok), 2048, T)  # as train_gad does (its --max-prompt-len)
    bf16 = fast_bf16(device)
    common = dict(model=os.path.basename(path), device=str(device), threads=torch.get_num_threads(), prompts=P, n=n,
                  new_tokens=T, temperature=STEP_TEMPERATURE, steps=a.steps)
    with tempfile.TemporaryDirectory(prefix="nanogad-bench-") as tmp:
        data = os.path.join(tmp, "prompts.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        recs = run_gad(["--student", path, "--train-data", data, "--warmup-steps", "0", "--max-steps", str(a.steps),
                        "--prompts-per-step", str(P), "--n-samples", str(n), "--max-new-tokens", str(T),
                        "--temperature", str(STEP_TEMPERATURE)], os.path.join(tmp, "ours"))
        ours_peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else maxrss_gib()
        # the matrix rates right after our steps, under the same threads (and, on a shared machine, about the same load)
        rates = {}
        for dt in (torch.bfloat16, torch.float32):
            for name, (mm, kk, nn) in (("mlp", (2048, cfg.hidden_size, cfg.intermediate_size)),
                                       ("lm_head", (512, cfg.hidden_size, cfg.vocab_size))):
                rates[f"{str(dt).removeprefix('torch.')}_{name}"] = matmul_rate(mm, kk, nn, dt, device)

        res = {}
        try:
            import trl  # noqa: F401
        except Exception as e:  # not installed, or not importable with this transformers
            skipped = f"trl is not importable ({type(e).__name__}: {e}); pip install 'trl>=1.16,<2'"
        else:
            skipped = None
            policy = os.path.join(tmp, "policy")
            if os.path.isdir(resolve_checkpoint(path)):
                policy = resolve_checkpoint(path)
            else:  # a .gguf: TRL loads HF directories
                Transformer.from_pretrained(path).save_pretrained(policy, tokenizer=tok)
            # the reward model: our discriminator's layout (the student's backbone + a score head) as an
            # HF *ForSequenceClassification with num_labels=1, frozen (TRL never trains its reward models)
            reward = os.path.join(tmp, "reward")
            Discriminator.from_pretrained(path).save_pretrained(reward, tok, pad_token_id=pad_id_for_scoring(
                tok, stop_token_ids(tok)))
            for prec in (["bf16", "fp32"] if a.trl == "both" else [a.trl]):
                res[prec] = trl_step(policy, reward, tok, rows, a, prec == "bf16", os.path.join(tmp, f"trl-{prec}"),
                                     device)

    ours = {k: after_first(recs, k) for k in ("t_step", "t_sample", "t_d", "t_g")}
    line = dict(bench="step", **common, ours_dtype="bfloat16" if bf16 else "float32", ours_s=round(ours["t_step"], 3),
                **{f"ours_{k}": round(ours[k], 3) for k in ("t_sample", "t_d", "t_g")},
                ours_times=[round(r["t_step"], 3) for r in recs],
                ours_resp_len=round(statistics.mean(r["resp_len_mean"] for r in recs), 1), ours_extra_work=OURS_EXTRA)
    if skipped:
        line["trl"] = f"skipped: {skipped}"
    else:
        for prec, r in res.items():
            line.update({f"trl_{prec}_s": round(r["s"], 3), f"trl_{prec}_times": r["times"],
                         f"trl_{prec}_resp_len": r["resp_len"]})
        best = min(res, key=lambda k: res[k]["s"])
        line.update(trl_best=best, ratio=round(ours["t_step"] / res[best]["s"], 3),
                    trl_settings=f"GRPOTrainer (trl {trl.__version__}), policy and a frozen reward model of the same "
                    f"size, num_generations={n}, {P * n} completions per step, max_completion_length={T}, "
                    f"temperature={STEP_TEMPERATURE}, top_p=1, top_k=0, gradient_checkpointing=False, "
                    f"use_cpu={device.type == 'cpu'}, defaults otherwise (loss dapo, beta 0: no reference)")
    emit(**line)

    # FLOP/s of the updates, per step after the first, against the matrix rates measured above
    d_fs, g_fs = [], []
    for r in recs[1:]:
        d, g = update_flops(cfg, *step_lengths(toks, r, n))
        d_fs.append(d / r["t_d"])
        g_fs.append(g / r["t_g"])
    d_rate, g_rate = statistics.median(d_fs), statistics.median(g_fs)
    bf16_rate = max(v for k, v in rates.items() if k.startswith("bfloat16"))
    fp32_rate = max(v for k, v in rates.items() if k.startswith("float32"))
    emit(bench="step_flops", **common, ours_dtype="bfloat16" if bf16 else "float32",
         matmul_gflops={k: round(v / 1e9, 1) for k, v in rates.items()},
         d_gflops=round(d_rate / 1e9, 1), g_gflops=round(g_rate / 1e9, 1),
         d_frac_bf16=round(d_rate / bf16_rate, 3), g_frac_bf16=round(g_rate / bf16_rate, 3),
         d_frac_fp32=round(d_rate / fp32_rate, 3), g_frac_fp32=round(g_rate / fp32_rate, 3),
         ours_peak_gib=ours_peak, **({f"trl_{k}_peak_gib": v["peak_gib"] for k, v in res.items()}),
         peak_kind="torch.cuda.max_memory_allocated" if device.type == "cuda" else
         "ru_maxrss of this process so far (it includes everything before, and never goes down)",
         flops_note="useful FLOPs over t_d / t_g (which include micro-batching and the optimizer step): "
                    "D 6*N_body*tokens + causal attention; G 6*(N_body+C*V)*tokens + 2*C*V*tokens (log-prob chunks "
                    "recomputed in backward) + the reference forward 2*(N_body+C*V)*tokens; padding not counted; "
                    "attention approximates every sample as the mean response length; the rate is the faster "
                    "of the two matmul shapes")


# -----------------------------------------------------------------------------
# gpu-check: everything a one-GPU session needs to know, on random weights (no hub, no registry)

SYNTH_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad (never a stop token), chat markers
SYNTH_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # ChatML, as Qwen2.5's
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer): the synthetic tokenizer must match it, see below
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# the two models' shapes; --tiny keeps each family's traits (GQA, tied head, Qwen2's qkv bias, rope
# theta) at sizes a CPU runs in seconds
SHAPES = {
    "smollm2-135m": (dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                          tie_word_embeddings=True),
                     dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "qwen2.5-1.5b": (dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                          num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                          rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                          tie_word_embeddings=True, qkv_bias=True),
                     dict(vocab_size=640, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=16)),
}
# per mode: the GAD steps' work (prompts x samples, new tokens, steps, prompt lengths, D/G micro-batch
# budget) and the other checks' sizes. Full: meant to end in ~4 minutes on one H100/H200, so a rerun
# fits in 8 (estimated: not yet run on a GPU). Memory, 1.5B model on one GPU: G and D each ~25 GB
# (fp32 weights, gradients, AdamW), the reference 6 GB, and ~2.5 MB of bf16 activations per token in
# a micro-batch: a 4096-token budget (a D group of 9 sequences of <= 460 tokens goes alone) keeps the
# peak near 65 GB, inside an 80 GB H100.
CHECK = dict(full=dict(prompts=8, n=8, new_tokens=256, steps=3, prompt_len=(64, 192), token_budget=4096,
                       parity_len=256, sampler_rows=16, sampler_tokens=128),
             tiny=dict(prompts=2, n=2, new_tokens=8, steps=2, prompt_len=(4, 12), token_budget=256,
                       parity_len=16, sampler_rows=4, sampler_tokens=8))
# dense bf16 peak of a GPU by name (first match wins: PCIe before SXM); others get the measured matmul rate
GPU_BF16_PEAK = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
                 ("A100", 312e12), ("L40S", 362e12))


def shape_config(name, tiny):
    full, small = SHAPES[name]
    return ModelConfig(**{**full, **(small if tiny else {})})


def synthetic_tokenizer(vocab_size):
    """A byte-level BPE tokenizer of exactly vocab_size ids with a chat template, made in-process: the
    256 byte symbols, one merge per lowercase letter (" x" is one token, so a text of one-letter words
    has one token per word), the chat's special tokens, and unused ids up to vocab_size. Byte-level
    BPE with Qwen2's split because transformers reads a qwen2 checkpoint's tokenizer back as
    Qwen2Tokenizer, rebuilt from the saved vocab and merges whatever class it was saved as: the
    word-level tokenizer of tests/toy.py would come back tokenizing differently."""
    import string
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    merges = [("Ġ", c) for c in string.ascii_lowercase]  # Ġ: the byte-level symbol of a space
    names = sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges] + SYNTH_SPECIALS
    names += [f"<unused{i}>" for i in range(vocab_size - len(names))]
    t = Tokenizer(models.BPE({s: i for i, s in enumerate(names)}, merges))
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken(s, special=True) for s in SYNTH_SPECIALS])
    tok = PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = SYNTH_TEMPLATE
    assert len(tok) == vocab_size
    return tok


def random_checkpoint(path, cfg, tok, device, seed=0):
    """An HF checkpoint directory of random weights shaped by cfg, with tok. Each matrix is
    normal(0, 1/sqrt(fan_in)), so every block keeps its input's scale and the next token depends on
    the context: with HF's init (0.02 everywhere) and a tied head, the embedding dominates the residual
    stream and greedy decoding just repeats the last token, which would make the greedy comparison
    empty. Embeddings normal(0, 1/sqrt(C)) (logits of std ~1), norms 1, biases 0. Drawn on `device`
    (fast on a GPU) and stored in bf16 (half the bytes; loaded as fp32 they are the same numbers)."""
    cfg.hf = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.device("meta"):
        m = Transformer(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, p in m.named_parameters():  # a tied head is the embedding: named once
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape)
        elif name.endswith(".bias"):
            t = torch.zeros(p.shape)
        else:  # [out, in] matrices; the embedding is [V, C]
            t = torch.empty(p.shape, device=device).normal_(0, p.shape[-1] ** -0.5, generator=g)
        sd[name] = t.to(torch.bfloat16).cpu()
    m.save_pretrained(path, tokenizer=tok, state_dict=sd)
    return path


def synthetic_rows(path, count, prompt_len, teacher_len, seed=0):
    """`count` data rows of random one-letter words (one token each with synthetic_tokenizer): prompts
    of prompt_len[0]..prompt_len[1] words, teacher answers of teacher_len words (longer than
    --max-new-tokens: cut, like the samples of a random model, which seldom stop)."""
    import random
    import string
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(string.ascii_lowercase) for _ in range(k))
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"id": f"synthetic-{i}", "messages": [{"role": "user", "content": words(
                rng.randint(*prompt_len))}], "teacher": words(teacher_len)}) + "\n")
    return path


def diff(x, y):
    return float((x.float() - y.float()).abs().max())


def check_parity(ckpt, device, length):
    """Logits of our model in bf16 against itself in fp32 and against transformers' in bf16 (and
    fp32), on random token rows; also the per-token log-probs training uses."""
    from transformers import AutoModelForCausalLM
    cfg = student_config(ckpt)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(cfg.vocab_size, (4, length), generator=g).to(device)
    out = {}
    with torch.no_grad():
        for dt in (torch.float32, torch.bfloat16):
            ours = Transformer.from_pretrained(ckpt, dtype=dt, device=device).eval()
            out[f"ours_{dt}"] = ours(idx)
            out[f"lp_{dt}"] = token_logprobs(ours, idx)[0]
            del ours
            hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dt).to(device).eval()
            out[f"hf_{dt}"] = hf(idx).logits.float()
            del hf
    f32, b16 = out["ours_torch.float32"], out["ours_torch.bfloat16"]
    emit(check="parity", device=str(device), tokens=list(idx.shape), logits_absmax=round(float(f32.abs().max()), 4),
         ours_bf16_vs_fp32=diff(b16, f32), ours_bf16_vs_hf_bf16=diff(b16, out["hf_torch.bfloat16"]),
         ours_fp32_vs_hf_fp32=diff(f32, out["hf_torch.float32"]),
         hf_bf16_vs_fp32=diff(out["hf_torch.bfloat16"], out["hf_torch.float32"]),
         logprobs_bf16_vs_fp32=diff(out["lp_torch.bfloat16"], out["lp_torch.float32"]),
         top1_bf16_vs_fp32=round(float((b16.argmax(-1) == f32.argmax(-1)).float().mean()), 4))


def check_flash(cfgs, ckpt, device, dtype=torch.bfloat16):
    """flash-attn against SDPA through model.py's own attention functions, as the model calls them
    (model.use_flash picks flash-attn for half-precision CUDA tensors when it is installed): padded
    rows ([B, T, H, hd], causal) and packed prompts (varlen, cu_seqlens), with each model's GQA heads."""
    import model as M
    probe = torch.zeros(1, device=device, dtype=dtype)
    if M.flash_attn_func is None:
        return emit(check="flash", skipped="flash_attn is not installed (pip install -r requirements-gpu.txt)")
    if not M.use_flash(probe):
        return emit(check="flash", skipped=f"flash_attn is installed, but model.use_flash refuses {device} {dtype}")
    for cfg in cfgs:
        flash_vs_sdpa(M, cfg, device, dtype)
    flash_vs_sdpa_model(M, ckpt, device, dtype)


def flash_vs_sdpa(M, cfg, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rnd = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype)
    B, T = 4, 64 if device.type == "cpu" else 512
    q, k, v = rnd(B, T, H, hd), rnd(B, T, Hkv, hd), rnd(B, T, Hkv, hd)
    lens = [T // 2 + 3, 1, T, T // 8 + 1]  # packed prompts of unequal lengths, one of a single token
    N = sum(lens)
    pq, pk, pv = rnd(N, H, hd), rnd(N, Hkv, hd), rnd(N, Hkv, hd)
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(device, torch.int32)
    flash = (M.causal_attention(q, k, v), M.packed_attention(pq, pk, pv, lens, cu))
    with patched(M, "use_flash", lambda t: False):
        sdpa = (M.causal_attention(q, k, v), M.packed_attention(pq, pk, pv, lens, cu))
    emit(check="flash", device=str(device), dtype=str(dtype).removeprefix("torch."), heads=[H, Hkv, hd],
         padded_shape=[B, T], packed_lens=lens, padded_max_abs=diff(flash[0], sdpa[0]),
         packed_max_abs=diff(flash[1], sdpa[1]), sdpa_absmax=round(float(sdpa[0].abs().max()), 3))


def flash_vs_sdpa_model(M, ckpt, device, dtype, new_tokens=16):
    """The same through the whole model: logits of right-padded rows (valid positions), and greedy
    samples, whose prompts are packed for the prefill."""
    m = Transformer.from_pretrained(ckpt, dtype=dtype, device=device).eval()
    g = torch.Generator().manual_seed(2)
    T = 64 if device.type == "cpu" else 512
    lens = torch.tensor([T, T // 2, 5, T - 7])
    idx = torch.randint(m.config.vocab_size, (len(lens), T), generator=g)
    prompts = [r[:n].tolist() for r, n in zip(idx, lens)]
    valid = (torch.arange(T)[None] < lens[:, None]).to(device)
    idx = idx.to(device)
    with torch.no_grad():
        flash = m(idx), generate(m, prompts, max_new_tokens=new_tokens, temperature=0)
        with patched(M, "use_flash", lambda t: False):
            sdpa = m(idx), generate(m, prompts, max_new_tokens=new_tokens, temperature=0)
    emit(check="flash_model", device=str(device), dtype=str(dtype).removeprefix("torch."), rows=lens.tolist(),
         logits_max_abs=diff(flash[0][valid], sdpa[0][valid]), logits_absmax=round(float(sdpa[0].abs().max()), 3),
         greedy_equal=sum(a.tokens == b.tokens for a, b in zip(flash[1], sdpa[1])) / len(prompts))


def hf_greedy(hf, prompts, new_tokens, pad_id, device):
    """transformers' greedy generate on left-padded prompts, exactly new_tokens per row (no stop id)."""
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                          pad_token_id=pad_id)
    return out[:, T:].tolist()


def check_sampler(ckpt, tok, device, rows, new_tokens, repeats=2):
    """model.generate against transformers' generate, greedy with no stop token: the same tokens (in
    fp32, where a random model's near-ties are not decided by rounding; bf16 reported too), and the
    tokens per second of both in bf16 on `rows` rows."""
    from transformers import AutoModelForCausalLM
    g = torch.Generator().manual_seed(1)
    V = len(tok)
    lens = [7, 23, 3, 16] if device.type == "cpu" else [37, 201, 5, 120]
    prompts = [torch.randint(V, (L,), generator=g).tolist() for L in lens]
    line = dict(check="sampler", device=str(device), prompts=len(prompts), new_tokens=new_tokens)
    for dt in (torch.float32, torch.bfloat16):
        ours = Transformer.from_pretrained(ckpt, dtype=dt, device=device).eval()
        hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dt).to(device).eval()
        hf.generation_config.eos_token_id = None  # run every row to new_tokens, like ours with no stop ids
        a = [s.tokens for s in generate(ours, prompts, n=1, max_new_tokens=new_tokens, temperature=0)]
        b = hf_greedy(hf, prompts, new_tokens, tok.pad_token_id, device)
        same_prefix = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), new_tokens) for r, s in zip(a, b)]
        name = str(dt).removeprefix("torch.")
        line[f"greedy_equal_{name}"] = sum(r == s for r, s in zip(a, b)) / len(a)
        line[f"greedy_prefix_{name}"] = round(sum(same_prefix) / (len(a) * new_tokens), 3)
        if dt == torch.bfloat16:  # tokens per second, alternating so that drift hits both alike
            batch = (prompts * rows)[:rows]
            run = dict(ours=lambda: generate(ours, batch, n=1, max_new_tokens=new_tokens, temperature=0),
                       hf=lambda: hf_greedy(hf, batch, new_tokens, tok.pad_token_id, device))
            times = {k: [] for k in run}
            for r in range(repeats + 1):  # the first is a warmup
                for k, fn in run.items():
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    if r:
                        times[k].append(time.perf_counter() - t0)
            tps = {k: rows * new_tokens / statistics.median(v) for k, v in times.items()}
            line.update(rows=rows, ours_tok_s=round(tps["ours"], 1), hf_tok_s=round(tps["hf"], 1),
                        ratio=round(tps["ours"] / tps["hf"], 3))
        ours = hf = run = None  # free this dtype's models before the next
    emit(**line)


def check_gad_step(name, cfg, tok, ckpt, tmp, s, rates):
    """train_gad.main on a random model for s["steps"] steps of the GAD stage: time per phase (medians
    after the first step), peak memory and each update's FLOP/s against the bf16 rate."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where train_gad runs
    data = synthetic_rows(os.path.join(tmp, f"{name}.jsonl"), s["prompts"], s["prompt_len"], s["new_tokens"] + 8)
    rows, _ = tokenize_rows(read_rows(data), tok, end_of_turn_id(tok), 2048, s["new_tokens"])
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    recs = run_gad(["--student", ckpt, "--train-data", data, "--warmup-steps", "0", "--max-steps", str(s["steps"]),
                    "--prompts-per-step", str(s["prompts"]), "--n-samples", str(s["n"]),
                    "--max-new-tokens", str(s["new_tokens"]), "--token-budget", str(s["token_budget"])],
                   os.path.join(tmp, f"run-{name}"))
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else maxrss_gib()
    d_fs, g_fs = [], []
    for r in recs[1:]:
        d, g = update_flops(cfg, *step_lengths(rows, r, s["n"]))
        d_fs.append(d / r["t_d"])
        g_fs.append(g / r["t_g"])
    d_rate, g_rate = statistics.median(d_fs), statistics.median(g_fs)
    line = dict(check="gad_step", shape=name, device=str(dev), dtype="bfloat16" if fast_bf16(dev) else "float32",
                params_m=round(count_params(cfg) / 1e6, 1), prompts=s["prompts"], n=s["n"], new_tokens=s["new_tokens"],
                steps=s["steps"], resp_len=round(statistics.mean(r["resp_len_mean"] for r in recs), 1),
                **{k: round(after_first(recs, k), 3) for k in ("t_step", "t_sample", "t_d", "t_g")},
                sample_tok_s=round(statistics.median(s["prompts"] * s["n"] * r["resp_len_mean"] / r["t_sample"]
                                                     for r in recs[1:]), 1),
                d_tflops=round(d_rate / 1e12, 3), g_tflops=round(g_rate / 1e12, 3), peak_gib=peak,
                peak_kind="max_memory_allocated" if dev.type == "cuda" else "ru_maxrss so far")
    for src, rate in rates.items():
        line[f"d_mfu_{src}"] = round(d_rate / rate, 3)
        line[f"g_mfu_{src}"] = round(g_rate / rate, 3)
    emit(**line)


def count_params(cfg):
    with torch.device("meta"):
        return Transformer(cfg).num_params()


def gpu_check(a):
    """Every check in turn; one that fails prints its error line and the others still run."""
    t_start = time.perf_counter()
    device = torch.device(a.device)
    mode = "tiny" if a.tiny else "full"
    s = dict(CHECK[mode])
    s.update({k: v for k, v in dict(prompts=a.check_prompts, n=a.check_samples, new_tokens=a.check_new_tokens,
                                    steps=a.check_steps).items() if v is not None})
    env = dict(check="env", mode=mode, device=str(device), torch=torch.__version__, cuda=torch.version.cuda,
               threads=torch.get_num_threads(), work=s)
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    import model as M
    env["flash_attn"] = getattr(sys.modules.get("flash_attn"), "__version__", None) if M.flash_attn_func else None
    # the matrix rate MFU is taken against: the table's dense bf16 peak for a known GPU, and always the
    # rate measured here (an [8192, 8192] @ [8192, 8192] bf16 product on a GPU; the SmolLM2 MLP's on a CPU)
    rates = {}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        peak = next((p for k, p in GPU_BF16_PEAK if k in env["gpu"]), None)
        if peak:
            rates["table"] = peak
        rates["measured"] = matmul_rate(8192, 8192, 8192, torch.bfloat16, device, reps=5, inner=10)
    else:
        rates["measured"] = matmul_rate(2048, 576, 1536, torch.bfloat16, device)
    env.update({f"bf16_tflops_{k}": round(v / 1e12, 3) for k, v in rates.items()})
    emit(**env)

    failed = []

    def run(name, fn, *args):
        try:
            fn(*args)
        except Exception as e:  # one broken check must not hide the others' results
            import traceback
            traceback.print_exc()
            failed.append(name)
            emit(check=name, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")

    with tempfile.TemporaryDirectory(prefix="nanogad-gpu-check-") as tmp:
        ckpts = {}
        for name in SHAPES:
            cfg = shape_config(name, a.tiny)
            tok = synthetic_tokenizer(cfg.vocab_size)
            ckpts[name] = (cfg, tok, random_checkpoint(os.path.join(tmp, name), cfg, tok, device))
        cfg, tok, ckpt = ckpts["smollm2-135m"]
        run("parity", check_parity, ckpt, device, s["parity_len"])
        run("flash", check_flash, [c[0] for c in ckpts.values()], ckpt, device)
        run("sampler", check_sampler, ckpt, tok, device, s["sampler_rows"], s["sampler_tokens"])
        for name, (cfg_, tok_, ckpt_) in ckpts.items():
            run("gad_step", check_gad_step, name, cfg_, tok_, ckpt_, tmp, s, rates)
    emit(check="done", wall_s=round(time.perf_counter() - t_start, 1), failed=failed)
    if failed:
        sys.exit(1)


def dtype_list(text):
    """--dtype: a comma list of float32, bfloat16, float16 (checked at parse time)."""
    names = text.split(",")
    bad = [d for d in names if d not in ("float32", "bfloat16", "float16")]
    if bad or not text:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of float32, bfloat16, float16")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--only", choices=("sampler", "logprobs", "step"), help="run one measurement (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", type=dtype_list, help="default: bfloat16 on cuda, float32 on cpu; the sampler takes a "
                   "comma list (float32,bfloat16), one measurement each")
    p.add_argument("--model", help="HF directory or .gguf (default: the SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--prompts", type=POS_INT, default=16)
    p.add_argument("--n", type=POS_INT, default=1, help="samples per prompt")
    p.add_argument("--new-tokens", type=POS_INT, default=128)
    p.add_argument("--temperature", type=POS, default=0.8)
    p.add_argument("--repeats", type=POS_INT, default=3, help="timed sampler runs each, after one warmup")
    p.add_argument("--threads", type=NONNEG_INT, default=1,
                   help="CPU threads; 0 keeps torch's default (default: 1, see main)")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of model.generate")
    p.add_argument("--compile", action="store_true", help="sampler: ours with generate(compile=True)")
    p.add_argument("--tokens", type=POS_INT, default=4096, help="log-probs: sequence length")
    p.add_argument("--vocab", type=POS_INT, default=152064, help="log-probs: vocabulary (Qwen2.5's)")
    p.add_argument("--hidden", type=POS_INT, default=896, help="log-probs: hidden size (Qwen2.5-0.5B's)")
    p.add_argument("--chunk", type=POS_INT, default=LOGPROB_CHUNK, help="log-probs: rows per chunk")
    p.add_argument("--logprob-repeats", type=POS_INT, default=1, help="log-probs: timed runs per variant")
    p.add_argument("--logprobs-child", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    # step: ours against TRL's GRPOTrainer (defaults: issue 11's comparison)
    p.add_argument("--step-data", default="data/demo.train.jsonl", help="step: its first --step-prompts prompts")
    p.add_argument("--step-prompts", type=POS_INT, default=4, help="step: prompts per step")
    p.add_argument("--step-samples", type=number(int, low=2), default=4,
                   help="step: samples per prompt (GAD needs >= 2)")
    p.add_argument("--step-new-tokens", type=POS_INT, default=64, help="step: max new tokens")
    p.add_argument("--steps", type=number(int, low=2), default=3,
                   help="step: steps of each trainer; the median is over those after the first")
    p.add_argument("--step-threads", type=NONNEG_INT, default=2, help="step: CPU threads; 0 keeps --threads'")
    p.add_argument("--trl", choices=("both", "bf16", "fp32"), default="both",
                   help="step: TRL's precision settings to run; ours is compared with the faster")
    # gpu-check: one command for a one-GPU session (random weights: no hub, no registry)
    p.add_argument("--gpu-check", action="store_true", help="bf16 parity, flash-attn vs SDPA, sampler vs "
                   "transformers, GAD steps on SmolLM2-135M- and Qwen2.5-1.5B-shaped random models (~4 min on an H100)")
    p.add_argument("--tiny", action="store_true", help="gpu-check at toy sizes (CI: --gpu-check --device cpu --tiny)")
    p.add_argument("--check-prompts", type=POS_INT, help="gpu-check: prompts per GAD step (default 8; tiny 2)")
    p.add_argument("--check-samples", type=number(int, low=2), help="gpu-check: samples per prompt (default 8; tiny 2)")
    p.add_argument("--check-new-tokens", type=POS_INT, help="gpu-check: new tokens (default 256; tiny 8)")
    p.add_argument("--check-steps", type=number(int, low=2), help="gpu-check: GAD steps per model (default 3; tiny 2)")
    a = p.parse_args(argv)
    if a.tiny and not a.gpu_check:
        p.error("--tiny goes with --gpu-check")
    if a.gpu_check and torch.device(a.device).type != "cuda" and not a.tiny:
        p.error(f"--gpu-check runs 1.5B-parameter steps: it needs a CUDA GPU (on {a.device}: --gpu-check --tiny)")
    return a


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    dtypes = [getattr(torch, d) for d in (a.dtype or ("bfloat16" if device.type == "cuda" else "float32")).split(",")]
    dtype = dtypes[0]
    # On a shared CPU runner, OpenMP threads spin waiting for a core another process holds: a
    # [16, 576] x [576, 1536] decode matmul took 16 ms with 2 threads against 0.5 ms with 1, which
    # swamps whatever is being compared. Both samplers run under the same setting either way.
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.logprobs_child:
        return logprobs_child(a, device, dtype)
    if a.gpu_check:
        return gpu_check(a)
    if a.only in (None, "sampler"):
        for d in dtypes:
            bench_sampler(a, device, d)
    if a.only in (None, "logprobs"):
        bench_logprobs(a, device, dtype)
    if a.only in (None, "step"):
        bench_step(a, device)


if __name__ == "__main__":
    try:
        main()
    except (DataError, LoadError) as e:  # a bad input file or model: one line, no traceback
        sys.exit(f"bench.py: {e}")
