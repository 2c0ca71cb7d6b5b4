"""
The student: a Llama / Qwen2 / Qwen3 decoder in plain PyTorch, its loaders and savers, a KV-cache
sampler for ragged batches, and memory-efficient per-token log-probs.

    from model import Transformer, load_tokenizer, render_prompt, stop_token_ids, generate
    model = Transformer.from_pretrained("Qwen/Qwen2.5-7B-Instruct", dtype=torch.bfloat16, device="cuda")
    tok = load_tokenizer("Qwen/Qwen2.5-7B-Instruct")
    prompt = render_prompt(tok, [{"role": "user", "content": "Hi!"}])
    out = generate(model, [prompt], n=4, max_new_tokens=256, temperature=0.8,
                   stop_ids=stop_token_ids(tok), seed=0)
    print(tok.decode(out[0].tokens))

Parameter names are exactly those of transformers' *ForCausalLM, so checkpoints map one to one.
`from_pretrained` reads a local HF directory (safetensors, sharded or not), a hub id (when the hub
is reachable) or a .gguf file (dequantized). Weights are only read as safetensors or GGUF: a
checkpoint is never unpickled.
"""

import glob
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

try:  # optional, CUDA only
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None


class LoadError(Exception):
    """A checkpoint or tokenizer that cannot be loaded; the message is one line naming the cause."""


# -----------------------------------------------------------------------------
# config

