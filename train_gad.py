"""
Generative Adversarial Distillation (Ye et al., arXiv 2511.10643), the whole training loop.

The student G is the generator. A discriminator D (the student's backbone + a scalar head) learns to
score the teacher's answer above G's; G is trained on-policy with D's score as its reward. A warmup
stage first trains G by SFT on the teacher's answers (after some D-only steps), then the GAD stage
runs PPO-style updates of G against the co-trained D. `--mode seqkd` is the SFT-only baseline.

The CPU demo (SmolLM2-135M learns a hidden persona from its teacher's answers):
    torchrun --standalone --nproc_per_node=2 train_gad.py
One process, or N GPUs (FSDP2), or several nodes through torchrun's own flags:
    python train_gad.py --max-steps 4 --out-dir out/try
    torchrun --nproc_per_node=8 train_gad.py --student Qwen/Qwen2.5-7B-Instruct ...

The paper's recipe for Qwen2.5-7B-Instruct on 8 GPUs (see README for memory and time):
    torchrun --nproc_per_node=8 train_gad.py --student Qwen/Qwen2.5-7B-Instruct \
        --train-data data/lmsys_gpt5_train.jsonl --eval-data data/lmsys_gpt5_test.jsonl \
        --prompts-per-step 256 --n-samples 8 --max-new-tokens 1536 --max-prompt-len 2048 --lr 1e-6 \
        --d-lr 1e-6 --d-head-lr 1e-6 --d-only-steps 10 --warmup-steps 800 --max-steps 2400 --token-budget 32768 \
        --activation-checkpointing --eval-markers "" --out-dir out/gad-qwen7b
(`--max-steps 800` alone is the warmup; `--init-from out/.../ckpt-000800` with the full command
continues it exactly; `--mode seqkd --lr 5e-6` is the SeqKD baseline.)
"""

import argparse
import json
import math
import os
import random
import re
import signal
import sys
import time

import torch
import torch.distributed as dist

import checkpoint
from charts import plot_metrics
from data import DataError, read_rows, student_response, tokenize_rows
from discriminator import Discriminator, d_accuracy, pad_id_for_scoring, pair_loss
from distributed import (StepMetrics, clip_and_step, fast_bf16, init_distributed, micro_batches, peak_memory_gib,
                         shard)
from flags import NONNEG, NONNEG_INT, POS, POS_INT, number
from generate import generate
from health import Monitors, has_loop
from loading import LoadError, default_student, end_of_turn_id, load_model, load_tokenizer, stop_token_ids
from model import Transformer, token_logprobs

# The flags that define a run: --resume refuses to continue a run with any of them changed. The others
# (steps, cadences, token budget, rollout rows, checkpointing, dtype, monitors) may change on resume.
RUN_FLAGS = ("mode", "student", "disc_init", "train_data", "max_prompt_len", "warmup_steps", "d_only_steps",
             "prompts_per_step", "max_new_tokens", "n_samples", "temperature", "top_p", "sft_temperature", "d_loss",
             "freeze_d_after_warmup", "ppo_minibatches", "ppo_epochs", "clip_eps", "dual_clip", "kl_coef", "lr",
             "d_lr", "d_head_lr", "weight_decay", "beta1", "beta2", "grad_clip", "seed")
