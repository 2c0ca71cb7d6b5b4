"""model.py against transformers: logits parity on tiny random models and on SmolLM2-135M,
round trips through save_model, and clean errors for bad checkpoints."""
import json
import os
import subprocess
import sys

import pytest
import torch

import toy

from data import render_prompt
from loading import LoadError, end_of_turn_id, load_model, load_tokenizer, save_model, stop_token_ids

transformers = pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256)


def tiny_hf(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "llama_gqa_tied":
        cfg = transformers.LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0)
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "llama3_rope":
        cfg = transformers.LlamaConfig(**TINY, num_key_value_heads=1, tie_word_embeddings=False, rope_theta=500000.0,
                                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=32))
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2_bias_untied":
        cfg = transformers.Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6)
        m = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
        m = transformers.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    # random init gives zero biases and unit norms: perturb them so the test can see them
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def ragged_batch(vocab, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = max(lens)
    idx = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, L in enumerate(lens):
        idx[i, :L] = torch.randint(0, vocab, (L,), generator=g)
        mask[i, :L] = 1
    return idx, mask


@pytest.mark.parametrize("kind", ["llama_gqa_tied", "llama3_rope", "qwen2_bias_untied", "qwen3"])
def test_logits_parity_tiny(kind, tmp_path):
    hf = tiny_hf(kind)
    hf.save_pretrained(tmp_path)
    ours = load_model(str(tmp_path)).eval()
    # lengths beyond the llama3 original context (32) exercise the scaled frequencies
    idx, mask = ragged_batch(TINY["vocab_size"], [50, 7, 33, 1])
    with torch.no_grad():
        ref = hf(input_ids=idx, attention_mask=mask).logits
        got = ours(idx)
    valid = mask.bool()
    diff = (ref[valid] - got[valid]).abs().max().item()
    print(f"{kind}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4
    # hidden states without the head, and explicit position ids, agree with the default path
    with torch.no_grad():
        h = ours(idx, hidden=True)
        pos = torch.arange(idx.shape[1])[None].expand_as(idx)
        assert torch.allclose(ours(idx, position_ids=pos), got, atol=1e-6)
    assert h.shape == (4, idx.shape[1], TINY["hidden_size"])


def test_round_trip(tmp_path):
    hf = tiny_hf("qwen2_bias_untied")
    hf.save_pretrained(tmp_path / "a")
    ours = load_model(str(tmp_path / "a"))
    save_model(ours, tmp_path / "b", max_shard_bytes=40_000)  # force several shards + an index
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    again = load_model(str(tmp_path / "b"))
    idx, mask = ragged_batch(TINY["vocab_size"], [20, 11])
    with torch.no_grad():
        a = hf(input_ids=idx, attention_mask=mask).logits[mask.bool()]
        b = back(input_ids=idx, attention_mask=mask).logits[mask.bool()]
        c = again(idx)[mask.bool()]
    assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() < 1e-4


def test_bad_inputs(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        load_model(str(tmp_path / "nope"))
    d = tmp_path / "ckpt"
    tiny_hf("llama_gqa_tied").save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(LoadError, match="unsupported model_type 'gpt_neox'") as e:
        load_model(str(d))
    assert "\n" not in str(e.value)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="unsupported rope scaling type 'yarn'"):
        load_model(str(d))
    cfg["rope_scaling"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    st = d / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="corrupt or truncated safetensors") as e:
        load_model(str(d))
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)


def test_bad_input_cli_is_one_line(tmp_path):
    # what a user sees from a script: one line on stderr, non-zero exit, no traceback
    code = ("import sys; from loading import LoadError, load_model\n"
            "try: load_model(sys.argv[1])\n"
            "except LoadError as e: sys.exit(f'error: {e}')")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True,
                       cwd=root)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing: no such file" in r.stderr