SUPPORTED = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("default", "llama3", "linear")


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    hf: dict = field(default_factory=dict)  # the original config.json, written back on save

    @classmethod
    def from_hf(cls, d, source="config.json"):
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise LoadError(f"{source}: unsupported model_type {mt!r} (supported: {', '.join(SUPPORTED)})")
        if d.get("use_sliding_window"):
            raise LoadError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters; 4.x keeps them apart
        rp = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or None
        theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
        if scaling is None and rp.get("rope_type", "default") != "default":
            scaling = rp
        if scaling is not None:
            rt = scaling.get("rope_type", scaling.get("type", "default"))
            if rt not in ROPE_TYPES:
                raise LoadError(f"{source}: unsupported rope scaling type {rt!r} (supported: {', '.join(ROPE_TYPES)})")
            scaling = None if rt == "default" else {**scaling, "rope_type": rt}
        heads = d["num_attention_heads"]
        bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if mt == "qwen2" else bias,  # Qwen2 always has q/k/v biases and no o bias
            o_bias=False if mt == "qwen2" else bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=mt == "qwen3",
            hf=dict(d),
        )

    def to_hf(self, dtype=None):
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        d = dict(self.hf)
        d.pop("rope_parameters", None)  # written back in the 4.x form, which both 4.x and 5.x read
        d.pop("quantization_config", None)  # we save dequantized weights
        d.update(
            architectures=[arch[self.model_type]], model_type=self.model_type, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        if dtype is not None:
            d["torch_dtype"] = str(dtype).removeprefix("torch.")
        return d


# -----------------------------------------------------------------------------
# the decoder

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 like HF, then cast back before the weight (HF's order matters in bf16)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


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


def rotate_half(x):
    # HF convention: the two halves of the head dim form the pairs (not interleaved pairs)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Per-layer K/V for a batch of ragged rows. Row b holds `lengths[b]` valid positions; a new
    token of row b is written at position lengths[b], so rows of different lengths never need
    left padding and their position ids stay 0, 1, 2, ...

    The prefill takes the prompts packed back to back in one row ([1, sum of lengths]), so no
    compute goes to padding: `rows` and `pos` say where each packed token lives in the cache."""

    def __init__(self, n_layers, prompt_lens, n_kv_heads, max_len, head_dim, dtype, device):
        shape = (len(prompt_lens), n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.prompt_lens = list(prompt_lens)
        self.lengths = torch.tensor(self.prompt_lens, device=device)
        self.rows = torch.arange(len(prompt_lens), device=device).repeat_interleave(self.lengths)
        self.pos = torch.cat([torch.arange(n, device=device) for n in self.prompt_lens])
        self.cu_seqlens = F.pad(self.lengths.cumsum(0), (1, 0)).int()  # flash-attn's varlen layout
        self.prefill = True
        self.span = None  # an upper bound of lengths.max() + 1 known on the host, if any
        self.mask = None

    def select(self, rows):
        """Keep only the given rows (drop finished rows, or repeat prompts n times)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.lengths = self.lengths.index_select(0, rows)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, C, bias=cfg.o_bias)
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
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        if cache is None:
            # Causal attention over right-padded rows: a valid token only sees earlier tokens of
            # its own row, so padding needs no mask (its outputs are garbage and never used).
            if flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
                y = flash_attn_func(q, k, v, causal=True)
            else:
                y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   is_causal=True, enable_gqa=self.n_kv != self.n_head)
                y = y.transpose(1, 2)
        elif cache.prefill:
            # prompts packed in one row: store each token's K/V in its prompt's cache row, and
            # attend causally within each prompt
            cache.k[self.layer_idx][cache.rows, :, cache.pos] = k[0]
            cache.v[self.layer_idx][cache.rows, :, cache.pos] = v[0]
            if flash_attn_varlen_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
                longest = max(cache.prompt_lens)
                y = flash_attn_varlen_func(q[0], k[0], v[0], cache.cu_seqlens, cache.cu_seqlens, longest, longest,
                                           causal=True)[None]
            else:
                parts = zip(*(t[0].transpose(0, 1).split(cache.prompt_lens, dim=1) for t in (q, k, v)))
                y = torch.cat([F.scaled_dot_product_attention(qi, ki, vi, is_causal=True,
                                                              enable_gqa=self.n_kv != self.n_head)
                               for qi, ki, vi in parts], dim=1).transpose(0, 1)[None]
        else:
            # one decode step: write each row's new K/V at its own length, attend to what is valid
            pos = cache.lengths
            rows = torch.arange(B, device=x.device)
            K, V = cache.k[self.layer_idx], cache.v[self.layer_idx]
            K[rows, :, pos] = k[:, 0]
            V[rows, :, pos] = v[:, 0]
            mask = cache.mask  # built once per step for all layers (see Transformer.forward)
            S = mask.shape[-1]
            # the query heads that share a K/V head go in as that head's queries, so each K/V head
            # is read once per step rather than once per query head (decode is bound by these reads)
            qg = q.view(B, self.n_kv, self.n_head // self.n_kv, self.hd)
            y = F.scaled_dot_product_attention(qg, K[:, :, :S], V[:, :, :S], attn_mask=mask)
        return self.o_proj(y.reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, H = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, H, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(C, H, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(H, C, bias=cfg.mlp_bias)

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
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if lm_head else None
        if lm_head and cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, idx, position_ids=None, cache=None, targets=None, temperature=1.0, entropy=False,
                hidden=False):
        """idx [B, T] (right-padded rows are fine). Returns, by what is asked:
        hidden=True        -> final normed hidden states [B, T, C] (no LM head)
        targets [B, T]     -> (log p(targets) [B, T], entropy [B, T] or None), computed in chunks
        cache, prefill     -> idx is [1, all prompts packed]: logits [P, V] at each prompt's last token
        cache, decode      -> idx is [B, 1], one new token per cache row: logits [B, 1, V]
        otherwise          -> logits [B, T, V]
        Everything goes through forward so that FSDP2's hooks gather the root's weights."""
        B, T = idx.shape
        decode = cache is not None and not cache.prefill
        if position_ids is None:
            if cache is None:
                position_ids = torch.arange(T, device=idx.device)[None, :]
            else:
                position_ids = cache.lengths[:, None] if decode else cache.pos[None, :]
        pos = position_ids.float()[..., None] * self.inv_freq.float()  # [B, T, hd/2]
        emb = torch.cat((pos, pos), dim=-1)
        x = self.model.embed_tokens(idx)
        if decode:
            # attend over the longest valid prefix only, not the whole buffer; `span` is a host-side
            # bound from the sampler, so no layer has to sync with the device to find it
            S = cache.span or int(cache.lengths.max()) + 1
            cache.mask = (torch.arange(S, device=idx.device)[None, :] <= cache.lengths[:, None])[:, None, None, :]
        cos = emb.cos().to(x.dtype)[:, :, None, :]  # broadcast over heads in [B, T, H, hd]
        sin = emb.sin().to(x.dtype)[:, :, None, :]
        for block in self.model.layers:
            x = block(x, cos, sin, cache)
        x = self.model.norm(x)
        if decode:
            cache.lengths = cache.lengths + 1
        if hidden:
            return x
        if targets is not None:
            return chunked_logprobs(x, self.lm_head.weight, targets, temperature, entropy)
        if cache is not None and cache.prefill:
            x = x[0, cache.cu_seqlens[1:] - 1]
        return self.lm_head(x).float()

    # -- loading and saving --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device=None, lm_head=True):
        """A local HF directory, a .gguf file, or a hub id. dtype defaults to float32."""
        dtype = dtype or torch.float32
        device = torch.device(device or "cpu")
        path = resolve_checkpoint(name_or_path)
        if path.endswith(".gguf"):
            cfg_dict, tensors = read_gguf(path)
            files = None
        else:
            cfg_dict = read_json(os.path.join(path, "config.json"))
            files = safetensors_files(path)
        cfg = ModelConfig.from_hf(cfg_dict, source=path if files is None else os.path.join(path, "config.json"))
        with torch.device("meta"):  # no memory until the real weights are assigned
            model = cls(cfg, lm_head=lm_head)
        expected = set(model.state_dict().keys())
        if cfg.tie_word_embeddings or not lm_head:
            expected.discard("lm_head.weight")
        loaded = {}
        source = tensors if files is None else iter_safetensors(files)
        for name, t in source:
            if name not in expected:
                if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and not lm_head):
                    continue
                raise LoadError(f"{path}: unexpected weight {name!r} for model_type {cfg.model_type!r}")
            loaded[name] = t.to(device=device, dtype=dtype)
        missing = expected - set(loaded) - set(cls.init_if_missing)
        if missing:
            raise LoadError(f"{path}: missing {len(missing)} weights, e.g. {sorted(missing)[0]!r}")
        model.load_state_dict(loaded, strict=False, assign=True)
        if lm_head and cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = rope_inv_freq(cfg).to(device)
        model.init_missing(set(cls.init_if_missing) - set(loaded), device, dtype)
        return model

    init_if_missing = ()  # weights a subclass may create itself (the discriminator's head)

    def init_missing(self, names, device, dtype):
        pass

    def save_pretrained(self, out_dir, tokenizer=None, state_dict=None, max_shard_bytes=5 * 2**30):
        """HF layout: config.json, model.safetensors (or shards + index), tokenizer files.
        `state_dict` lets a distributed trainer pass the gathered full weights."""
        sd = state_dict if state_dict is not None else self.state_dict()
        dtype = next(iter(sd.values())).dtype
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(self.config.to_hf(dtype), f, indent=2)
        save_safetensors(sd, out_dir, drop=("lm_head.weight",) if self.config.tie_word_embeddings else (),
                         max_shard_bytes=max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


# -----------------------------------------------------------------------------
# checkpoint files

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LoadError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def resolve_checkpoint(name_or_path):
    """A local directory or .gguf file as is; otherwise a hub id, downloaded when the hub answers."""
    p = os.path.expanduser(str(name_or_path))
    if os.path.isdir(p) or (os.path.isfile(p) and p.endswith(".gguf")):
        return p
    if os.path.exists(p):
        raise LoadError(f"{p}: not a checkpoint directory or .gguf file")
    if p.count("/") != 1 or p.startswith((".", "/", "~")):
        raise LoadError(f"{p}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(p, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:
        raise LoadError(f"{p}: not a local path, and the hub could not provide it "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def safetensors_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        names = sorted(set(read_json(index)["weight_map"].values()))
        files = [os.path.join(path, n) for n in names]
        for f in files:
            if not os.path.exists(f):
                raise LoadError(f"{f}: listed in model.safetensors.index.json but missing")
        return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise LoadError(f"{path}: no *.safetensors files (pickled .bin checkpoints are not read, by design)")
    return files


def iter_safetensors(files):
    from safetensors import safe_open
    for fn in files:
        try:
            with safe_open(fn, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except LoadError:
            raise
        except Exception as e:  # a truncated or corrupt file: the header or a tensor is out of range
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LoadError(f"{fn}: corrupt or truncated safetensors file ({msg})") from None


def save_safetensors(sd, out_dir, drop=(), max_shard_bytes=5 * 2**30):
    from safetensors.torch import save_file
    items = [(k, v.detach().contiguous().cpu()) for k, v in sd.items() if k not in drop]
    shards, cur, size = [], [], 0
    for k, v in items:
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((k, v))
        size += nbytes
    shards.append(cur)
    for old in glob.glob(os.path.join(out_dir, "*.safetensors")):
        os.remove(old)
    if len(shards) == 1:
        save_file(dict(shards[0]), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k, _ in shard})
    total = sum(v.numel() * v.element_size() for _, v in items)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def read_gguf(path):
    """Config dict and (name, dequantized fp32 tensor) pairs of a llama / qwen2 / qwen3 GGUF file."""
    import numpy as np
    try:
        import gguf
        r = gguf.GGUFReader(path)
    except Exception as e:
        raise LoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def meta(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    arch = meta("general.architecture")
    if arch not in SUPPORTED:
        raise LoadError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {', '.join(SUPPORTED)})")
    heads = meta(f"{arch}.attention.head_count")
    kv = meta(f"{arch}.attention.head_count_kv", heads)
    hidden = meta(f"{arch}.embedding_length")
    names = {t.name for t in r.tensors}
    cfg = {
        "model_type": arch, "hidden_size": hidden, "num_hidden_layers": meta(f"{arch}.block_count"),
        "intermediate_size": meta(f"{arch}.feed_forward_length"), "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": meta(f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": meta(f"{arch}.context_length", 4096),
        "vocab_size": meta(f"{arch}.vocab_size") or len(meta("tokenizer.ggml.tokens")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"), "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta("tokenizer.ggml.padding_token_id"),
    }
    if arch != "qwen2":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    if meta(f"{arch}.rope.scaling.type") not in (None, "none"):
        raise LoadError(f"{path}: unsupported GGUF rope scaling {meta(f'{arch}.rope.scaling.type')!r}")

    def unpermute(w, n):
        # llama.cpp stores Llama q/k rows reordered for its interleaved rotary; undo it for HF's
        return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def tensors():
        for t in r.tensors:
            if t.name.startswith("blk."):
                _, i, rest = t.name.split(".", 2)
                base, kind = rest.rsplit(".", 1)
                if base not in GGUF_NAMES:
                    raise LoadError(f"{path}: unknown GGUF tensor {t.name!r}")
                name = f"model.layers.{i}.{GGUF_NAMES[base]}.{kind}"
            elif t.name in GGUF_NAMES:
                name = GGUF_NAMES[t.name]
            else:
                continue  # e.g. rope_freqs: recomputed from the config
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w = w.reshape(tuple(int(s) for s in reversed(t.shape)))
            if arch == "llama" and base_is(t.name, "attn_q"):
                w = unpermute(w, heads)
            elif arch == "llama" and base_is(t.name, "attn_k"):
                w = unpermute(w, kv)
            yield name, torch.from_numpy(np.ascontiguousarray(w))

    return cfg, tensors()


def base_is(gguf_name, base):
    return gguf_name.startswith("blk.") and gguf_name.split(".")[2] == base


# -----------------------------------------------------------------------------
# tokenizer and chat template

def load_tokenizer(name_or_path):
    """The HF tokenizer (with its chat template) of a directory, hub id or .gguf file."""
    from transformers import AutoTokenizer
    p = resolve_checkpoint(name_or_path)
    try:
        if p.endswith(".gguf"):
            tok = AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))
        else:
            tok = AutoTokenizer.from_pretrained(p)
    except Exception as e:
        raise LoadError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if tok.chat_template is None:
        raise LoadError(f"{p}: the tokenizer has no chat template")
    return tok


def render_prompt(tok, messages):
    """Token ids of a conversation rendered with the chat template, ready for the assistant's turn."""
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # the template already writes any BOS it wants; adding special tokens again would double it
    return tok(text, add_special_tokens=False)["input_ids"]


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_id(tok):
    """The single token that ends an assistant turn: appended to teacher answers, so that they end
    exactly like a student sample that stopped."""
    vocab = tok.get_vocab()
    for t in END_OF_TURN:
        if t in vocab:
            return vocab[t]
    return tok.eos_token_id


def stop_token_ids(tok):
    """Every id that ends a turn: the end-of-turn token, eos, and Llama-3's <|eom_id|>."""
    vocab = tok.get_vocab()
    ids = {end_of_turn_id(tok)}
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    for t in ("<|eom_id|>", "<|endoftext|>", "<|end_of_text|>"):
        if t in vocab and tok.eos_token_id == vocab.get(t):
            ids.add(vocab[t])
    return sorted(i for i in ids if i is not None)


# -----------------------------------------------------------------------------
# log-probs of chosen tokens, in chunks

LOGPROB_CHUNK = 512  # tokens per chunk: 512 x 152K vocab x fp32 = 0.3 GB per [chunk, V] buffer


def _chunk_logprobs(h, w, t, temperature, want_entropy):
    logits = (h @ w.t()).float()
    if temperature != 1.0:  # no extra [chunk, V] copy in the common case
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, t[:, None]).squeeze(-1) - lse
    if not want_entropy:
        return logp, None
    p = torch.softmax(logits, dim=-1)
    return logp, lse - (p * logits).sum(-1)


def chunked_logprobs(h, w, targets, temperature=1.0, entropy=False, chunk=LOGPROB_CHUNK):
    """log p(targets) (and entropy) from hidden states h [B, T, C] and the LM head w [V, C], never
    holding more than `chunk` rows of [*, V] logits. With grad, each chunk is recomputed in the
    backward pass (activation checkpointing), so the saved activations stay [B, T, C] sized."""
    B, T, C = h.shape
    hf, tf = h.reshape(B * T, C), targets.reshape(B * T).clamp(min=0)  # ignore_index-style -100 is safe
    outs, ents = [], []
    for i in range(0, B * T, chunk):
        args = (hf[i:i + chunk], w, tf[i:i + chunk], temperature, entropy)
        if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        outs.append(lp)
        ents.append(ent)
    logp = torch.cat(outs).reshape(B, T).clone()  # not a view: FSDP2 hooks the outputs of a module
    return logp, (torch.cat(ents).reshape(B, T).clone() if entropy else None)


def token_logprobs(model, input_ids, temperature=1.0, entropy=False):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for right-padded rows, shape [B, T-1], on
    logits / temperature; with entropy=True also the per-position entropy. Gradients flow."""
    return model(input_ids[:, :-1], targets=input_ids[:, 1:], temperature=temperature, entropy=entropy)


# -----------------------------------------------------------------------------
# sampling

@dataclass
class Sample:
    tokens: list  # the response ids; ends with the stop token when stopped
    stopped: bool  # False: cut at max_new_tokens
    logprobs: list  # log p of each token under the sampler's logits / temperature (1 when greedy)
    prompt_index: int = 0


def fsdp_modules(model):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


M32 = 0xFFFFFFFF


def hash32(x):
    """A 32-bit integer mix (lowbias32) on int64 tensors with values in [0, 2^32); no overflow."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def uniforms(keys, t):
    """One uniform in (0, 1) per row that depends only on (row key, step t): a row's sample never
    depends on which other rows share its batch, how many processes split the work, or when other
    rows finished, so a run is reproducible across batch sizes and world sizes."""
    u = hash32((hash32((keys * 0x9E3779B1 + t) & M32) * 0x85EBCA6B + 0x6A09E667) & M32)
    return (u.double() + 0.5) / 2.0**32


def next_token(logits, temperature, top_p, keys, t):
    """Pick the next token of each row; returns (ids, log p of the ids under logits / temperature).
    Sampling inverts each row's CDF (accumulated in float64) at one hashed uniform: exact for the
    (top-p truncated) softmax, and a few passes over [B, V] where per-token noise would take many."""
    if temperature == 0:
        ids = logits.argmax(-1)
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
        return ids, logp
    logits = logits / temperature
    logp_all, p = torch.log_softmax(logits, -1), torch.softmax(logits, -1)
    if top_p < 1.0:
        p, order = p.sort(-1, descending=True)
    cdf = p.cumsum(-1, dtype=torch.float64)
    if top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p, and sample within its mass
        kept = ((cdf - p) <= top_p).sum(-1, keepdim=True)
        mass = cdf.gather(-1, kept - 1)
    else:
        mass = cdf[:, -1:]
    u = uniforms(keys, t)[:, None] * mass
    # the first token whose CDF exceeds u; it has p > 0, as the CDF rises past u exactly there
    ids = torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[-1] - 1)
    if top_p < 1.0:
        ids = order.gather(-1, ids)
    ids = ids.squeeze(-1)
    return ids, logp_all.gather(-1, ids[:, None]).squeeze(-1)


def prompt_seeds(seed, count):
    """Per-prompt seeds from one seed (prompt i gets the same seed whatever batch it is in)."""
    return hash32((torch.arange(count) + seed * 0x27D4EB2F) & M32).tolist()


@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_ids=(), seed=None,
             max_batch=None):
    """Sample n responses per prompt (lists of token ids, any lengths). Prompt-major results.

    The prompts are prefilled once each, packed back to back with no padding; their K/V is
    repeated n times. Then one decode step for all rows; a row ends at its first stop token (kept)
    or at max_new_tokens, and ended rows leave the batch once a quarter of it has ended. On an
    FSDP2 model, every shard is gathered once for the whole rollout instead of once per layer per
    token. `max_batch` bounds the rows decoded at once.
    `seed` is an int or one int per prompt; sample j of a prompt depends only on (its seed, j)."""
    if seed is None:
        seed = int(torch.randint(2**31, ()).item())
    if isinstance(seed, int):
        seed = prompt_seeds(seed, len(prompts))
    if max_batch is not None and len(prompts) * n > max_batch:
        per = max(1, max_batch // n)
        out = []
        for i in range(0, len(prompts), per):
            part = generate(model, prompts[i:i + per], n, max_new_tokens, temperature, top_p, stop_ids,
                            seed[i:i + per], None)
            for s in part:
                s.prompt_index += i
            out.extend(part)
        return out
    fsdp = fsdp_modules(model)
    for m in fsdp:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, n, max_new_tokens, temperature, top_p, stop_ids, seed)
    finally:
        model.train(was_training)
        for m in fsdp:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def _generate(model, prompts, n, max_new_tokens, temperature, top_p, stop_ids, seed):
    cfg = model.config
    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    P = len(prompts)
    keys = hash32((torch.tensor(seed, device=device).repeat_interleave(n) * 31 +
                   torch.arange(n, device=device).repeat(P)) & M32)  # one key per (prompt, draw)
    if min(map(len, prompts)) == 0:
        raise ValueError("generate: empty prompt")
    T0 = max(map(len, prompts))
    cache = KVCache(cfg.num_hidden_layers, [len(p) for p in prompts], cfg.num_key_value_heads,
                    T0 + max_new_tokens, cfg.head_dim, dtype, device)
    packed = torch.tensor([t for p in prompts for t in p], device=device)[None]
    logits = model(packed, cache=cache)  # prefill: logits at each prompt's last token
    cache.prefill = False
    rows = torch.arange(P, device=device).repeat_interleave(n)  # sample i*n+j is prompt i, draw j
    cache.select(rows)
    logits = logits.index_select(0, rows)

    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    live = torch.arange(P * n, device=device)  # the output row of each batch row
    running = torch.ones(P * n, dtype=torch.bool, device=device)
    out_tok = torch.zeros(P * n, max_new_tokens, dtype=torch.long, device=device)
    out_lp = torch.zeros(P * n, max_new_tokens, device=device)
    out_len = torch.zeros(P * n, dtype=torch.long, device=device)
    stopped = torch.zeros(P * n, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        ids, lp = next_token(logits, temperature, top_p, keys, t)
        out_tok[live, t] = ids  # a row that has ended writes past its length, which is never read
        out_lp[live, t] = lp
        out_len[live] += running
        done = running & torch.isin(ids, stop)
        stopped[live] |= done
        running &= ~done
        if t == max_new_tokens - 1:
            break
        left = int(running.sum())
        if left == 0:
            break
        if left <= 0.75 * len(live):
            # drop ended rows once a quarter of the batch has ended: each compaction copies the
            # whole cache, so doing it whenever any row ends would copy it nearly every step
            keep = running.nonzero().squeeze(-1)
            live, ids, keys, running = live[keep], ids[keep], keys[keep], running[keep]
            cache.select(keep)
        cache.span = T0 + t + 1  # every row is at most T0 + t long before this token
        logits = model(ids[:, None], cache=cache)[:, -1]

    out_tok, out_lp, out_len, stopped = out_tok.tolist(), out_lp.tolist(), out_len.tolist(), stopped.tolist()
    return [Sample(out_tok[r][:out_len[r]], stopped[r], out_lp[r][:out_len[r]], r // n) for r in range(P * n)]
