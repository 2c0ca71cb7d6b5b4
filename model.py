"""
The student: a Llama / Qwen2 / Qwen3 decoder in plain PyTorch, its KV cache, and memory-efficient
per-token log-probs. It reads no files: loading.py builds a Transformer and fills it from a
checkpoint, generate.py samples from it.

    import torch
    from model import ModelConfig, Transformer, token_logprobs
    model = Transformer(ModelConfig(vocab_size=49152, hidden_size=576, ...))
    logits = model(idx)                          # [B, T, V] (fp32), rows right-padded
    h = model(idx, hidden=True)                  # the final normed hidden states [B, T, C] (D's input)
    logp, _ = token_logprobs(model, idx, 0.8)    # [B, T-1]: log p(idx[:, t+1] | idx[:, :t+1]) on logits / 0.8

Parameter names are exactly those of transformers' *ForCausalLM, so checkpoints map one to one.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # optional, CUDA only
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None


@dataclass
class ModelConfig:
    model_type: str = "llama"  # llama, qwen2 or qwen3
    vocab_size: int = 32000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    hf: dict = field(default_factory=dict)  # the checkpoint's config.json, written back on save
    generation: dict = field(default_factory=dict)  # its generation_config.json, written back on save


# -----------------------------------------------------------------------------
# the decoder

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 like HF, then cast back before the weight (HF's order matters in bf16)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig):
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """Rotate x [B, T, heads, hd] by its positions' angles. HF's convention pairs the two halves of the
    head dim: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). `roll` swaps the halves and `sin` comes
    with its first half negated (see Transformer.forward): two ops per call instead of five."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class Linear(nn.Linear):
    """nn.Linear that can use a copy of its weight laid out once for oneDNN (generate.packed_weights)."""
    packed = None

    def forward(self, x):
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def use_flash(t):
    """flash-attn takes half-precision CUDA tensors; elsewhere attention is SDPA. (A test forces this
    path on CPU with a stand-in for flash-attn, to check the arguments we pass.)"""
    return flash_attn_func is not None and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def causal_attention(q, k, v):
    """q [B, T, H, hd], k/v [B, T, Hkv, hd] -> [B, T, H, hd]. Right-padded rows need no mask: a valid
    token only sees earlier tokens of its own row (the outputs at padding are never used)."""
    if use_flash(q):
        return flash_attn_func(q, k, v, causal=True)
    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.bfloat16:
        # the CPU's flash-attention backward is several times slower in bf16 than in fp32 at training's
        # sequence lengths, where attention is little of the work: train it in fp32. Forwards without a
        # backward (the reference's and the sampling policy's log-probs) do the same, or the KL to the
        # reference and the PPO ratio would start away from 0 and 1 at equal weights
        q, k, v = q.float(), k.float(), v.float()
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.shape[2] != q.shape[2])
    return y.transpose(1, 2).to(dtype)


def packed_attention(q, k, v, lens, cu_seqlens):
    """Sequences packed back to back: q [N, H, hd], k/v [N, Hkv, hd], causal within each sequence.
    cu_seqlens (int32, [len(lens) + 1]) is flash-attn's varlen layout of the same lengths."""
    if use_flash(q):
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max(lens), max(lens), causal=True)
    gqa = k.shape[1] != q.shape[1]
    parts = zip(*(t.transpose(0, 1).split(lens, dim=1) for t in (q, k, v)))
    y = [F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa) for qi, ki, vi in parts]
    return torch.cat(y, dim=1).transpose(0, 1)


