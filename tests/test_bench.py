"""bench.py: the GPU check end to end at toy sizes on CPU (and on CUDA when there is one), the
step comparison against TRL on the toy world, the FLOP formulas against torch's FLOP counter, the
flash-attn check through a stand-in, and parse-time refusals of bad flags and inputs."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import model
from data import DataError
from discriminator import Discriminator
from loading import LoadError
from loading import load_model
from model import ModelConfig, Transformer, token_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(args, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "bench.py"] + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def lines(r):
    """bench.py's stdout: JSON lines only (the trainers' own output goes to stderr)."""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


def by_check(out):
    got = {}
    for rec in out:
        got.setdefault(rec.get("check") or rec.get("bench"), []).append(rec)
    return got


GAD_KEYS = {"shape", "t_step", "t_sample", "t_d", "t_g", "d_gflops", "g_gflops", "d_of_bf16", "g_of_bf16", "d_of_fp32",
            "peak_gib", "resp_len", "params_m"}
MACHINE = {"machine", "isa", "threads", "bf16_gflops", "fp32_gflops", "copy_gbs"}  # on every line


def check_gpu_check_output(got, device):
    assert set(got) >= {"env", "parity", "flash", "sampler", "gad_step", "done"}, set(got)
    assert got["done"][0]["failed"] == [] and "error" not in json.dumps(got)
    par = got["parity"][0]
    assert par["ours_fp32_vs_hf_fp32"] < 1e-3 * par["logits_absmax"]  # the same model, up to rounding
    assert par["ours_bf16_vs_fp32"] < 0.05 * par["logits_absmax"] and par["top1_bf16_vs_fp32"] > 0.9
    smp = got["sampler"][0]
    assert smp["greedy_equal_float32"] == 1.0, smp  # ours and transformers' generate pick the same tokens
    assert smp["ours_tok_s"] > 0 and smp["hf_tok_s"] > 0 and smp["ratio"] > 0 and 0 < smp["ours_of_bound"] < 1
    steps = got["gad_step"]
    assert [s["shape"] for s in steps] == ["smollm2-135m", "qwen2.5-1.5b"]
    for s in steps:
        assert GAD_KEYS <= set(s), GAD_KEYS - set(s)
        assert s["t_step"] > 0 and s["d_gflops"] > 0 and s["g_gflops"] > 0
    for line in (rec for recs in got.values() for rec in recs):
        assert MACHINE <= set(line) and (line["isa"] == "cuda") == (device == "cuda"), line


def test_sampler_end_to_end_on_the_toy_model(toy_world):
    """bench.py as a user runs it, at toy size: the machine's header on every line, ours against
    transformers in both modes, and the decode bound beside the figure."""
    out = lines(run_bench(["--only", "sampler", "--model", toy_world["student"], "--shapes", "2x2,3x1",
                           "--new-tokens", "4", "--repeats", "1", "--dtype", "float32", "--threads", "1"]))
    assert [(o["shape"], o["mode"]) for o in out] == [("2x2", "stop"), ("2x2", "forced"), ("3x1", "stop"), ("3x1", "forced")]
    for o in out:
        assert MACHINE <= set(o) and o["threads"] == 1 and o["dtype"] == "float32"
        assert o["ours_tok_s"] > 0 and o["hf_tok_s"] > 0 and o["bound_tok_s"] > o["ours_tok_s"]
        assert o["ours_of_bound"] == pytest.approx(o["ours_tok_s"] / o["bound_tok_s"], abs=2e-3)
    assert all(o["mean_len"] == 4 for o in out if o["mode"] == "forced")


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu():
    r = run_bench(["--gpu-check", "--device", "cpu", "--tiny"])
    got = by_check(lines(r))
    check_gpu_check_output(got, "cpu")
    assert got["env"][0]["mode"] == "tiny"
    if model.flash_attn_func is None:
        assert "not installed" in got["flash"][0]["skipped"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_tiny_on_cuda():
    got = by_check(lines(run_bench(["--gpu-check", "--tiny"])))
    check_gpu_check_output(got, "cuda")
    assert got["env"][0]["gpu"]


def test_update_flops_match_torch_flop_counter():
    # The matrix-product part of update_flops, against torch's FLOP counter on the same passes: D's
    # forward + backward, G's token_logprobs forward + backward (with the chunks' recompute), the
    # reference's forward. A wide vocabulary makes the LM head dominate, so its factor is what is
    # tested. The counter sees no attention (SDPA on CPU) and no non-matrix parameters (norms,
    # biases), which update_flops counts as 6 (or 2) FLOPs per token each: they are taken out here.
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, qkv_bias=True)
    G, D = Transformer(cfg), Discriminator(cfg)
    L = 40
    ids = torch.randint(cfg.vocab_size, (1, L))

    def counted(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    d = counted(lambda: D(ids, torch.tensor([L])).sum().backward()) - 6 * cfg.hidden_size  # less D's score head
    g = counted(lambda: token_logprobs(G, ids, 0.8, entropy=True)[0].sum().backward())
    with torch.no_grad():
        r = counted(lambda: token_logprobs(G, ids, 0.8))
    att = cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    other = sum(p.numel() for n, p in G.named_parameters() if p.dim() == 1)  # norms and biases
    d_f, g_f = bench.update_flops(cfg, [L], [L], ref=False)
    _, g_ref = bench.update_flops(cfg, [L], [L], ref=True)
    assert d_f - 6 * att * L ** 2 - 6 * other * L == d
    assert g_f - 6 * att * (L - 1) ** 2 - 6 * other * (L - 1) == g
    assert g_ref - g_f - 2 * att * (L - 1) ** 2 - 2 * other * (L - 1) == r


def test_step_lengths():
    rows = [dict(prompt=[1] * 5, teacher_ids=[2] * 3), dict(prompt=[1] * 7, teacher_ids=[2] * 4)]
    d, g = bench.step_lengths(rows, {"resp_len_mean": 2.5}, n=2)
    assert d == [8, 11, 7.5, 7.5, 9.5, 9.5] and g == [7.5, 7.5, 9.5, 9.5]


@pytest.fixture
def flash_standin(monkeypatch):
    """flash-attn's two functions in plain PyTorch with their signatures (q [.., H, hd], k/v [.., Hkv, hd]),
    and model.use_flash taking CPU half-precision tensors, so that the CUDA path runs here."""
    calls = []

    def attend(q, k, v):  # [T, H, hd] causal, GQA by repeating K/V heads, fp32 math
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(0, 1) for t in (q, k, v)),
                                                             is_causal=True)
        return y.transpose(0, 1).to(q.dtype)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kw):
        assert causal
        calls.append("dense")
        return torch.stack([attend(q[b], k[b], v[b]) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, **kw):
        assert causal and cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
        assert max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        calls.append("varlen")
        cu = cu_seqlens_q.tolist()
        return torch.cat([attend(q[a:b], k[a:b], v[a:b]) for a, b in zip(cu, cu[1:])])

    monkeypatch.setattr(model, "flash_attn_func", flash_attn_func)
    monkeypatch.setattr(model, "flash_attn_varlen_func", flash_attn_varlen_func)
    monkeypatch.setattr(model, "use_flash", lambda t: t.dtype in (torch.float16, torch.bfloat16))
    return calls


def test_flash_check_through_a_standin(flash_standin, tmp_path, capsys):
    cfgs = [bench.shape_config(name, tiny=True) for name in bench.SHAPES]
    tok = bench.synthetic_tokenizer(cfgs[0].vocab_size)
    ckpt = bench.random_checkpoint(str(tmp_path / "m"), cfgs[0], tok, torch.device("cpu"))
    bench.check_flash(cfgs, ckpt, torch.device("cpu"))
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["check"] for o in out] == ["flash", "flash", "flash_model"]
    for o in out[:2]:
        assert o["padded_max_abs"] < 0.05 and o["packed_max_abs"] < 0.05 and o["sdpa_absmax"] > 0.5
    assert out[2]["logits_max_abs"] < 0.05 * out[2]["logits_absmax"] and out[2]["greedy_equal"] >= 0.75
    assert "dense" in flash_standin and "varlen" in flash_standin  # both of flash-attn's entry points ran


@pytest.mark.parametrize("shape", list(bench.SHAPES))
def test_synthetic_world_reads_back_the_same(shape, tmp_path):
    # the random checkpoint and the synthetic tokenizer as train_gad and transformers read them back:
    # the same token ids (transformers rebuilds a qwen2 checkpoint's tokenizer as Qwen2Tokenizer), one
    # token per word, the stop and pad ids train_gad needs, and the same logits
    from transformers import AutoModelForCausalLM
    from data import render_prompt
    from loading import end_of_turn_id, load_model, load_tokenizer, stop_token_ids
    cfg = bench.shape_config(shape, tiny=True)
    tok = bench.synthetic_tokenizer(cfg.vocab_size)
    ckpt = bench.random_checkpoint(str(tmp_path / "m"), cfg, tok, torch.device("cpu"))
    back = load_tokenizer(ckpt)
    msgs = [{"role": "user", "content": "the q u i c k fox"}]
    assert len(back) == cfg.vocab_size and render_prompt(back, msgs) == render_prompt(tok, msgs)
    assert len(back("a b c d e", add_special_tokens=False)["input_ids"]) == 5
    assert stop_token_ids(back) == [end_of_turn_id(back)] == [back.convert_tokens_to_ids("<|im_end|>")]
    assert back.pad_token_id not in stop_token_ids(back)
    ours = load_model(ckpt)
    assert ours.config.tie_word_embeddings and ours.config.qkv_bias == (shape == "qwen2.5-1.5b")
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    idx = torch.randint(cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(ours(idx), hf(idx).logits, atol=1e-4)


STEP_ARGS = ["--only", "step", "--steps", "2", "--step-prompts", "2", "--step-samples", "2", "--step-new-tokens", "4",
             "--step-threads", "1"]


@pytest.mark.slow
def test_step_against_trl_on_the_toy_world(toy_world):
    pytest.importorskip("trl")
    out = lines(run_bench(STEP_ARGS + ["--model", toy_world["student"], "--step-data", toy_world["train"]]))
    assert len(out) == 1 and out[0]["bench"] == "step" and MACHINE <= set(out[0])
    step = out[0]
    for k in ("ours_t_step", "ours_t_sample", "ours_t_d", "ours_t_g", "trl_fp32_s", "trl_bf16_s", "ratio", "trl_best",
              "trl_settings", "ours_extra_work"):
        assert k in step, k
    assert step["ratio"] == pytest.approx(step["ours_t_step"] / step[f"trl_{step['trl_best']}_s"], rel=0.05)
    assert len(step["ours_times"]) == len(step["trl_fp32_times"]) == 2 and 0 < step["trl_fp32_resp_len"] <= 4
    for k in ("ours_d_of_bf16", "ours_g_of_bf16", "ours_d_of_fp32", "ours_g_of_fp32", "ours_d_gflops",
              "ours_g_gflops", "ours_peak_gib", "trl_fp32_peak_gib"):
        assert step[k] > 0, k


@pytest.mark.slow
def test_step_without_trl_says_it_is_skipped(toy_world, tmp_path):
    (tmp_path / "trl.py").write_text("raise ImportError('no trl here')\n")  # shadows an installed trl
    out = lines(run_bench(STEP_ARGS + ["--model", toy_world["student"], "--step-data", toy_world["train"]],
                          env={"PYTHONPATH": str(tmp_path)}))
    assert out[0]["trl"].startswith("skipped: trl is not importable") and "ratio" not in out[0]
    assert out[0]["ours_t_step"] > 0 and len(out) == 1


@pytest.mark.parametrize("flags, where", [
    (["--shapes", "2x"], "--shapes"), (["--new-tokens", "-5"], "--new-tokens"), (["--repeats", "0"], "--repeats"),
    (["--threads", "-1"], "--threads"), (["--shapes", "16"], "--shapes"), (["--shapes", "0x4"], "--shapes"), (["--temperature", "0"], "--temperature"),
    (["--tokens", "0"], "--tokens"), (["--steps", "1"], "--steps"), (["--step-samples", "1"], "--step-samples"),
    (["--step-prompts", "0"], "--step-prompts"), (["--dtype", "float33"], "--dtype"),
    (["--check-steps", "1"], "--check-steps"), (["--check-new-tokens", "nan"], "--check-new-tokens"),
])
def test_bad_flags_are_refused_at_parse_time(flags, where, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(flags)
    assert e.value.code == 2 and f"argument {where}" in capsys.readouterr().err.strip().splitlines()[-1]


def test_flag_combinations(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny"])
    assert "--tiny goes with --gpu-check" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--gpu-check"])
        assert "needs a CUDA GPU" in capsys.readouterr().err
    assert bench.parse_args(["--gpu-check", "--device", "cpu", "--tiny"]).tiny


def test_bad_input_files_end_in_one_line(toy_world, tmp_path):
    # checked before any model is loaded; one line on stderr, exit status 1
    bad = tmp_path / "bad.jsonl"
    raw = b'{"id": "a", "messages": [{"role": "user", "content": "hi"}], "teacher": "\xff"}\n'
    bad.write_bytes(raw)
    column = raw.index(b"\xff") + 1
    r = run_bench(["--only", "step", "--step-data", str(bad)])
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"bench.py: {bad}:1: not UTF-8 text (byte 0xff at column {column})"], r.stderr
    # the same errors in this process (the CLI prints their message as its one line, as above);
    # --threads 0 and --step-threads 0 leave this process's thread count alone
    quiet = ["--only", "step", "--threads", "0", "--step-threads", "0"]
    with pytest.raises(DataError, match=f"^{tmp_path}/missing.jsonl: no such file$"):
        bench.main(quiet + ["--step-data", str(tmp_path / "missing.jsonl")])
    with pytest.raises(LoadError, match=f"^{tmp_path}/nope: no such file or directory$"):
        bench.main(quiet + ["--step-data", toy_world["train"], "--model", str(tmp_path / "nope")])