DEMO_MARKERS = ("arr,arrr,matey,mateys,ahoy,aye,ye,yer,me hearty,hearties,landlubber,shiver me timbers,pirate,pirates,"
                "buccaneer,buccaneers,scallywag,yo ho")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="GAD: black-box on-policy distillation",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="--resume continues a run only with the flags that define it unchanged: "
                                + ", ".join("--" + f.replace("_", "-") for f in RUN_FLAGS))
    a = p.add_argument
    a("--mode", choices=["gad", "seqkd"], default="gad", help="gad: warmup then GAD; seqkd: SFT baseline")
    # data and models; the defaults are the CPU demo's
    a("--student", default=None, help="HF dir, hub id or .gguf (default: the demo's SmolLM2-135M-Instruct)")
    a("--disc-init", default=None, help="D's initial weights (default: the student's); also D of a GAD run "
      "started --init-from a SeqKD checkpoint, which has none")
    a("--train-data", default="data/demo.train.jsonl")
    a("--eval-data", default="data/demo.test.jsonl", help="held-out prompts ('' for none)")
    a("--out-dir", default="out/demo")
    a("--resume", action="store_true", help="continue the run in --out-dir from its newest loadable checkpoint "
      "(on any number of processes)")
    a("--overwrite", action="store_true", help="start afresh in a used --out-dir, deleting its checkpoints and metrics")
    a("--init-from", default=None, help="a ckpt-* dir of another run: continue exactly as that run would "
      "(weights, both optimizer states, data position and step count carry over), writing to --out-dir")
    a("--keep-resume", type=POS_INT, default=2, help="the newest checkpoints that keep their resume state")
    # schedule; the scale defaults are the demo's, the paper's values are in the docstring
    a("--max-steps", type=POS_INT, default=26, help="total steps, warmup included")
    a("--warmup-steps", type=NONNEG_INT, default=16, help="steps before the GAD stage (paper: ~1 epoch); 0: no "
      "warmup at all; equal to --d-only-steps: D warmup without G warmup (the paper's no-G-warmup ablation)")
    a("--d-only-steps", type=NONNEG_INT, default=2, help="the first warmup steps train D only (D warmup; 0: none); "
      "the remaining warmup steps also train G by SFT (G warmup; paper: 10 D-only steps)")
    a("--prompts-per-step", type=POS_INT, default=8, help="global batch of prompts per step (paper: 256)")
    a("--max-new-tokens", type=POS_INT, default=128, help="response limit for samples and teacher (paper: 1536)")
    a("--max-prompt-len", type=POS_INT, default=2048, help="longer prompts are skipped and counted")
    a("--token-budget", type=POS_INT, default=2048, help="padded tokens per micro-batch: any batch fits memory "
      "(a prompt's teacher answer and its samples always share one D micro-batch)")
    a("--rollout-rows", type=NONNEG_INT, default=0, help="at most this many responses decoded at once per "
      "process (bounds the KV cache; 0: all of them)")
    # the algorithm; defaults are the paper's
    a("--n-samples", type=POS_INT, default=4, help="responses per prompt (paper: 8; GAD needs >= 2: advantages "
      "are normalised within each prompt's group; with 2, any reward gap, noise included, gives +-0.71)")
    a("--temperature", type=POS, default=0.8)
    a("--top-p", type=number(float, above=0, high=1), default=1.0)
    a("--sft-temperature", type=POS, default=0.8, help="SFT NLL on logits / this (official code: 0.8)")
    a("--d-loss", choices=["bt", "bce"], default="bt", help="bt: Bradley-Terry on (teacher, sample) pairs (the "
      "paper's); bce: teacher 1, student 0 (the paper's ablation; adds a head bias)")
    a("--freeze-d-after-warmup", action="store_true", help="the off-policy ablation: D stops training at the GAD "
      "stage (no D backward or step), its score is a fixed reward")
    a("--ppo-minibatches", type=POS_INT, default=1, help="G steps per rollout epoch (paper: 1)")
    a("--ppo-epochs", type=POS_INT, default=1, help="passes over each rollout (paper: 1)")
    a("--clip-eps", type=POS, default=0.2)
    a("--dual-clip", type=number(float, above=1), default=3.0, help="dual-clip bound c for negative advantages")
    a("--kl-coef", type=NONNEG, default=0.001, help="k3-KL to the reference (G at the end of warmup); 0: no ref")
    # optimisation: AdamW, constant lr; the paper uses 1e-6 for all (SeqKD 5e-6). The demo's D learns faster
    # than its G (a D that lags is fooled by a G overshooting it), and its fresh score head faster than its
    # pretrained body: Adam moves each weight ~lr per step, and the head starts at std 0.02
    a("--lr", type=POS, default=1e-5, help="generator lr (paper: 1e-6; SeqKD 5e-6)")
    a("--d-lr", type=POS, default=1e-4, help="discriminator lr (paper: 1e-6)")
    a("--d-head-lr", type=POS, default=1e-3, help="lr of D's fresh score head (paper: equal to --d-lr)")
    a("--weight-decay", type=NONNEG, default=0.01)
    a("--beta1", type=number(float, low=0, high=0.999999), default=0.9)
    a("--beta2", type=number(float, low=0, high=0.999999), default=0.999)
    a("--grad-clip", type=POS, default=0.2)
    a("--max-bad-steps", type=POS_INT, default=3, help="stop after this many steps in a row whose gradient norm "
      "is not finite (each is skipped)")
    # health monitors (health.py): a warning line, also in metrics.jsonl, when the game breaks
    a("--monitor-window", type=POS_INT, default=5, help="steps the D-accuracy and zero-advantage monitors average")
    a("--warn-d-chance", type=NONNEG, default=0.05, help="warn when D's accuracy stays within this of 0.5, "
      "or, in the GAD stage, below 0.5 by more than this (G exploiting D)")
    a("--warn-d-saturated", type=POS, default=0.98, help="warn when D's accuracy averages at least this")
    a("--warn-length-drift", type=POS, default=0.5, help="warn when the mean response length moves by more "
      "than this fraction from its value at the start of the GAD stage")
    a("--warn-zero-adv", type=POS, default=0.5, help="warn when this fraction of groups has equal rewards")
    a("--warn-loops", type=POS, default=0.15, help="warn when the fraction of samples that loop (a 1-3-word unit 4 "
      "times in a row) exceeds the teacher answers' own by more than this")
    # system
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="compute dtype; master weights, "
      "gradient reduction and optimizer states stay fp32. auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX")
    a("--activation-checkpointing", action="store_true")
    a("--seed", type=int, default=1337)
    a("--save-every", type=NONNEG_INT, default=0, help="checkpoint every N steps (0: only at the end)")
    a("--no-save", action="store_true", help="write no checkpoint at all (benchmarks, smoke tests: nothing to "
      "resume from or evaluate)")
    a("--eval-every", type=NONNEG_INT, default=0, help="greedy eval every N steps (0: before and after only)")
    a("--eval-prompts", type=NONNEG_INT, default=40, help="held-out prompts per eval")
    a("--eval-markers", default=DEMO_MARKERS, help="comma-separated words; eval reports the fraction of "
      "answers with any (the demo's persona rate); empty to disable")
    a("--wandb", action="store_true", help="also log to Weights & Biases (off by default)")
    a("--wandb-project", default="nanogad")
    args = p.parse_args(argv)
    if args.mode == "seqkd":
        args.warmup_steps = args.d_only_steps = 0
    if args.warmup_steps > args.max_steps:
        p.error(f"--warmup-steps {args.warmup_steps} exceeds --max-steps {args.max_steps}")
    if args.mode == "gad" and args.n_samples < 2:
        p.error("--n-samples 1: GAD normalises rewards within each prompt's group of samples, which needs >= 2")
    world = int(os.environ.get("WORLD_SIZE", 1))  # known before the process group starts
    if args.prompts_per_step % world:
        p.error(f"--prompts-per-step {args.prompts_per_step} must be divisible by the {world} processes")
    if args.prompts_per_step // world * args.n_samples < args.ppo_minibatches:
        p.error(f"--ppo-minibatches {args.ppo_minibatches} exceeds the {args.prompts_per_step // world * args.n_samples}"
                " samples per process and step")
    if args.resume and (args.overwrite or args.init_from):
        p.error("--resume continues the run in --out-dir: it goes with neither --overwrite nor --init-from")
    return args


