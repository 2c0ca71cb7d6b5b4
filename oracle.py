"""
The exact oracle judge, for a teacher that is a local model (the demo's; any open model distilled in a
controlled study): per-token KL divergences over the whole vocabulary between the teacher, with its hidden
system prompt and at the temperature its data was sampled at, and a student at a sampling temperature tau.

    from oracle import kl_along
    kls = kl_along(student, tau, student_seqs, oracle, T, oracle_seqs, answer_lens, direction="forward")

forward KL(teacher || student) along the teacher's own answers: what the student misses of the teacher
(mode-covering); reverse KL(student || teacher) along the student's samples: what the student says that the
teacher would not, its own entropy included (mode-seeking: a student that loops pays for its loops).
Both are token means per answer; evaluate.py averages them over prompts with bootstrap intervals.
"""

import torch
import torch.nn.functional as F


def pad(seqs, pad_id=0):
    ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
    return ids


@torch.no_grad()
def answer_logits(model, seqs, answer_lens, device):
    """The logits [answer_lens[i], V] (fp32) at the positions that predict each answer token of each
    sequence (its last answer_lens[i] tokens)."""
    logits = model(pad(seqs).to(device)).float()
    return [logits[r, len(s) - n - 1:len(s) - 1] for r, (s, n) in enumerate(zip(seqs, answer_lens))]


def token_kl(logp, logq):
    """KL(p || q) at each position, exactly, over the vocabulary: [n, V] log-probs -> [n]."""
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def kl_along(student, taus, student_seqs, oracle, oracle_temperature, oracle_seqs, answer_lens, direction, device,
             batch=8):
    """Per answer and student temperature tau, the token-mean KL along the answer's tokens: "forward"
    KL(oracle || student), "reverse" KL(student || oracle) -> {tau: [one per answer]}. The two models read
    the same answer tokens after their own contexts (student_seqs[i] and oracle_seqs[i] end in the same
    answer_lens[i] tokens)."""
    out = {tau: [] for tau in taus}
    for b in range(0, len(student_seqs), batch):
        sl = slice(b, b + batch)
        s = answer_logits(student, student_seqs[sl], answer_lens[sl], device)
        o = answer_logits(oracle, oracle_seqs[sl], answer_lens[sl], device)
        for ls, lo in zip(s, o):
            lo = F.log_softmax(lo / oracle_temperature, dim=-1)
            for tau in taus:
                lq = F.log_softmax(ls / tau, dim=-1)
                kl = token_kl(lo, lq) if direction == "forward" else token_kl(lq, lo)
                out[tau].append(float(kl.mean()) if len(kl) else 0.0)
    return out
