"""
Speed and memory of nanoGAD's hot paths, against reference implementations and against the machine's
own limits, one JSON line each. Ratios are taken within one run (they hold on a noisy machine where
absolute numbers do not), and every line names the machine, its matrix instructions and its rates.

    python bench.py                                     # sampler, logprobs and step
    python bench.py --only sampler --shapes 16x1,2x8,16x4 --dtype float32,bfloat16 [--profile]
    python bench.py --only logprobs --tokens 4096 --vocab 152064 --hidden 896
    python bench.py --only step [--steps 3 --step-prompts 4 --step-samples 4 --step-new-tokens 64]
    python bench.py --gpu-check                         # one GPU, ~4 min, random weights
    python bench.py --gpu-check --device cpu --tiny     # the same at toy sizes (CI)

sampler:  generate.generate against transformers' generate (same weights, prompts, temperature, top_p
          1, top_k off), per PROMPTSxSAMPLES shape, rows that stop ("stop") or run to --new-tokens
          ("forced"); beside it the decode bound: a step reads every weight and KV cache once (bytes over
          the copy bandwidth) and multiplies every row through every matrix (FLOPs over the matrix rate).
logprobs: chunked_logprobs against full logits, forward + backward, peak memory in fresh processes.
step:     GAD steps of train_gad.py (run as a program) against TRL's GRPOTrainer on the same prompts,
          batch and lengths, and the useful FLOP/s of our D and G updates as fractions of the matrix rates.
gpu-check: bf16 parity with fp32 and transformers, flash-attn against SDPA, the sampler, and GAD steps
          on random SmolLM2-135M- and Qwen2.5-1.5B-shaped models: no hub, registry or file needed.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from data import DataError, read_jsonl, read_rows, render_prompt, tokenize_rows
from discriminator import Discriminator, pad_id_for_scoring, save_discriminator
from distributed import fast_bf16
from flags import NONNEG_INT, POS, POS_INT, number
from generate import generate
from loading import (LoadError, config_from_hf, default_student, end_of_turn_id, load_model, load_tokenizer,
                     read_gguf, read_json, resolve_checkpoint, save_model, stop_token_ids)
from model import LOGPROB_CHUNK, ModelConfig, Transformer, chunked_logprobs, token_logprobs

ROOT = os.path.dirname(os.path.abspath(__file__))
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 17 times 23?",
             "Why is the sky blue?", "Give me a synonym for happy.", "Who wrote Hamlet?",
             "Explain, step by step, how a hash table works: how keys become positions, what happens on "
             "collisions, and why the table is resized as it fills.",
             "My sourdough comes out dense and flat although the starter bubbles well. What should I change first?",
             "Write a short story about a lighthouse keeper who finds a message in a bottle in her own hand.",
             "Compare renting and buying a home for a young couple in a large city, and recommend one.",
             "Summarize the main causes of the First World War in a few short paragraphs.",
             "What are the differences between a list, a tuple, a set and a dictionary in Python?"]


# -----------------------------------------------------------------------------
# the machine: what each line carries, and the limits each figure is compared with

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def isa():
    """The CPU's fastest matrix instructions, from /proc/cpuinfo's flags (Linux)."""
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return next((f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags), "baseline")


def matmul_rate(m, k, n, dtype, device, reps=5):
    """FLOP/s of an [m, k] @ [k, n] product: the median of `reps` timings after two untimed ones."""
    g = torch.Generator(device=device).manual_seed(0)
    x, w = (torch.randn(*s, generator=g, device=device).to(dtype) for s in ((m, k), (k, n)))
    for _ in range(2):
        x @ w
    return 2 * m * k * n / statistics.median(timed(lambda: x @ w, device)[0] for _ in range(reps))


def copy_bandwidth(device, mib=512, reps=5):
    """Bytes/s of a large tensor copy (read + write), the memory bound of decoding."""
    src = torch.ones(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.nbytes / statistics.median(timed(lambda: dst.copy_(src), device)[0] for _ in range(reps))


def measure_machine(device, cfg):
    """The header every line carries, and the rates: the matrix rate at the model's MLP shape (the
    best of a [2048, C] x [C, I] product in each dtype) and the copy bandwidth."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
        if os.path.exists("/proc/cpuinfo") else platform.processor())
    head = dict(machine=name, isa="cuda" if device.type == "cuda" else isa(), threads=torch.get_num_threads())
    rates = {dt: matmul_rate(2048, cfg.hidden_size, cfg.intermediate_size, getattr(torch, dt), device)
             for dt in ("bfloat16", "float32")}
    rates["copy"] = copy_bandwidth(device)
    head.update(bf16_gflops=round(rates["bfloat16"] / 1e9), fp32_gflops=round(rates["float32"] / 1e9),
                copy_gbs=round(rates["copy"] / 1e9, 1))
    return head, rates


