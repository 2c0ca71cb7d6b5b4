"""
The sampler: n responses per prompt from a Transformer with its KV cache, for ragged prompts, with
continuous batching, and random draws that depend only on (prompt seed, sample, step), so a sample
is the same whatever batch, process count or admission order it ran in.

    from generate import generate
    out = generate(model, [prompt_ids], n=4, max_new_tokens=256, temperature=0.8, stop_ids=[eot], seed=0)
    out[0].tokens, out[0].stopped, out[0].logprobs   # the first sample of the first prompt

temperature=0 is greedy decoding. On an FSDP2 model every shard is gathered once for the whole
rollout; on a CPU the rollout's matrix products run on weights packed once for oneDNN (the last
section).
"""

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import KVCache, Linear


@dataclass
class Sample:
    tokens: list  # the response ids; ends with the stop token when stopped
    stopped: bool  # False: cut at max_new_tokens
    logprobs: list  # log p of each token under the sampler's logits / temperature (1 when greedy)
    prompt_index: int = 0


@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_ids=(), seed=None,
             max_batch=None, compile=False):
    """Sample n responses per prompt (lists of token ids, any lengths); prompt-major results.

    A row of the batch holds one sample. A prompt is prefilled once for all its samples, packed with
    the other prompts admitted with it, with no padding. Then one decode step for all rows at a time;
    a sample ends at its first stop token (kept) or at max_new_tokens. `max_batch` bounds the rows:
    the rows of finished samples take the next waiting prompts (continuous batching); once none
    wait, finished rows leave the batch whenever a quarter of it has ended. On an FSDP2 model every
    shard is gathered once for the whole rollout instead of once per layer per token. `compile`
    runs the decode step through torch.compile.
    `seed` is an int or one int per prompt; sample j of a prompt depends only on (its seed, j)."""
    if seed is None:
        seed = int(torch.randint(2**31, ()).item())
    seeds = prompt_seeds(seed, len(prompts)) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
    if not prompts:
        return []
    if min(map(len, prompts)) == 0:
        raise ValueError("generate: empty prompt")
    fsdp = fsdp_modules(model)
    for m in fsdp:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    was_training = model.training
    model.eval()
    max_batch = min(max_batch or len(prompts) * n, len(prompts) * n)
    try:
        with packed_weights(model, max_batch, not compile):  # inductor cannot lower oneDNN's opaque layout
            return _generate(model, prompts, n, max_new_tokens, temperature, top_p, stop_ids, seeds, max_batch,
                             compile)
    finally:
        model.train(was_training)
        for m in fsdp:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def decode_step(model, ids, cache):
    return model(ids[:, None], cache)