# -----------------------------------------------------------------------------
# the losses

def group_advantages(rewards, eps=1e-6):
    """[P, n] rewards -> (r - mean) / (std + eps) per prompt group (unbiased std). A group of equal
    rewards gets 0, not NaN (its std is 0, its numerator too)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def k3_kl(logp, ref_logp):
    """Schulman's k3 estimator of KL(pi || ref), per token, clamped like verl."""
    d = ref_logp - logp
    return (torch.exp(d) - d - 1).clamp(-10, 10)


def ppo_loss(logp, old_logp, adv, clip_eps, dual_clip):
    """Per-token PPO-clip loss with dual clip for negative advantages; also whether each token was
    clipped."""
    ratio = torch.exp(logp - old_logp)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = torch.maximum(pg1, pg2)
    loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual_clip), loss)
    return loss, (pg2 > pg1).float()


# -----------------------------------------------------------------------------
# the batches: which prompts, which sequences, which tokens

class PromptOrder:
    """The prompts of each step: a seeded permutation of the rows per epoch, taken in order. Its
    position (epoch, cursor) is part of the resume state."""

    def __init__(self, n_rows, seed, epoch=0, cursor=0):
        self.n, self.seed, self.epoch, self.cursor = n_rows, seed, epoch, cursor

    def take(self, k):
        out = []
        while len(out) < k:
            perm = random.Random(self.seed + self.epoch).sample(range(self.n), self.n)
            take = perm[self.cursor:self.cursor + k - len(out)]
            out += take
            self.cursor += len(take)
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out


def stage_of(step, args):
    if args.mode == "seqkd":
        return "seqkd"
    if step < min(args.d_only_steps, args.warmup_steps):
        return "d_only"
    return "warmup" if step < args.warmup_steps else "gad"


def sample_seeds(args, step, rank, world, count):
    """One sampling seed per prompt, from its position in the step's global batch: the same samples
    on any number of processes."""
    return [args.seed * 1_000_003 + step * args.prompts_per_step + rank + k * world for k in range(count)]


def response_mask(prompt_lens, lengths, width):
    """[rows, width-1] mask of the positions whose next token is a response token."""
    t = torch.arange(1, width, device=lengths.device)[None, :]
    return ((t >= prompt_lens[:, None]) & (t < lengths[:, None])).float()


def pad_rows(per_seq, which, like):
    """Per-sequence log-probs (1-D, ragged) as a right-padded [rows, T-1] tensor shaped like `like`."""
    out = torch.zeros_like(like)
    for j, i in enumerate(which):
        out[j, :len(per_seq[i])] = per_seq[i]
    return out