HEAD = {}  # measure_machine's header, once it has run


def emit(**kw):
    print(json.dumps({**kw, **HEAD}), flush=True)


def matrix_params(cfg):
    """Parameters in matrix products per token: the blocks and the LM head (the embedding is a lookup)."""
    with torch.device("meta"):
        m = Transformer(cfg)
    body = sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("model.embed_tokens", "lm_head")))
    return body, cfg.hidden_size * cfg.vocab_size


def decode_bound(cfg, rows, context, dtype, rates):
    """Tokens/s no decoder can beat on this machine: each step reads every weight and each row's KV
    cache once (bytes / copy bandwidth) and multiplies each row through every matrix (FLOPs / the
    matrix rate); the step takes at least the larger."""
    body, head = matrix_params(cfg)
    size = torch.finfo(dtype).bits // 8
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * size
    t_mem = ((body + head) * size + rows * kv) / rates["copy"]
    t_flop = rows * 2 * (body + head) / rates.get(str(dtype).removeprefix("torch."), rates["bfloat16"])
    return rows / max(t_mem, t_flop)


def update_flops(cfg, d_lens, g_lens, ref=True):
    """Useful FLOPs of a GAD step's D update and G update, on each sequence's own tokens (padding not
    counted). A forward + backward through a matrix costs 6 FLOPs per parameter per token, a forward 2;
    causal attention over L tokens 2 L^2 H hd per layer forward. D: every teacher and sample sequence
    through the body. G: PPO over the samples (L - 1 positions) through the body and the LM head, whose
    chunks are recomputed in the backward (2 C V more per token), and the reference's forward."""
    body, head = matrix_params(cfg)
    att = cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    d_tok, d_sq = sum(d_lens), sum(L * L for L in d_lens)
    g_tok, g_sq = sum(L - 1 for L in g_lens), sum((L - 1) ** 2 for L in g_lens)
    d = 6 * body * d_tok + 6 * att * d_sq
    g = 6 * (body + head) * g_tok + 2 * head * g_tok + 6 * att * g_sq
    if ref:
        g += 2 * (body + head) * g_tok + 2 * att * g_sq
    return d, g


def step_lengths(rows, rec, n):
    """A step's sequence lengths when its batch is all of `rows`: D sees each teacher answer and its n
    samples, G the samples. Every sample counts as the step's mean length (token sums exact, the
    attention's sums of squares approximate)."""
    resp = rec["resp_len_mean"]
    samples = [len(r["prompt"]) + resp for r in rows for _ in range(n)]
    return [len(r["prompt"]) + len(r["teacher_ids"]) for r in rows] + samples, samples


def update_rates(cfg, rows, recs, n):
    """Median FLOP/s of D's and G's updates over the steps after the first."""
    flops = [update_flops(cfg, *step_lengths(rows, r, n)) for r in recs[1:]]
    return (statistics.median(d / r["t_d"] for (d, _), r in zip(flops, recs[1:])),
            statistics.median(g / r["t_g"] for (_, g), r in zip(flops, recs[1:])))