def decode_attention(q, K, V, mask):
    """One new token per row: q [B, 1, H, hd] against cached K/V [B, Hkv, S, hd] where mask [B, 1, 1, S]."""
    B, _, H, hd = q.shape
    Hkv = K.shape[1]
    # the query heads that share a K/V head go in as that head's queries, so each K/V head is read
    # once per step rather than once per query head (decoding is bound by these reads)
    y = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, hd), K, V, attn_mask=mask)
    return y.reshape(B, 1, H, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = Linear(C, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(C, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(C, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_head * self.hd, C, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            y = causal_attention(q, k, v)
        elif cache.decoding:
            K, V = cache.update(self.layer_idx, k, v)
            y = decode_attention(q, K, V, cache.mask)
        else:  # prefill: the prompts packed in one row
            cache.update(self.layer_idx, k, v)
            y = packed_attention(q[0], k[0], v[0], cache.prompt_lens, cache.cu_seqlens)[None]
        return self.o_proj(y.reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, H = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(C, H, bias=cfg.mlp_bias)
        self.up_proj = Linear(C, H, bias=cfg.mlp_bias)
        self.down_proj = Linear(H, C, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    checkpointing = False  # activation checkpointing: recompute this block in the backward pass

    def forward(self, x, cos, sin, cache=None):
        # checkpoint inside the block's own forward, so that FSDP2's hooks on the block stay outside
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, cache, use_reentrant=False)
        return self._forward(x, cos, sin, cache)

    def _forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, lm_head=True):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        # the discriminator reuses this backbone without an LM head
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if lm_head else None
        if lm_head and cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, idx, cache=None, hidden=False, targets=None, temperature=1.0, entropy=False,
                position_ids=None):
        """idx [B, T] token ids; rows may be right-padded. Returns
            logits [B, T, V] (fp32)                     by default
            the final normed hidden states [B, T, C]     hidden=True
            (log p(targets) [B, T], entropy or None)     targets [B, T]: see token_logprobs
            logits [rows, V] of each row's last token    with a KVCache (see KVCache)
        The log-probs are computed here, not by the caller from the hidden states, because the LM
        head's weight only exists gathered inside forward under FSDP2 (call model(), never forward())."""
        if position_ids is None:
            position_ids = cache.positions if cache is not None else torch.arange(idx.shape[1], device=idx.device)[None]
        angles = (position_ids.float()[..., None] * self.inv_freq.float())[:, :, None, :]  # [B, T, 1, hd/2]
        x = self.model.embed_tokens(idx)
        cos = torch.cat((angles.cos(), angles.cos()), dim=-1).to(x.dtype)  # broadcast over heads
        sin = torch.cat((-angles.sin(), angles.sin()), dim=-1).to(x.dtype)  # signed for apply_rope
        for block in self.model.layers:
            x = block(x, cos, sin, cache)
        x = self.model.norm(x)
        if hidden:
            return x
        if targets is not None:
            return chunked_logprobs(x, self.lm_head.weight, targets, temperature, entropy)
        if cache is not None:
            x = cache.last_tokens(x)
        return self.lm_head(x).float()

    init_if_missing = ()  # weights a subclass creates itself when a checkpoint lacks them (D's head; see loading.py)

    def init_missing(self, names, device, dtype):
        pass

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# log-probs of chosen tokens, in chunks

LOGPROB_CHUNK = 512  # tokens per chunk: 512 x 152K vocab x fp32 = 0.3 GB per [chunk, V] buffer


def token_logprobs(model, input_ids, temperature=1.0, entropy=False):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for right-padded rows, shape [B, T-1], on
    logits / temperature; with entropy=True also the per-position entropy. Gradients flow. This is
    what the training loop calls: through model(...), so FSDP2 gathers the root's weights."""
    return model(input_ids[:, :-1], targets=input_ids[:, 1:], temperature=temperature, entropy=entropy)


class ChunkLogprobs(torch.autograd.Function):
    """log p(t) of one chunk of rows h [N, C] under the LM head w [V, C], in fp32, and the entropy
    (logged, never differentiated). It saves only its inputs and the log-normaliser for backward,
    where the logits are computed again: memory stays [N, C] sized, as with activation checkpointing,
    and the backward makes (softmax - onehot) in place in the one [N, V] buffer it needs."""

    @staticmethod
    def forward(ctx, h, w, t, want_entropy):
        logits = (h @ w.t()).float()
        lse = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, t[:, None]).squeeze(-1) - lse
        ent = None
        if want_entropy:
            logq = logits.sub_(lse[:, None])  # log-probabilities, in place
            ent = -torch.linalg.vecdot(logq.exp(), logq)
            ctx.mark_non_differentiable(ent)
        ctx.save_for_backward(h, w, t, lse)
        return logp, ent

    @staticmethod
    def backward(ctx, grad, _):
        h, w, t, lse = ctx.saved_tensors
        # d log p(t) / d logits = onehot(t) - softmax
        d = (h @ w.t()).float().sub_(lse[:, None]).exp_()
        d.scatter_add_(-1, t[:, None], torch.full_like(lse[:, None], -1.0))
        d = d.mul_(-grad[:, None]).to(h.dtype)
        return d @ w, d.t() @ h, None, None


def chunked_logprobs(h, w, targets, temperature=1.0, entropy=False, chunk=LOGPROB_CHUNK):
    """log p(targets) (and entropy) from hidden states h [B, T, C] and the LM head w [V, C], never
    holding more than `chunk` rows of [*, V] logits; gradients flow into h and w (see ChunkLogprobs)."""
    B, T, C = h.shape
    hf, tf = h.reshape(B * T, C), targets.reshape(B * T).clamp(min=0)  # ignore_index-style -100 is safe
    if temperature != 1.0:
        hf = hf / temperature  # 1/T scales the [N, C] hidden states, not the [N, V] logits: the same, for far less
    outs, ents = [], []
    for i in range(0, B * T, chunk):
        lp, ent = ChunkLogprobs.apply(hf[i:i + chunk], w, tf[i:i + chunk], entropy)
        outs.append(lp)
        ents.append(ent)
    logp = torch.cat(outs).reshape(B, T).clone()  # not a view: FSDP2 hooks the outputs of a module
    return logp, (torch.cat(ents).reshape(B, T).clone() if entropy else None)


# -----------------------------------------------------------------------------
# the KV cache

class KVCache:
    """Every layer's K/V for `batch` rows of up to `max_len` positions. Row b holds lengths[b] valid
    positions 0, 1, 2, ...: rows of different lengths need no left padding, and row b's next token
    goes to position lengths[b]. The sampler switches the mode before each forward:

        cache.prefill(prompt_lens, rows)  # the next forward gets prompts packed back to back in one
        model(packed, cache)              # row, no compute on padding; prompt i fills rows[i] (its
                                          # n samples) -> logits [prompts, V] at each last token
        cache.decode()                    # one new token per row; attention reads the first `span`
        model(ids[:, None], cache)        # positions -> logits [batch, V]
        cache.advance(running)            # the rows that took the token are one longer

    update() is the one place K/V is written: attention calls it with a layer's new K/V and uses
    what it returns. select() keeps some rows (finished samples leave the batch)."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        # on the host: the sampler's bookkeeping and the attention span need no device sync
        self.lengths = torch.zeros(batch, dtype=torch.long)
        self.device = device
        self.decoding = False

    def prefill(self, prompt_lens, rows):
        dev = self.device
        self.decoding = False
        self.prompt_lens = list(prompt_lens)
        ends = torch.tensor(self.prompt_lens).cumsum(0)
        self.cu_seqlens = F.pad(ends, (1, 0)).to(dev, torch.int32)  # flash-attn's varlen layout
        self.last = (ends - 1).to(dev)  # each prompt's last token in the packed row
        pos = [torch.arange(n) for n in self.prompt_lens]
        self.positions = torch.cat(pos).to(dev)[None]
        # token p of prompt i (packed at ends[i] - len + p) goes to position p of every row in rows[i]
        src, dst_row, dst_pos = [], [], []
        for end, p, r in zip(ends.tolist(), pos, rows):
            src.append((end - len(p) + p).repeat(len(r)))
            dst_row.append(torch.tensor(r).repeat_interleave(len(p)))
            dst_pos.append(p.repeat(len(r)))
            self.lengths[r] = len(p)
        self.src, self.dst_row, self.dst_pos = (torch.cat(x).to(dev) for x in (src, dst_row, dst_pos))

    def decode(self):
        self.decoding = True
        self.span = int(self.lengths.max()) + 1  # attend over the longest row only, not the whole buffer
        lengths = self.lengths.to(self.device)
        self.rows = torch.arange(len(lengths), device=self.device)
        self.positions = lengths[:, None]
        self.mask = (torch.arange(self.span, device=self.device) <= lengths[:, None])[:, None, None, :]

    def update(self, layer, k, v):
        """Store a layer's new K/V [B, T, Hkv, hd]; return the K/V attention should use."""
        K, V = self.k[layer], self.v[layer]
        if not self.decoding:
            K[self.dst_row, :, self.dst_pos] = k[0, self.src]
            V[self.dst_row, :, self.dst_pos] = v[0, self.src]
            return k, v  # a prompt attends to its own fresh K/V
        pos = self.positions[:, 0]
        K[self.rows, :, pos] = k[:, 0]
        V[self.rows, :, pos] = v[:, 0]
        return K[:, :, :self.span], V[:, :, :self.span]

    def last_tokens(self, x):
        """Hidden states of the tokens whose logits the sampler needs: each prompt's last token
        (prefill, x [1, N, C]), or each row's new token (decode, x [B, 1, C])."""
        return x[:, -1] if self.decoding else x[0, self.last]

    def advance(self, running):
        self.lengths += running

    def select(self, rows):
        """Keep only the given rows (a host LongTensor), in that order."""
        r = rows.to(self.device)
        self.k = [k.index_select(0, r) for k in self.k]
        self.v = [v.index_select(0, r) for v in self.v]
        self.lengths = self.lengths[rows]