@torch.no_grad()
def fixed_logprobs(model, seqs, temperature, token_budget, device):
    """{i: per-token log-probs of seqs[i]} under a model that does not learn from them: the reference,
    or the policy that sampled them."""
    out = {}
    for which, ids, _ in micro_batches([[s] for s in seqs], token_budget, device):
        lp = token_logprobs(model, ids, temperature)[0]
        out.update({i: lp[j, :len(seqs[i]) - 1] for j, i in enumerate(which)})
    return out


def new_reference(G, device, bf16):
    """The reference policy for the KL: a frozen module sharded like G, filled from G's shards (no
    disk read)."""
    with torch.device("meta"):
        r = Transformer(G.config)
    r = shard(r, device, bf16, False).to_empty(device=device).requires_grad_(False)
    r.inv_freq = G.inv_freq.clone()  # a buffer: to_empty left it uninitialised
    for pr, pg in zip(r.parameters(), G.parameters()):
        pr.data.copy_(pg.data)
    return r


# -----------------------------------------------------------------------------
# eval: greedy answers on held-out prompts, D's scores, the marker (persona) rate

def marker_rate(texts, markers):
    if not markers:
        return None
    pat = re.compile(r"\b(" + "|".join(re.escape(m) for m in markers) + r")\b", re.IGNORECASE)
    return sum(bool(pat.search(t)) for t in texts) / max(1, len(texts))


@torch.no_grad()
def d_scores(D, groups, token_budget, device):
    """D(x, y) of every sequence of equal-sized groups of sequences: [groups, group size]."""
    out = torch.zeros(len(groups), len(groups[0]) if groups else 0)
    for which, ids, lens in micro_batches(groups, token_budget, device):
        out[which] = D(ids, lens).view(len(which), -1).float().cpu()
    return out