def run_train(flags, out_dir, threads):
    """train_gad.py as a program on one process, no checkpoints -> its metrics records. Its output goes
    to stderr: stdout holds this script's JSON lines only."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, os.path.join(ROOT, "train_gad.py"), *flags, "--eval-data", "", "--no-save",
           "--out-dir", out_dir, "--overwrite"]
    r = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"train_gad.py exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    return [rec for _, rec in read_jsonl(os.path.join(out_dir, "metrics.jsonl"))]


def after_first(recs, key):
    """The median of a metric over the steps after the first, which pays for lazy inits."""
    return statistics.median(r[key] for r in recs[1:])


def student_config(path):
    """The ModelConfig of a .gguf file or HF directory, without reading its weights."""
    p = resolve_checkpoint(path)
    return config_from_hf(read_gguf(p)[0] if p.endswith(".gguf") else read_json(os.path.join(p, "config.json")), p)


def maxrss_gib(who=resource.RUSAGE_SELF):
    return round(resource.getrusage(who).ru_maxrss / 2**20, 2)


# -----------------------------------------------------------------------------
# sampler: ours against transformers' generate, and against the decode bound

def hf_generate(hf, prompts, n, new_tokens, temperature, stops, pad_id, forced, seed=0):
    """transformers' generate on left-padded prompts -> the rows' new tokens (counted up to and including
    the first stop token; `forced` masks the stop ids until new_tokens). temperature 0: greedy."""
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    torch.manual_seed(seed)
    # top_k=0: transformers applies top_k=50 by default, which ours does not
    kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature else dict(do_sample=False)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, num_return_sequences=n,
                          pad_token_id=pad_id, eos_token_id=stops or None, min_new_tokens=new_tokens if forced else 0, **kw)
    rows = out[:, T:].tolist()
    return [r if forced or not stops else r[:next((i + 1 for i, t in enumerate(r) if t in stops), len(r))] for r in rows]


def load_hf(path, dtype, device):
    from transformers import AutoModelForCausalLM
    d, f = os.path.split(path) if path.endswith(".gguf") else (path, None)
    kw = dict(gguf_file=f, dtype=torch.float32) if f else dict(dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(d, trust_remote_code=False, **kw).to(device, dtype).eval()


def alternate(fns, repeats, device):
    """Each fn `repeats` times, taking turns so that drift in the machine's load hits all alike ->
    {name: [(seconds, result)]}; one untimed warmup each first."""
    for fn in fns.values():
        fn()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(timed(fn, device))
    return out


def sampler_line(ours, hf, cfg, prompts, n, new_tokens, temperature, stops, pad_id, forced, repeats, rates):
    """Ours against transformers on one batch, and the decode bound: the fields of a sampler line."""
    device, dtype = ours.lm_head.weight.device, ours.lm_head.weight.dtype
    res = alternate(dict(
        ours=lambda: [s.tokens for s in generate(ours, prompts, n=n, max_new_tokens=new_tokens, seed=1,
                                                 temperature=temperature, stop_ids=() if forced else stops)],
        hf=lambda: hf_generate(hf, prompts, n, new_tokens, temperature, stops, pad_id, forced, seed=1)), repeats, device)
    tps = {k: statistics.median(sum(map(len, out)) / s for s, out in v) for k, v in res.items()}
    mean_len = statistics.mean(len(r) for _, out in res["ours"] for r in out)
    bound = decode_bound(cfg, len(prompts) * n, statistics.mean(map(len, prompts)) + mean_len / 2, dtype, rates)
    return dict(shape=f"{len(prompts)}x{n}", dtype=str(dtype).removeprefix("torch."), mode="forced" if forced else "stop",
                new_tokens=new_tokens, ours_tok_s=round(tps["ours"], 1), hf_tok_s=round(tps["hf"], 1),
                ratio=round(tps["ours"] / tps["hf"], 3), mean_len=round(mean_len, 1), bound_tok_s=round(bound, 1),
                ours_of_bound=round(tps["ours"] / bound, 3))


def bench_sampler(a, device, dtype, rates):
    path = a.model or default_student()
    tok, cfg = load_tokenizer(path), student_config(path)
    stops = stop_token_ids(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    ours, hf = load_model(path, dtype=dtype, device=device).eval(), load_hf(path, dtype, device)
    for P, n in a.shapes:
        prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in (QUESTIONS * P)[:P]]
        if a.profile:
            profile(lambda: generate(ours, prompts, n=n, max_new_tokens=a.new_tokens, temperature=a.temperature,
                                     seed=0), device)
        for forced in (False, True):
            emit(bench="sampler", model=os.path.basename(path), temperature=a.temperature, repeats=a.repeats,
                 **sampler_line(ours, hf, cfg, prompts, n, a.new_tokens, a.temperature, stops, pad_id, forced,
                                a.repeats, rates))


def profile(fn, device, rows=20):
    """Where fn spends its time, by op and input shape: a table on stderr."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=acts, record_shapes=True) as prof:
        fn()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows, max_name_column_width=45),
          file=sys.stderr)


# -----------------------------------------------------------------------------
# log-probs: chunked against full logits, peak memory in fresh processes