def _generate(model, prompts, n, max_new_tokens, temperature, top_p, stop_ids, seeds, max_batch, compile):
    cfg = model.config
    emb = model.model.embed_tokens.weight  # gathered: its dtype is the compute dtype under FSDP2 too
    device = emb.device
    total = len(prompts) * n
    B = max_batch
    unit = n if n <= B else 1  # admit whole prompts (one prefill each) unless n samples exceed the batch
    queue = deque(range(total))  # the samples waiting for a row; sample s is prompt s // n, draw s % n
    cache = KVCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, max(map(len, prompts)) + max_new_tokens,
                    cfg.head_dim, emb.dtype, device)
    step_fn = torch.compile(decode_step, dynamic=True) if compile else decode_step
    all_keys = sample_keys(seeds, n).to(device)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1])
    # per row, on the host: the sample it holds (-1: none) and that sample's step
    sample = torch.full((B,), -1, dtype=torch.long)
    step = torch.zeros(B, dtype=torch.long)
    keys = torch.zeros(B, dtype=torch.long, device=device)
    logits = torch.zeros(B, cfg.vocab_size, device=device)
    out_tok = torch.zeros(total, max_new_tokens, dtype=torch.long)
    out_lp = torch.zeros(total, max_new_tokens)
    out_len = torch.zeros(total, dtype=torch.long)
    stopped = torch.zeros(total, dtype=torch.bool)

    def admit(rows):
        """Prefill the prompts of the next len(rows) waiting samples into these rows."""
        new = torch.tensor([queue.popleft() for _ in rows])
        sample[rows], step[rows] = new, 0
        keys[rows.to(device)] = all_keys[new.to(device)]
        by_prompt = {}
        for r, s in zip(rows.tolist(), new.tolist()):
            by_prompt.setdefault(s // n, []).append(r)
        cache.prefill([len(prompts[i]) for i in by_prompt], list(by_prompt.values()))
        packed = torch.tensor([t for i in by_prompt for t in prompts[i]], device=device)[None]
        first = model(packed, cache)  # [prompts, V]: logits at each prompt's last token
        which = torch.tensor([k for k, r in enumerate(by_prompt.values()) for _ in r], device=device)
        logits[torch.cat([torch.tensor(r) for r in by_prompt.values()]).to(device)] = first[which]

    admit(torch.arange(min(B // unit * unit, total)))
    while True:
        ids, lp = next_token(logits, temperature, top_p, keys, step.to(device))
        ids_h, lp_h = ids.cpu(), lp.cpu()
        live = (sample >= 0).nonzero().squeeze(-1)
        s, t = sample[live], step[live]
        out_tok[s, t], out_lp[s, t], out_len[s] = ids_h[live], lp_h[live], t + 1
        stopped[s] = torch.isin(ids_h[live], stop)
        step[live] += 1
        sample[live[stopped[s] | (step[live] == max_new_tokens)]] = -1  # ended: the row is free
        running = sample >= 0
        if not queue:
            if not running.any():
                break
            if running.sum() <= 0.75 * len(running):
                # drop ended rows once a quarter of the batch has ended: each compaction copies the
                # whole cache, so doing it whenever any row ends would copy it nearly every step
                keep = running.nonzero().squeeze(-1)
                cache.select(keep)
                sample, step, running = sample[keep], step[keep], running[keep]
                ids, keys = ids[keep.to(device)], keys[keep.to(device)]
        if running.any():
            cache.decode()
            logits = step_fn(model, ids, cache)
            cache.advance(running)  # a row that has ended keeps its length; its outputs are unused
        free = (sample < 0).nonzero().squeeze(-1)
        k = min(len(free) // unit * unit, len(queue))
        if k:
            admit(free[:k])

    out_tok, out_lp, out_len, stopped = out_tok.tolist(), out_lp.tolist(), out_len.tolist(), stopped.tolist()
    return [Sample(out_tok[s][:out_len[s]], stopped[s], out_lp[s][:out_len[s]], s // n) for s in range(total)]


# -----------------------------------------------------------------------------
# the sampling stream
#
# Every random number the sampler draws is a pure function of (prompt seed, sample j, step t):
#     key(seed, j) = hash32(hash32(seed) + j * SAMPLE_STRIDE)       one stream per (prompt, sample)
#     u(key, t)    = hash32(hash32(key + t * STEP_STRIDE))          the uniform that picks token t
# No generator state is shared between rows, so a sample never depends on which other rows share
# its batch, how many processes split the prompts, when the other rows end, or when it was admitted
# to the batch. hash32 is a bijection of [0, 2^32) and the strides are odd, so a prompt's samples
# have distinct keys for any n, and at any step distinct keys draw distinct uniforms. Hashing the
# seed first scatters neighbouring seeds (the trainer gives consecutive prompts consecutive seeds)
# before j is added, so seed s's sample 31 is not seed s+1's sample 0.

M32 = 0xFFFFFFFF
PROMPT_STRIDE = 0x27D4EB2F  # one int seed -> per-prompt seeds (see prompt_seeds)
SAMPLE_STRIDE = 0x9E3779B1  # 2^32 / golden ratio, odd
STEP_STRIDE = 0x85EBCA6B  # odd


def hash32(x):
    """A 32-bit integer mix (lowbias32), a bijection of [0, 2^32), on int64 tensors; no overflow."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def prompt_seeds(seed, count):
    """Per-prompt seeds from one int (prompt i gets the same seed whatever batch it is in)."""
    return hash32((torch.arange(count) + (seed * PROMPT_STRIDE & M32)) & M32).tolist()


def sample_keys(seeds, n):
    """The stream key of each (prompt, sample j), prompt-major: [len(seeds) * n]."""
    s = hash32(torch.tensor(seeds, dtype=torch.long) & M32)
    return hash32((s[:, None] + torch.arange(n) * SAMPLE_STRIDE) & M32).reshape(-1)


def uniforms(keys, t):
    """The uniform in (0, 1) of each row at step t (an int, or one step per row)."""
    u = hash32(hash32((keys + t * STEP_STRIDE) & M32))
    return (u.double() + 0.5) / 2.0**32


CDF_BLOCK = 128  # tokens per block of the two-level CDF (divides Llama-3's, Qwen2.5's and SmolLM2's vocab)


def next_token(logits, temperature, top_p, keys, t):
    """Pick the next token of each row; returns (ids, log p of the ids under logits / temperature).
    Sampling inverts each row's CDF at one hashed uniform: exact for the (top-p truncated) softmax,
    and a few passes over [B, V] where per-token noise would take many. All of it in fp32 / float64
    whatever the model's dtype."""
    if temperature == 0:
        ids = logits.argmax(-1)
        return ids, logits.gather(-1, ids[:, None]).squeeze(-1) - logits.logsumexp(-1)
    p = torch.softmax(logits.float() / temperature, -1)
    u = uniforms(keys, t)[:, None]
    if top_p < 1.0:
        # keep the smallest prefix of the sorted tokens whose mass reaches top_p, sample within it
        ps, order = p.sort(-1, descending=True)
        cdf = ps.cumsum(-1, dtype=torch.float64)
        kept = ((cdf - ps) <= top_p).sum(-1, keepdim=True).clamp_(min=1)  # 0 only when p is NaN
        ids = torch.searchsorted(cdf, u * cdf.gather(-1, kept - 1), right=True).clamp_(max=p.shape[-1] - 1)
        ids = order.gather(-1, ids)
    else:
        ids = invert_cdf(p, u)
    return ids.squeeze(-1), p.gather(-1, ids).log().squeeze(-1)  # log p under the full softmax, as before


def invert_cdf(p, u):
    """For each row of probabilities p [B, V], the first token whose CDF exceeds u [B, 1] times the row's
    mass. In two levels, so that the (sequential) prefix sum runs over V / CDF_BLOCK block sums and one
    block rather than over the whole vocabulary; the prefix sums are float64."""
    B, V = p.shape
    pb = (p if V % CDF_BLOCK == 0 else F.pad(p, (0, -V % CDF_BLOCK))).view(B, -1, CDF_BLOCK)
    block_mass = pb.sum(-1).double()  # [B, blocks]; summed in fp32: a float64 sum would first copy all of p
    cdf = block_mass.cumsum(-1)
    u = u * cdf[:, -1:]
    b = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # the block where the CDF passes u
    u = u - F.pad(cdf, (1, 0)).gather(-1, b)  # the mass left to cover inside block b
    inner = pb.gather(1, b[:, :, None].expand(B, 1, CDF_BLOCK)).squeeze(1).cumsum(-1, dtype=torch.float64)
    # the block's own sum may round a hair below block_mass: keep u inside it, so the token found has p > 0
    u = torch.minimum(u, torch.nextafter(inner[:, -1:], torch.zeros_like(u)))
    # clamped: with NaN probabilities (a diverged model) no CDF passes u; the NaN log-prob of the token
    # then reaches the losses, and the loop's non-finite checks stop the run instead of an index error
    return (b * CDF_BLOCK + torch.searchsorted(inner, u, right=True)).clamp_(max=V - 1)


# -----------------------------------------------------------------------------
# the CPU fast path and FSDP2

@contextmanager
def packed_weights(model, rows, enable=True):
    """On a CPU, a matrix product over decoding's few rows spends about as long laying its weight out
    for the kernel (oneDNN does it on every bf16 call) as multiplying. For the rollout, every Linear
    gets a copy laid out once by oneDNN, for about one decode step's time (bf16: the same bits as
    F.linear; fp32: within rounding, each row independent of the others)."""
    w = model.model.embed_tokens.weight
    fast = enable and w.device.type == "cpu" and torch.backends.mkldnn.is_available() and (
        w.dtype == torch.float32 or (w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())) \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")  # private ops: a torch without them decodes plainly
    linears = [m for m in model.modules() if isinstance(m, Linear)] if fast else []
    for m in linears:
        m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight, rows)
    try:
        yield
    finally:
        for m in linears:
            m.packed = None


def fsdp_modules(model):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]