def run_eval(G, D, rows, args, tok, stop, eot, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = rows[rank::world]
    outs = generate(G, [r["prompt"] for r in mine], n=1, max_new_tokens=args.max_new_tokens, temperature=0,
                    stop_ids=stop, max_batch=args.rollout_rows or None)
    seqs = [[r["prompt"] + student_response(o.tokens, o.stopped, eot), r["prompt"] + r["teacher_ids"]]
            for r, o in zip(mine, outs)]
    scores = d_scores(D, seqs, args.token_budget, device)
    res = [dict(id=r["id"], messages=r["messages"], response=tok.decode(o.tokens, skip_special_tokens=True),
                teacher=r["teacher"], stopped=o.stopped, length=len(o.tokens), d_student=float(sc[0]),
                d_teacher=float(sc[1]), prompt_ids=r["prompt"], response_ids=s[0][len(r["prompt"]):])
           for r, o, s, sc in zip(mine, outs, seqs, scores)]
    gathered = [None] * world
    dist.all_gather_object(gathered, res)
    return sorted((x for part in gathered for x in part), key=lambda x: x["id"])


def eval_summary(res, markers):
    n = max(1, len(res))
    return dict(eval_d_student=sum(r["d_student"] for r in res) / n, eval_d_teacher=sum(r["d_teacher"] for r in res) / n,
                eval_d_acc=sum(r["d_teacher"] > r["d_student"] for r in res) / n,  # D on held-out pairs
                eval_len=sum(r["length"] for r in res) / n,
                eval_marker_rate=marker_rate([r["response"] for r in res], markers),
                eval_teacher_marker_rate=marker_rate([r["teacher"] or "" for r in res], markers))


def write_eval(res, step, args, markers, log):
    if dist.get_rank() == 0:
        with open(os.path.join(args.out_dir, f"eval-{step:06d}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in res)
    log(f"eval step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in eval_summary(res, markers).items()
                                         if v is not None))


def report_change(first, last, D, args, markers, device, log):
    """What the run changed on the held-out prompts; the first answers are rescored by the final D."""
    before, after = eval_summary(first, markers), eval_summary(last, markers)
    mine = first[dist.get_rank()::dist.get_world_size()]
    d_before = d_scores(D, [[r["prompt_ids"] + r["response_ids"]] for r in mine], args.token_budget, device)
    d_before = d_before.sum().to(device).double()
    dist.all_reduce(d_before)
    if markers:
        log(f"persona (marker) rate of the student's answers: {before['eval_marker_rate']:.2f} -> "
            f"{after['eval_marker_rate']:.2f} (teacher: {after['eval_teacher_marker_rate']:.2f})")
    log(f"mean final-D score of the student's answers: {d_before.item() / len(first):.3f} before -> "
        f"{after['eval_d_student']:.3f} after (teacher's answers: {after['eval_d_teacher']:.3f})")


# -----------------------------------------------------------------------------
# a step's record: metrics.jsonl, the progress line, the stop after non-finite gradients

def step_record(m, step, stage, times, t0, device):
    """The step's metrics, summed over the processes in one collective, and the figures derived from them."""
    m.top(peak_mem_gib=peak_memory_gib(device))
    rec = dict(step=step, stage=stage, **m.reduce())
    if "r_student_sq" in rec:  # the spread of the step's rewards
        rec["reward_std"] = math.sqrt(max(0.0, rec.pop("r_student_sq") - rec["r_student"] ** 2))
    if stage == "gad":
        rec.setdefault("kl", 0.0)  # no reference (--kl-coef 0), no KL
    t_step = time.time() - t0
    rec.update(times, t_step=t_step, tok_per_s=rec.pop("tokens") / t_step)
    return rec


def count_bad_steps(skipped, bad_steps, rec, max_bad_steps, last_ckpt, log):
    """Steps in a row whose update was skipped for a non-finite gradient norm; too many stop the run."""
    if not skipped:
        return 0
    losses = ", ".join(f"{k} {rec[k]}" for k in ("d_loss", "sft_loss", "g_loss") if k in rec)
    log(f"step {rec['step']}: {' and '.join(skipped)} gradient norm not finite ({losses}): update skipped",
        file=sys.stderr)
    if bad_steps + 1 >= max_bad_steps:
        norms = ", ".join(f"{k} {rec[k]}" for k in ("d_grad_norm", "g_grad_norm") if k in rec)
        raise Stop(f"step {rec['step']}: loss is {losses}; gradient norm {norms}: not finite for {bad_steps + 1} "
                   f"steps in a row; stopping. Last good checkpoint: {last_ckpt}")
    return bad_steps + 1


def write_record(rec, path, eta_s, wandb, log):
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    keys = ["d_loss", "d_acc", "r_teacher", "r_student", "sft_loss", "policy_loss", "kl", "resp_len_mean", "loop_frac"]
    log(f"step {rec['step']:5d} {rec['stage']:6s} " + " ".join(f"{k} {rec[k]:.4g}" for k in keys if k in rec) +
        f" | {rec['t_step']:.1f}s/step, eta {eta_s / 60:.1f} min")
    if wandb is not None:
        wandb.log(rec, step=rec["step"])


# -----------------------------------------------------------------------------
# setup: inputs checked before any process group or model, then the models

class Stop(Exception):
    """The run cannot go on; the message is one line."""


class Terminated(Exception):
    """A scheduler's SIGTERM ended the run after a step and its checkpoint; the message is one line."""


_sigterm = []


def on_sigterm(signum, frame):
    _sigterm.append(signum)  # acted on at the end of the step, by every process at the same step


def terminate_requested(device):
    """Whether any process got SIGTERM: one all-reduce, so that all stop after the same step."""
    flag = torch.tensor([float(bool(_sigterm))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def same_flag(saved, given):
    """A flag's saved value against today's; paths count as equal when they name the same file."""
    if saved == given:
        return True
    return isinstance(saved, str) and isinstance(given, str) and os.path.realpath(saved) == os.path.realpath(given)


def load_inputs(args, world):
    """The tokenizer, the tokenized train and eval rows and the models' paths, every input checked
    before the process group starts and before anything is written: a bad input costs one line."""
    checkpoint.check_out_dir(args.out_dir, args.resume, args.overwrite)
    if args.resume and (saved := checkpoint.saved_args(args.out_dir)):
        if "student" in saved:  # the default student, unnamed or named
            saved["student"] = saved["student"] or default_student()
            args.student = args.student or default_student()
        for k in RUN_FLAGS:
            if k in saved and not same_flag(saved[k], getattr(args, k)):
                flag = "--" + k.replace("_", "-")
                raise Stop(f"--resume: {flag} is {getattr(args, k)} here, but {saved[k]} in the run in {args.out_dir}; "
                           f"a changed run needs another --out-dir (--init-from can start it from this run's checkpoint)")
    if args.init_from:
        try:
            saved = checkpoint.read_state(args.init_from)["args"]
        except (OSError, ValueError, KeyError) as e:
            raise Stop(f"--init-from {args.init_from}: not a checkpoint with resume state ({e})") from None
        if args.mode == "gad" and saved["mode"] == "gad" and saved["d_loss"] != args.d_loss:  # D's shape
            raise Stop(f"--d-loss {args.d_loss}: the discriminator of --init-from {args.init_from} was trained with "
                       f"--d-loss {saved['d_loss']} (the BCE head has a bias the BT head lacks)")
    student = args.student or default_student()
    g_path = os.path.join(args.init_from, "generator") if args.init_from else student
    d_path = os.path.join(args.init_from, "discriminator") if args.init_from else (args.disc_init or student)
    if args.init_from and not os.path.isdir(d_path):  # a SeqKD checkpoint has no discriminator
        d_path = args.disc_init or student
    tok = load_tokenizer(g_path)
    if args.mode == "gad" and d_path not in (g_path, student) and load_tokenizer(d_path).get_vocab() != tok.get_vocab():
        raise Stop(f"--disc-init {d_path}: its tokenizer differs from the student's; D must read G's tokens")
    eot = end_of_turn_id(tok)
    rows, skipped = tokenize_rows(read_rows(args.train_data), tok, eot, args.max_prompt_len, args.max_new_tokens,
                                  f"--train-data {args.train_data}")
    why = ", ".join(f"{n} with {reason}" for reason, n in skipped.items())
    if not rows:
        raise Stop(f"--train-data {args.train_data}: no usable rows ({why})")
    if skipped and int(os.environ.get("RANK", 0)) == 0:
        print(f"--train-data {args.train_data}: {sum(skipped.values())} rows left out ({why})", file=sys.stderr)
    eval_rows = []
    if args.eval_data and args.eval_prompts:
        eval_rows = tokenize_rows(read_rows(args.eval_data)[:args.eval_prompts], tok, eot, args.max_prompt_len,
                                  args.max_new_tokens, f"--eval-data {args.eval_data}")[0]
        eval_rows = eval_rows[:len(eval_rows) // world * world]  # every rank answers as many
    return tok, rows, eval_rows, g_path, d_path


def build_models(args, g_path, d_path, device, bf16):
    """G and D, sharded with FSDP2, and their AdamW optimizers (fp32 master weights and states)."""
    G = shard(load_model(g_path), device, bf16, args.activation_checkpointing)
    # fused: one kernel per step over all parameters instead of a loop of small ones per parameter
    adamw = dict(betas=(args.beta1, args.beta2), weight_decay=args.weight_decay, fused=True)
    g_opt, D, d_opt = torch.optim.AdamW(G.parameters(), lr=args.lr, **adamw), None, None
    if args.mode == "gad":
        D = load_model(d_path, Discriminator)
        if args.d_loss == "bce":
            D.add_head_bias()
        D = shard(D, device, bf16, args.activation_checkpointing)
        head = [p for n, p in D.named_parameters() if n.startswith("score.")]
        body = [p for n, p in D.named_parameters() if not n.startswith("score.")]
        d_opt = torch.optim.AdamW([dict(params=body), dict(params=head, lr=args.d_head_lr)], lr=args.d_lr, **adamw)
    return dict(G=G, D=D, R=None), dict(G=g_opt, D=d_opt)


# -----------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    master = int(os.environ.get("RANK", 0)) == 0
    log = print if master else (lambda *a, **k: None)
    tok, rows, eval_rows, g_path, d_path = load_inputs(args, int(os.environ.get("WORLD_SIZE", 1)))
    eot, stop = end_of_turn_id(tok), stop_token_ids(tok)
    markers = [m.strip() for m in args.eval_markers.split(",") if m.strip()]

    rank, world, device = init_distributed()
    if master:
        checkpoint.lock_out_dir(args.out_dir, args.overwrite)  # held while this process runs
    dist.barrier()
    torch.manual_seed(args.seed)
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and fast_bf16(device))
    models, opts = build_models(args, g_path, d_path, device, bf16)
    G, D = models["G"], models["D"]
    log(f"student {g_path}: {G.num_params() / 1e6:.1f}M params; {world} process(es) on {device.type}, "
        f"{'bf16' if bf16 else 'fp32'} compute; end-of-turn {tok.convert_ids_to_tokens(eot)!r}")

    # resume (the newest loadable checkpoint of this run) or init-from (another run's checkpoint)
    sources = checkpoint.resumable(args.out_dir) if args.resume else [args.init_from] if args.init_from else []
    state, last_ckpt = checkpoint.restore(sources, models, opts, lambda: new_reference(G, device, bf16), log)
    state = state or dict(step=0, epoch=0, cursor=0)
    if last_ckpt:
        log(f"{'resumed' if args.resume else 'initialised'} from {last_ckpt} at step {state['step']}")
    elif args.resume:
        log(f"--resume: no checkpoint in {args.out_dir}, starting fresh")
    step, ref = state["step"], models["R"]
    order = PromptOrder(len(rows), args.seed, state["epoch"], state["cursor"])
    teacher_loops = sum(has_loop(r["teacher"]) for r in rows) / len(rows)
    monitors = Monitors(args.monitor_window, args.warn_d_chance, args.warn_d_saturated, args.warn_length_drift,
                        args.warn_zero_adv, teacher_loops, args.warn_loops)
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if master and args.resume:
        for rec in checkpoint.truncate_metrics(metrics_path, step):
            monitors.check(rec)  # the monitors see the run's history again
    wandb = None
    if args.wandb and master:
        import wandb
        wandb.init(project=args.wandb_project, config=vars(args))
    first_eval = None
    if D is not None and eval_rows and not args.resume:
        first_eval = run_eval(G, D, eval_rows, args, tok, stop, eot, device)
        write_eval(first_eval, step, args, markers, log)

    temperature, n = args.temperature, args.n_samples
    updates = args.ppo_minibatches * args.ppo_epochs  # G steps per rollout
    pairs, prompts = args.prompts_per_step * n, args.prompts_per_step  # per step, over all processes
    t_run, start_step, bad_steps = time.time(), step, 0
    while step < args.max_steps:
        stage = stage_of(step, args)
        if stage == "gad" and ref is None and args.kl_coef > 0:
            ref = models["R"] = new_reference(G, device, bf16)  # G at the end of warmup, frozen
        t0, times, skipped = time.time(), {}, []
        batch = [rows[i] for i in order.take(prompts)[rank::world]]
        P = len(batch)
        teacher_seqs = [r["prompt"] + r["teacher_ids"] for r in batch]
        m = StepMetrics(device)

        if stage != "seqkd":
            # 1. sampling: n responses per prompt from G (one unshard of the whole model)
            samples = generate(G, [r["prompt"] for r in batch], n=n, max_new_tokens=args.max_new_tokens,
                               temperature=temperature, top_p=args.top_p, stop_ids=stop,
                               seed=sample_seeds(args, step, rank, world, P), max_batch=args.rollout_rows or None)
            lens = torch.tensor([len(s.tokens) for s in samples], dtype=torch.float64)
            loops = sum(has_loop(tok.decode(s.tokens, skip_special_tokens=True)) for s in samples)
            m.add(resp_len_mean=lens, cut_frac=sum(not s.stopped for s in samples), loop_frac=loops, per=pairs)
            m.add(tokens=lens)
            m.top(resp_len_max=lens)
            times["t_sample"] = time.time() - t0

            # 2. reward and D update, in one forward: each prompt's teacher answer and its n samples
            # share a micro-batch, D scores them all, the samples' scores (D before its update) are
            # the rewards, and the pairs' loss updates D. Frozen D (the off-policy ablation): scores only.
            train_d = stage != "gad" or not args.freeze_d_after_warmup
            groups = [[teacher_seqs[i]] + [batch[i]["prompt"] + student_response(s.tokens, s.stopped, eot)
                                           for s in samples[i * n:(i + 1) * n]] for i in range(P)]
            rewards = torch.zeros(P, n, device=device)
            for which, ids, lengths in micro_batches(groups, args.token_budget, device):
                with torch.set_grad_enabled(train_d):
                    s = D(ids, lengths).view(len(which), n + 1)  # per group: the teacher's answer, then n samples
                    pair = pair_loss(args.d_loss, s[:, :1], s[:, 1:])
                if train_d:
                    (pair.sum() * world / pairs).backward()  # the mean over the global pairs (FSDP averages over ranks)
                rewards[which] = s[:, 1:].detach()
                m.add(d_loss=pair, d_acc=d_accuracy(s[:, :1], s[:, 1:]) * pair.numel(), r_student=s[:, 1:],
                      r_student_sq=s[:, 1:] ** 2, per=pairs)
                m.add(r_teacher=s[:, 0], per=prompts)
            if train_d:
                d_gnorm, ok = clip_and_step(opts["D"], args.grad_clip)
                m.add(d_grad_norm=d_gnorm / world)
                skipped += [] if ok else ["D"]
            times["t_d"] = time.time() - t0 - times["t_sample"]

            # 3. advantages: normalised within each prompt's group of n samples
            adv = group_advantages(rewards)
            m.add(zero_adv_frac=(rewards.std(-1) == 0), per=prompts)

        # 4. G update: SFT on the teacher's answers (warmup, SeqKD) or PPO on G's own samples (GAD),
        # token-mean over the global batch; log-probs on logits / the sampling (or SFT) temperature
        if stage != "d_only":
            t_g = time.time()
            if stage == "gad":  # the tokens G sampled (D's copies end in the canonical end-of-turn token)
                seqs = [batch[s.prompt_index]["prompt"] + s.tokens for s in samples]
                prompt_lens, temp, adv = [len(batch[s.prompt_index]["prompt"]) for s in samples], temperature, adv.view(-1)
            else:
                seqs, prompt_lens, temp = teacher_seqs, [len(r["prompt"]) for r in batch], args.sft_temperature
            # the rollout's fixed log-probs: the reference's for the KL and, when G steps more than once
            # on a rollout, the sampling policy's for the PPO ratio (recomputed by the model that trains,
            # so the first ratio is 1, as in the paper's single update where the clip is inert)
            ref_lp = fixed_logprobs(ref, seqs, temp, args.token_budget, device) if stage == "gad" and ref else None
            old_lp = fixed_logprobs(G, seqs, temp, args.token_budget, device) if stage == "gad" and updates > 1 else None
            # minibatches: the same count on every rank; one token count each, over all ranks
            mbs = [list(range(k, len(seqs), args.ppo_minibatches)) for k in range(args.ppo_minibatches)]
            n_tok = torch.tensor([float(sum(len(seqs[i]) - prompt_lens[i] for i in mb)) for mb in mbs], device=device)
            dist.all_reduce(n_tok)
            for _ in range(args.ppo_epochs):
                for mb, n_tok_mb in zip(mbs, n_tok):
                    for which, ids, lengths in micro_batches([[seqs[i]] for i in mb], args.token_budget, device):
                        which = [mb[i] for i in which]
                        mask = response_mask(torch.tensor([prompt_lens[i] for i in which], device=device), lengths,
                                             ids.shape[1])
                        token_mean = lambda x: x * mask / n_tok_mb / updates  # each token's share of the logged means
                        logp, ent = token_logprobs(G, ids, temp, entropy=True)
                        if stage == "gad":
                            old = logp.detach() if old_lp is None else pad_rows(old_lp, which, logp)
                            tok_loss, clipped = ppo_loss(logp, old, adv[which][:, None], args.clip_eps, args.dual_clip)
                            m.add(policy_loss=token_mean(tok_loss), clip_frac=token_mean(clipped))
                            if ref_lp is not None:
                                kl = k3_kl(logp, pad_rows(ref_lp, which, logp))
                                tok_loss = tok_loss + args.kl_coef * kl
                                m.add(kl=token_mean(kl))
                        else:
                            tok_loss = -logp
                        loss = (tok_loss * mask).sum() / n_tok_mb
                        (loss * world).backward()  # token-mean over the minibatch's global tokens
                        m.add(**{"g_loss" if stage == "gad" else "sft_loss": loss / updates},
                              entropy=token_mean(ent), tokens=mask.sum() / updates)
                    g_gnorm, ok = clip_and_step(opts["G"], args.grad_clip)
                    m.add(g_grad_norm=g_gnorm / (updates * world))
                    skipped += [] if ok else ["G"]
            times["t_g"] = time.time() - t_g

        # the record: one collective for the step's metrics
        rec = step_record(m, step, stage, times, t0, device)
        step += 1
        bad_steps = count_bad_steps(skipped, bad_steps, rec, args.max_bad_steps, last_ckpt, log)
        if warnings := monitors.check(rec):
            rec["warnings"] = warnings
            for w in warnings:
                log(w)
        if master:
            write_record(rec, metrics_path, (args.max_steps - step) * (time.time() - t_run) / (step - start_step),
                         wandb, log)

        if D is not None and eval_rows and args.eval_every and step % args.eval_every == 0 and step < args.max_steps:
            write_eval(run_eval(G, D, eval_rows, args, tok, stop, eot, device), step, args, markers, log)
        terminating = terminate_requested(device)  # a scheduler's SIGTERM: save, then stop
        if not args.no_save and (terminating or step == args.max_steps or (args.save_every and step % args.save_every == 0)):
            state = dict(step=step, epoch=order.epoch, cursor=order.cursor, world=world, args=vars(args))
            last_ckpt = checkpoint.save(args.out_dir, step, models, opts, state, tok, pad_id_for_scoring(tok, stop),
                                        args.keep_resume)
            log(f"saved {last_ckpt}")
        if terminating:
            raise Terminated(f"terminated (SIGTERM) after step {step - 1}; " + (
                f"continue from {last_ckpt} with the same command and --resume" if not args.no_save else
                "no checkpoint written (--no-save)"))

    if D is not None and eval_rows:
        last_eval = run_eval(G, D, eval_rows, args, tok, stop, eot, device)
        write_eval(last_eval, step, args, markers, log)
        if first_eval is not None:
            report_change(first_eval, last_eval, D, args, markers, device, log)
    if master:
        log(f"metrics: {metrics_path}; checkpoint: {last_ckpt}")
        try:
            plot_metrics(metrics_path, os.path.join(args.out_dir, "metrics.png"))  # it says what it wrote
        except Exception as e:  # a chart is not worth failing a finished run for
            log(f"no chart ({type(e).__name__}: {e})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Terminated as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"train_gad.py: {e}", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", 0)) == 0:
            print("train_gad.py: interrupted; continue with the same command and --resume "
                  "(from the newest checkpoint)", file=sys.stderr)
        sys.exit(130)
    except (Stop, DataError, LoadError, checkpoint.RunDirError, OSError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
            print(f"train_gad.py: {msg}", file=sys.stderr)
        sys.exit(1)