def logprobs_child(a, device, dtype):
    """One variant in this fresh process; prints {"peak_bytes", "s"} for the parent."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(1, a.tokens, a.hidden, generator=g, device=device, dtype=dtype).mul_(0.5).requires_grad_()
    w = torch.randn(a.vocab, a.hidden, generator=g, device=device, dtype=dtype).mul_(0.02).requires_grad_()
    t = torch.randint(a.vocab, (1, a.tokens), generator=g, device=device)
    naive = lambda: torch.log_softmax((h @ w.t()).float(), -1).gather(-1, t[..., None]).squeeze(-1)  # [T, V] whole
    chunked = lambda: chunked_logprobs(h, w, t, chunk=a.chunk)[0]
    fn = naive if a.logprobs_child == "naive" else chunked
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)  # they live as long as the weights: inputs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # the kernel's high-water mark of resident memory, reset to what the inputs hold (Linux)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss_kib("VmRSS") * 1024
    s = timed(lambda: fn().sum().backward(), device)[0]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kib("VmHWM") * 1024
    print(json.dumps({"peak_bytes": peak - base, "s": s}))


def rss_kib(field):
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith(field + ":")).split()[1])


def bench_logprobs(a, device, dtype):
    res = {}
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, os.path.abspath(__file__), "--logprobs-child", variant, "--device", str(device),
               "--dtype", str(dtype).removeprefix("torch."), "--tokens", str(a.tokens), "--vocab", str(a.vocab),
               "--hidden", str(a.hidden), "--chunk", str(a.chunk), "--threads", str(a.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"bench.py: logprobs {variant} failed (rc {p.returncode}):\n{p.stderr[-2000:]}")
        res[variant] = json.loads(p.stdout.strip().splitlines()[-1])
    n, c = res["naive"], res["chunked"]
    emit(bench="logprobs", dtype=str(dtype).removeprefix("torch."), tokens=a.tokens, vocab=a.vocab, hidden=a.hidden,
         chunk=a.chunk, naive_peak_gib=round(n["peak_bytes"] / 2**30, 3), chunked_peak_gib=round(c["peak_bytes"] / 2**30, 3),
         naive_s=round(n["s"], 3), chunked_s=round(c["s"], 3), peak_ratio=round(n["peak_bytes"] / max(c["peak_bytes"], 1), 2),
         time_ratio=round(c["s"] / n["s"], 3))


# -----------------------------------------------------------------------------
# step: GAD steps of ours against steps of TRL's GRPOTrainer

STEP_TEMPERATURE = 0.8  # the paper's sampling temperature, train_gad's default


def trl_step(policy, reward, tok, rows, a, bf16, out_dir, device):
    """Steps of TRL's GRPOTrainer on our prompts, batch and lengths: num_generations = n, temperature
    and top_p as ours with top_k off, no gradient checkpointing, TRL's defaults otherwise (loss dapo,
    beta 0: no reference). -> per-step times, TRL's mean completion length and peak memory."""
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

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.update(logs or {})

    cfg = GRPOConfig(output_dir=out_dir, max_steps=a.steps, per_device_train_batch_size=a.step_prompts * a.step_samples,
                     gradient_accumulation_steps=1, num_generations=a.step_samples, top_p=1.0, top_k=0,
                     max_completion_length=a.step_new_tokens, temperature=STEP_TEMPERATURE, bf16=bf16,
                     use_cpu=device.type == "cpu", gradient_checkpointing=False, logging_strategy="no",
                     save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
    timer = Timer()
    stdout = sys.stdout
    sys.stdout = sys.stderr  # TRL's own printing: stdout is this script's JSON lines
    try:
        trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=cfg, processing_class=tok, callbacks=[timer],
                              train_dataset=Dataset.from_list([{"prompt": r["messages"]} for r in rows]))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    finally:
        sys.stdout = stdout
    mean_len = timer.logs.get("completions/mean_length")
    return dict(s=statistics.median(timer.times[1:]), times=[round(t, 3) for t in timer.times],
                resp_len=None if mean_len is None else round(float(mean_len), 1),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else maxrss_gib())


def gad_steps(student, rows, tok, a_steps, P, n, T, token_budget, threads, rates, tmp):
    """train_gad.py for a_steps GAD steps on exactly these P rows (every step's batch is all of them, so
    the step's lengths are known) -> its records and the summary fields: medians after the first step
    of each phase's time, peak memory, and D's and G's useful FLOP/s against the matrix rates."""
    data = os.path.join(tmp, "rows.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    recs = run_train(["--student", student, "--train-data", data, "--warmup-steps", "0", "--max-steps", str(a_steps),
                      "--prompts-per-step", str(P), "--n-samples", str(n), "--max-new-tokens", str(T),
                      "--temperature", str(STEP_TEMPERATURE), "--token-budget", str(token_budget)],
                     os.path.join(tmp, "run"), threads)
    toks, _ = tokenize_rows(rows, tok, end_of_turn_id(tok), 2048, T)  # as train_gad does
    d_rate, g_rate = update_rates(student_config(student), toks, recs, n)
    return recs, dict(**{k: round(after_first(recs, k), 3) for k in ("t_step", "t_sample", "t_d", "t_g")},
                      resp_len=round(statistics.mean(r["resp_len_mean"] for r in recs), 1),
                      peak_gib=round(max(r["peak_mem_gib"] for r in recs), 2),
                      d_gflops=round(d_rate / 1e9, 1), g_gflops=round(g_rate / 1e9, 1),
                      **{f"{k}_of_{short}": round(r / rates[dt], 3) for k, r in (("d", d_rate), ("g", g_rate))
                         for dt, short in (("bfloat16", "bf16"), ("float32", "fp32"))})


