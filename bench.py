"""
Measurements of nanoGAD's hot paths, one JSON line each. Ratios are taken within one run, so they
hold on a noisy shared machine where absolute numbers do not.

    python bench.py                       # both, on cuda (bf16) when available, else cpu (fp32)
    python bench.py --only sampler --prompts 16 --new-tokens 128 --repeats 3 [--n 4] [--profile]
    python bench.py --only logprobs --tokens 4096 --vocab 152064 --hidden 896

sampler:  model.generate against transformers' generate on the same weights, prompts and settings
          (temperature, top_p=1, top_k off), tokens counted alike: up to and including the stop
          token of each row. mode "stop" lets rows stop; mode "forced" makes every row run
          --new-tokens, which is the clean throughput ratio.
logprobs: chunked_logprobs (what token_logprobs runs after the last layer) against full logits ->
          log_softmax -> gather, forward + backward into both h and the LM head. Each variant runs in
          a fresh process, so its peak memory is its own: ru_maxrss on cpu, max_memory_allocated on
          cuda, minus what the inputs already hold.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from model import (LOGPROB_CHUNK, Transformer, chunked_logprobs, generate, load_tokenizer, render_prompt,
                   stop_token_ids)
from train_gad import default_student

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
                   top_p=1.0, stop_ids=() if forced else stops, seed=seed)
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
    run_ours(ours, prompts, a, stops, True, 0)  # warmup: allocator, kernels, lazy inits
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
        emit(bench="sampler", mode=mode, model=os.path.basename(path), device=str(device),
             dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(), prompts=a.prompts,
             n=a.n, new_tokens=a.new_tokens, temperature=a.temperature, repeats=a.repeats,
             ours_tokens=counts["ours"], hf_tokens=counts["hf"],
             ours_s=round(statistics.median(times["ours"]), 3), hf_s=round(statistics.median(times["hf"]), 3),
             ours_tok_s=round(med["ours"], 1), hf_tok_s=round(med["hf"], 1),
             ratio=round(med["ours"] / med["hf"], 3))


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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--only", choices=("sampler", "logprobs"), help="run one measurement (default: both)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--model", help="HF directory or .gguf (default: the SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=3, help="timed sampler runs each, after one warmup")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads; 0 keeps torch's default (default: 1, see main)")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler table of model.generate")
    p.add_argument("--tokens", type=int, default=4096, help="log-probs: sequence length")
    p.add_argument("--vocab", type=int, default=152064, help="log-probs: vocabulary (Qwen2.5's)")
    p.add_argument("--hidden", type=int, default=896, help="log-probs: hidden size (Qwen2.5-0.5B's)")
    p.add_argument("--chunk", type=int, default=LOGPROB_CHUNK, help="log-probs: rows per chunk")
    p.add_argument("--logprob-repeats", type=int, default=1, help="log-probs: timed runs per variant")
    p.add_argument("--logprobs-child", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    # On a shared CPU runner, OpenMP threads spin waiting for a core another process holds: a
    # [16, 576] x [576, 1536] decode matmul took 16 ms with 2 threads against 0.5 ms with 1, which
    # swamps whatever is being compared. Both samplers run under the same setting either way.
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.logprobs_child:
        return logprobs_child(a, device, dtype)
    if a.only in (None, "sampler"):
        bench_sampler(a, device, dtype)
    if a.only in (None, "logprobs"):
        bench_logprobs(a, device, dtype)


if __name__ == "__main__":
    main()