@pytest.fixture(scope="module")
def smol(smollm2_path):
    ours = load_model(smollm2_path).eval()
    tok = load_tokenizer(smollm2_path)
    return ours, tok


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_path, smol):
    ours, tok = smol
    d, f = os.path.split(smollm2_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ids = render_prompt(tok, [{"role": "user", "content": "What is the capital of France? Answer briefly."}])
    x = torch.tensor([ids])
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    diff = (ref - got).abs().max().item()
    print(f"SmolLM2-135M GGUF: max abs logit diff {diff:.2e} over {len(ids)} tokens")
    assert diff <= 1e-3
    assert ref[0, -1].argmax() == got[0, -1].argmax()
    assert stop_token_ids(tok) and end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_smollm2_save_load(smol, tmp_path):
    ours, tok = smol
    save_model(ours, tmp_path, tokenizer=tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok2 = load_tokenizer(str(tmp_path))
    ids = render_prompt(tok2, [{"role": "user", "content": "Hello there"}])
    assert ids == render_prompt(tok, [{"role": "user", "content": "Hello there"}])
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() < 1e-3


def test_saved_files(tmp_path):
    # what transformers writes and reads: one model.safetensors (format=pt) or numbered shards + an
    # index; a tied head is left out; a save replaces the weight files already there; the
    # generation config (the eos ids the official sampler stops on) is kept
    from safetensors import safe_open
    hf = tiny_hf("llama_gqa_tied")
    hf.generation_config.eos_token_id = [2, 5, 7]
    hf.save_pretrained(tmp_path / "a")
    ours = load_model(str(tmp_path / "a"))
    save_model(ours, tmp_path / "b", max_shard_bytes=40_000)
    files = sorted(os.listdir(tmp_path / "b"))
    shards = [f for f in files if f.endswith(".safetensors")]
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours.state_dict()) - {"lm_head.weight"}
    save_model(ours, tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "b")) == ["config.json", "generation_config.json", "model.safetensors"]
    modes = {f: os.stat(tmp_path / "b" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "b")}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as the rest (not 0600)
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"} and set(f.keys()) == set(ours.state_dict()) - {"lm_head.weight"}
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert back.generation_config.eos_token_id == [2, 5, 7]
    idx, _ = ragged_batch(TINY["vocab_size"], [9])
    with torch.no_grad():
        assert (back(input_ids=idx).logits - ours(idx)).abs().max() < 1e-4


def test_stop_token_ids_read_the_generation_config(tmp_path):
    # Qwen2.5 stops on <|im_end|> and <|endoftext|>, Llama-3.1 on <|eot_id|>, <|eom_id|> and
    # <|end_of_text|>: transformers' generate takes them from generation_config.json's eos_token_id
    # (an int or a list), else from config.json's
    import toy
    tok = toy.make_tokenizer()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    d = tmp_path / "ckpt"
    tok.save_pretrained(d)
    assert stop_token_ids(load_tokenizer(str(d))) == [eot]
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": [eot, 9]}))
    assert stop_token_ids(load_tokenizer(str(d))) == [eot, 9]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [11, eot, 12]}))
    assert stop_token_ids(load_tokenizer(str(d))) == [eot, 11, 12]  # generation_config.json wins
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 13}))
    assert stop_token_ids(load_tokenizer(str(d))) == [eot, 13]
    # a tokenizer from elsewhere, told which checkpoint it serves
    assert stop_token_ids(tok, checkpoint=str(d)) == [eot, 13]
    # a saved model keeps its generation config, so a trained checkpoint stops where its source did
    hf = tiny_hf("llama_gqa_tied")
    hf.generation_config.eos_token_id = [eot, 14]
    hf.save_pretrained(tmp_path / "src")
    save_model(load_model(str(tmp_path / "src")), tmp_path / "out", tokenizer=tok)
    assert stop_token_ids(load_tokenizer(str(tmp_path / "out"))) == [eot, 14]


def test_a_checkpoint_never_runs_its_own_code(tmp_path):
    """A tokenizer or config with auto_map asks to run the checkpoint's Python: refused in one line,
    before transformers could ask at a terminal; the module never runs."""
    import pty
    ckpt = tmp_path / "ckpt"
    tiny_hf("llama_gqa_tied").save_pretrained(ckpt)
    toy.make_tokenizer().save_pretrained(ckpt)
    marker = tmp_path / "ran"
    (ckpt / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                  "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="asks to run its own code"):
        load_tokenizer(str(ckpt))
    # at a terminal, as a user runs it: one line, no question, exit 1
    leader, follower = pty.openpty()
    r = subprocess.run([sys.executable, "train_gad.py", "--student", str(ckpt), "--out-dir", str(tmp_path / "o")],
                       cwd=ROOT, stdin=follower, stdout=follower, stderr=follower, timeout=120)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    text = out.decode(errors="replace").strip()
    assert r.returncode == 1 and "[y/N]" not in text and "Traceback" not in text, text
    assert text.splitlines()[-1].startswith("train_gad.py: ") and "auto_map" in text.splitlines()[-1]
    assert not marker.exists()