def bench_step(a, device, rates):
    rows = read_rows(a.step_data)  # first: a bad file costs one line and no model load
    P, n, T = a.step_prompts, a.step_samples, a.step_new_tokens
    if len(rows) < P:
        raise DataError(f"{a.step_data}: {len(rows)} rows; --step-prompts {P} needs {P}")
    rows, path = rows[:P], a.model or default_student()
    tok = load_tokenizer(path)
    torch.set_num_threads(a.step_threads or torch.get_num_threads())
    line = dict(bench="step", model=os.path.basename(path), prompts=P, n=n, new_tokens=T, steps=a.steps,
                ours_dtype="bfloat16" if fast_bf16(device) else "float32",
                ours_extra_work="ours also trains D and runs the reference's forward for the KL")
    with tempfile.TemporaryDirectory(prefix="nanogad-bench-") as tmp:
        recs, ours = gad_steps(path, rows, tok, a.steps, P, n, T, 2048, torch.get_num_threads(), rates, tmp)
        line.update({f"ours_{k}": v for k, v in ours.items()}, ours_times=[round(r["t_step"], 3) for r in recs])
        try:
            import trl
        except Exception as e:  # not installed, or not importable with this transformers
            line["trl"] = f"skipped: trl is not importable ({type(e).__name__}: {e}); pip install 'trl>=1.16,<2'"
            return emit(**line)
        policy = resolve_checkpoint(path)
        if not os.path.isdir(policy):  # a .gguf: TRL loads HF directories
            policy = os.path.join(tmp, "policy")
            save_model(load_model(path), policy, tokenizer=tok)
        reward = os.path.join(tmp, "reward")  # our D's layout, frozen (TRL never trains its reward models)
        save_discriminator(load_model(path, Discriminator), reward, tok, pad_token_id=pad_id_for_scoring(
            tok, stop_token_ids(tok)))
        res = {prec: trl_step(policy, reward, tok, rows, a, prec == "bf16", os.path.join(tmp, f"trl-{prec}"), device)
               for prec in (["bf16", "fp32"] if a.trl == "both" else [a.trl])}
    for prec, r in res.items():
        line.update({f"trl_{prec}_{k}": r[k] for k in ("s", "times", "resp_len", "peak_gib")})
    best = min(res, key=lambda k: res[k]["s"])
    emit(**line, trl_best=best, ratio=round(ours["t_step"] / res[best]["s"], 3),
         trl_settings=f"trl {trl.__version__} GRPOTrainer, num_generations={n}, top_k=0, beta 0 (no reference)")


# -----------------------------------------------------------------------------
# gpu-check: what a one-GPU session must report, on random weights

SYNTH_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad (never a stop token), chat markers
SYNTH_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # ChatML, as Qwen2.5's
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer): the synthetic tokenizer must match it
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# the two shapes, full and --tiny (each family's traits kept: GQA, tied head, Qwen2's qkv bias)
SHAPES = {
    "smollm2-135m": (dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                          rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
                     dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "qwen2.5-1.5b": (dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                          num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                          rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                          tie_word_embeddings=True, qkv_bias=True),
                     dict(vocab_size=640, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=16)),
}
# the GAD steps' work and the other checks' sizes. Full: ~4 minutes on one H100, so a rerun fits. Memory,
# 1.5B on one GPU: G and D ~25 GB each (fp32 weights, gradients, AdamW), the reference 6 GB, ~2.5 MB of
# bf16 activations per micro-batch token: a 4096-token budget keeps the peak near 65 GB.
CHECK = dict(full=dict(prompts=8, n=8, new_tokens=256, steps=3, prompt_len=(64, 192), token_budget=4096,
                       parity_len=256, sampler_rows=16, sampler_tokens=128),
             tiny=dict(prompts=2, n=2, new_tokens=8, steps=2, prompt_len=(4, 12), token_budget=256,
                       parity_len=16, sampler_rows=4, sampler_tokens=8))


def shape_config(name, tiny):
    full, small = SHAPES[name]
    return ModelConfig(**{**full, **(small if tiny else {})})


def synthetic_tokenizer(vocab_size):
    """A byte-level BPE tokenizer of exactly vocab_size ids with a chat template: the 256 byte symbols,
    one merge per lowercase letter (" x" is one token), the chat's special tokens, unused ids up to
    vocab_size. Byte-level with Qwen2's split, because transformers reads a qwen2 checkpoint's tokenizer
    back as Qwen2Tokenizer whatever class it was saved as."""
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
    return tok


def random_checkpoint(path, cfg, tok, device, seed=0):
    """An HF checkpoint of random weights shaped by cfg: matrices normal(0, 1/sqrt(fan_in)), so that the
    next token depends on the context (HF's 0.02 init with a tied head just repeats the last token),
    norms 1, biases 0; stored in bf16."""
    cfg.hf = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.device("meta"):
        m = Transformer(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {n: (torch.ones(p.shape) if n.endswith("norm.weight") else torch.zeros(p.shape) if n.endswith(".bias") else
              torch.empty(p.shape, device=device).normal_(0, p.shape[-1] ** -0.5, generator=g)).to(torch.bfloat16).cpu()
          for n, p in m.named_parameters()}
    save_model(m, path, tokenizer=tok, state_dict=sd)
    return path


def synthetic_rows(path, count, prompt_len, teacher_len, seed=0):
    """Rows of random one-letter words (one token each); teacher answers longer than the limit (cut)."""
    import random
    import string
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(string.ascii_lowercase) for _ in range(k))
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": f"synthetic-{i}", "messages": [{"role": "user", "content": words(
            rng.randint(*prompt_len))}], "teacher": words(teacher_len)}) + "\n" for i in range(count))
    return path


def diff(x, y):
    return float((x.float() - y.float()).abs().max())


def check_parity(ckpt, device, length):
    """Our logits in bf16 against fp32 and against transformers', and the training log-probs."""
    from transformers import AutoModelForCausalLM
    idx = torch.randint(student_config(ckpt).vocab_size, (4, length), generator=torch.Generator().manual_seed(0))
    idx, out = idx.to(device), {}
    with torch.no_grad():
        for dt in (torch.float32, torch.bfloat16):
            ours = load_model(ckpt, dtype=dt, device=device).eval()
            out["ours", dt], out["lp", dt] = ours(idx), token_logprobs(ours, idx)[0]
            hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dt, trust_remote_code=False).to(device).eval()
            out["hf", dt] = hf(idx).logits.float()
            del ours, hf
    f32, b16 = out["ours", torch.float32], out["ours", torch.bfloat16]
    emit(check="parity", tokens=list(idx.shape), logits_absmax=round(float(f32.abs().max()), 4),
         ours_bf16_vs_fp32=diff(b16, f32), ours_bf16_vs_hf_bf16=diff(b16, out["hf", torch.bfloat16]),
         ours_fp32_vs_hf_fp32=diff(f32, out["hf", torch.float32]),
         hf_bf16_vs_fp32=diff(out["hf", torch.bfloat16], out["hf", torch.float32]),
         logprobs_bf16_vs_fp32=diff(out["lp", torch.bfloat16], out["lp", torch.float32]),
         top1_bf16_vs_fp32=round(float((b16.argmax(-1) == f32.argmax(-1)).float().mean()), 4))


def check_flash(cfgs, ckpt, device, dtype=torch.bfloat16):
    """flash-attn against SDPA through model.py's attention functions (padded rows, packed prompts), per
    model shape, then through the whole model (logits and greedy samples)."""
    import model as M
    if M.flash_attn_func is None:
        return emit(check="flash", skipped="flash_attn is not installed (pip install -r requirements-gpu.txt)")
    if not M.use_flash(torch.zeros(1, device=device, dtype=dtype)):
        return emit(check="flash", skipped=f"flash_attn is installed, but model.use_flash refuses {device} {dtype}")
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device).to(dtype)
    B, T = 4, 64 if device.type == "cpu" else 512
    lens = [T // 2 + 3, 1, T, T // 8 + 1]  # packed prompts of unequal lengths, one of a single token
    cu = F.pad(torch.tensor(lens).cumsum(0), (1, 0)).to(device, torch.int32)
    for cfg in cfgs:
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense, packed = (rnd(B, T, H, hd), rnd(B, T, Hkv, hd), rnd(B, T, Hkv, hd)), \
            (rnd(sum(lens), H, hd), rnd(sum(lens), Hkv, hd), rnd(sum(lens), Hkv, hd))
        run = lambda: (M.causal_attention(*dense), M.packed_attention(*packed, lens, cu))
        flash, use_flash = run(), M.use_flash
        M.use_flash = lambda t: False
        try:
            sdpa = run()
        finally:
            M.use_flash = use_flash
        emit(check="flash", dtype=str(dtype).removeprefix("torch."), heads=[H, Hkv, hd], padded_shape=[B, T],
             packed_lens=lens, padded_max_abs=diff(flash[0], sdpa[0]), packed_max_abs=diff(flash[1], sdpa[1]),
             sdpa_absmax=round(float(sdpa[0].abs().max()), 3))
    m = load_model(ckpt, dtype=dtype, device=device).eval()
    rows = torch.tensor([T, T // 2, 5, T - 7])
    idx = torch.randint(m.config.vocab_size, (len(rows), T), generator=torch.Generator().manual_seed(2))
    prompts, valid = [r[:k].tolist() for r, k in zip(idx, rows)], (torch.arange(T)[None] < rows[:, None]).to(device)
    both = []
    for use in (M.use_flash, lambda t: False):
        flash_fn, M.use_flash = M.use_flash, use
        try:
            with torch.no_grad():
                both.append((m(idx.to(device)), generate(m, prompts, max_new_tokens=16, temperature=0)))
        finally:
            M.use_flash = flash_fn
    (fl, fg), (sd, sg) = both
    emit(check="flash_model", dtype=str(dtype).removeprefix("torch."), rows=rows.tolist(),
         logits_max_abs=diff(fl[valid], sd[valid]), logits_absmax=round(float(sd.abs().max()), 3),
         greedy_equal=sum(a.tokens == b.tokens for a, b in zip(fg, sg)) / len(prompts))


def check_sampler(ckpt, tok, device, rows, new_tokens, rates):
    """Greedy tokens of ours and of transformers with no stop token: equal in fp32 (in bf16 a random
    model's near-ties are decided by rounding; reported), then ours against transformers in bf16."""
    lens = [7, 23, 3, 16] if device.type == "cpu" else [37, 201, 5, 120]
    prompts = [torch.randint(len(tok), (L,), generator=torch.Generator().manual_seed(L)).tolist() for L in lens]
    line = dict(check="sampler")
    for dt in (torch.float32, torch.bfloat16):
        ours, hf = load_model(ckpt, dtype=dt, device=device).eval(), load_hf(ckpt, dt, device)
        hf.generation_config.eos_token_id = None
        a = [s.tokens for s in generate(ours, prompts, n=1, max_new_tokens=new_tokens, temperature=0)]
        b = hf_generate(hf, prompts, 1, new_tokens, 0, [], tok.pad_token_id, True)
        line[f"greedy_equal_{str(dt)[6:]}"] = sum(r == s for r, s in zip(a, b)) / len(a)
    line.update(sampler_line(ours, hf, student_config(ckpt), (prompts * rows)[:rows], 1, new_tokens, 0.8, [],
                             tok.pad_token_id, True, 2, rates))
    emit(**line)


def check_gad_step(name, cfg, tok, ckpt, tmp, s, rates):
    """train_gad.py on a random model: time per phase, peak memory and update FLOP/s."""
    rows = read_rows(synthetic_rows(os.path.join(tmp, f"{name}.jsonl"), s["prompts"], s["prompt_len"],
                                    s["new_tokens"] + 8))
    os.makedirs(os.path.join(tmp, name), exist_ok=True)
    _, fields = gad_steps(ckpt, rows, tok, s["steps"], s["prompts"], s["n"], s["new_tokens"], s["token_budget"],
                          torch.get_num_threads(), rates, os.path.join(tmp, name))
    emit(check="gad_step", shape=name, params_m=round(sum(matrix_params(cfg)) / 1e6, 1), prompts=s["prompts"],
         n=s["n"], new_tokens=s["new_tokens"], steps=s["steps"], **fields)


def gpu_check(a, device, rates):
    """Every check in turn; one that fails prints its error line and the others still run."""
    t_start, mode = time.perf_counter(), "tiny" if a.tiny else "full"
    s = {**CHECK[mode], **{k: v for k, v in dict(prompts=a.check_prompts, n=a.check_samples,
                                                   new_tokens=a.check_new_tokens, steps=a.check_steps).items() if v}}
    import model as M
    import transformers
    emit(check="env", mode=mode, torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
         flash_attn=getattr(sys.modules.get("flash_attn"), "__version__", None) if M.flash_attn_func else None, work=s)
    failed = []
    with tempfile.TemporaryDirectory(prefix="nanogad-gpu-check-") as tmp:
        ckpts = {}
        for name in SHAPES:
            cfg = shape_config(name, a.tiny)
            tok = synthetic_tokenizer(cfg.vocab_size)
            ckpts[name] = (cfg, tok, random_checkpoint(os.path.join(tmp, name), cfg, tok, device))
        cfg, tok, ckpt = ckpts["smollm2-135m"]
        checks = [("parity", check_parity, ckpt, device, s["parity_len"]),
                  ("flash", check_flash, [c[0] for c in ckpts.values()], ckpt, device),
                  ("sampler", check_sampler, ckpt, tok, device, s["sampler_rows"], s["sampler_tokens"], rates)]
        checks += [("gad_step", check_gad_step, name, *c, tmp, s, rates) for name, c in ckpts.items()]
        for name, fn, *args in checks:
            try:
                fn(*args)
            except Exception as e:  # one broken check must not hide the others' results
                import traceback
                traceback.print_exc()
                failed.append(name)
                emit(check=name, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    emit(check="done", wall_s=round(time.perf_counter() - t_start, 1), failed=failed)
    if failed:
        sys.exit(1)


# -----------------------------------------------------------------------------

def dtype_list(text):
    names = text.split(",")
    if not text or any(d not in ("float32", "bfloat16", "float16") for d in names):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of float32, bfloat16, float16")
    return text


def shape_list(text):
    """--shapes: a comma list of PROMPTSxSAMPLES, such as 16x1,2x8,16x4."""
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of PROMPTSxSAMPLES, such as 16x1,16x4")
    return shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    a = p.add_argument
    a("--only", choices=("sampler", "logprobs", "step"), help="run one measurement (default: all)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--dtype", type=dtype_list, help="default: bfloat16 on cuda and on CPUs with fast bf16, else float32; the "
      "sampler takes a comma list, one measurement each")
    a("--model", help="HF directory or .gguf (default: the SmolLM2-135M-Instruct GGUF)")
    a("--threads", type=NONNEG_INT, default=2, help="CPU threads; 0 keeps torch's default")
    a("--shapes", type=shape_list, default=shape_list("16x1,2x8,16x4"), help="sampler: PROMPTSxSAMPLES, comma list")
    a("--new-tokens", type=POS_INT, default=128)
    a("--temperature", type=POS, default=0.8)
    a("--repeats", type=POS_INT, default=3, help="sampler: timed runs each, after one warmup")
    a("--profile", action="store_true", help="sampler: also a torch.profiler table of generate per shape")
    a("--tokens", type=POS_INT, default=4096, help="log-probs: sequence length")
    a("--vocab", type=POS_INT, default=152064, help="log-probs: vocabulary (Qwen2.5's)")
    a("--hidden", type=POS_INT, default=896, help="log-probs: hidden size (Qwen2.5-0.5B's)")
    a("--chunk", type=POS_INT, default=LOGPROB_CHUNK, help="log-probs: rows per chunk")
    a("--logprobs-child", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    a("--step-data", default="data/demo.train.jsonl", help="step: its first --step-prompts prompts")
    a("--step-prompts", type=POS_INT, default=4)
    a("--step-samples", type=number(int, low=2), default=4, help="step: samples per prompt (GAD needs >= 2)")
    a("--step-new-tokens", type=POS_INT, default=64)
    a("--steps", type=number(int, low=2), default=3, help="step: steps of each trainer; medians after the first")
    a("--step-threads", type=NONNEG_INT, default=2, help="step: CPU threads of both trainers; 0: --threads'")
    a("--trl", choices=("both", "bf16", "fp32"), default="both", help="step: TRL's settings to run")
    a("--gpu-check", action="store_true", help="parity, flash-attn, sampler and GAD steps on random models")
    a("--tiny", action="store_true", help="gpu-check at toy sizes (CI: --gpu-check --device cpu --tiny)")
    a("--check-prompts", type=POS_INT, help="gpu-check: prompts per GAD step (default 8; tiny 2)")
    a("--check-samples", type=number(int, low=2), help="gpu-check: samples per prompt (default 8; tiny 2)")
    a("--check-new-tokens", type=POS_INT, help="gpu-check: new tokens (default 256; tiny 8)")
    a("--check-steps", type=number(int, low=2), help="gpu-check: GAD steps per model (default 3; tiny 2)")
    args = p.parse_args(argv)
    if args.tiny and not args.gpu_check:
        p.error("--tiny goes with --gpu-check")
    if args.gpu_check and torch.device(args.device).type != "cuda" and not args.tiny:
        p.error(f"--gpu-check runs 1.5B-parameter steps: it needs a CUDA GPU (on {args.device}: --gpu-check --tiny)")
    return args


def main(argv=None):
    a = parse_args(argv)
    device = torch.device(a.device)
    bf16 = device.type == "cuda" or fast_bf16(device)
    dtypes = [getattr(torch, d) for d in (a.dtype or ("bfloat16" if bf16 else "float32")).split(",")]
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.logprobs_child:
        return logprobs_child(a, device, dtypes[0])
    if a.only == "step" or a.only is None:
        read_rows(a.step_data)  # a bad file costs one line, before any measurement
    path = a.model or default_student()
    cfg = shape_config("smollm2-135m", a.tiny) if a.gpu_check else student_config(path)
    head, rates = measure_machine(device, cfg)
    HEAD.update(head)
    if a.gpu_check:
        return gpu_check(a, device, rates)
    if a.only in (None, "sampler"):
        for dt in dtypes:
            bench_sampler(a, device, dt, rates)
    if a.only in (None, "logprobs"):
        bench_logprobs(a, device, dtypes[0])
    if a.only in (None, "step"):
        bench_step(a, device, rates)


if __name__ == "__main__":
    try:
        main()
    except (DataError, LoadError) as e:  # a bad input file or model: one line, no traceback
        sys.exit(f"bench.py: {e}")
