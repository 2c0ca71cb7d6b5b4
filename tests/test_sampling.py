"""The KV-cache sampler against transformers' generate and against teacher-forced log-probs;
chunked token log-probs against the naive full-logits path (values, gradients, memory)."""
import os

import pytest
import torch

from bench import hf_generate
from data import render_prompt
from generate import generate
from loading import load_model, load_tokenizer, stop_token_ids
from model import token_logprobs
from test_model import tiny_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    hf = tiny_hf("llama_gqa_tied", seed=3)
    hf.save_pretrained(d)
    return hf, load_model(str(d)).eval()


def prompts_of(lens, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]


def hf_greedy(hf, prompt, max_new, stop):
    return hf_generate(hf, [prompt], 1, max_new, 0, list(stop), pad_id=0, forced=False)[0]


def test_greedy_matches_transformers_tiny(tiny):
    hf, ours = tiny
    prompts = prompts_of([5, 17, 1, 30, 9], 97)
    got = generate(ours, prompts, max_new_tokens=20, temperature=0)
    for p, s in zip(prompts, got):
        assert s.tokens == hf_greedy(hf, p, 20, ())
        assert not s.stopped and len(s.tokens) == 20


def test_stops_and_max_new_tokens(tiny):
    hf, ours = tiny
    prompts = prompts_of([6, 13, 2, 21], 97, seed=5)
    free = generate(ours, prompts, max_new_tokens=12, temperature=0)
    stop = [free[1].tokens[4]]  # row 1 must stop at its 5th token, others maybe earlier or not
    got = generate(ours, prompts, max_new_tokens=12, temperature=0, stop_ids=stop)
    for p, f, s in zip(prompts, free, got):
        assert s.tokens == hf_greedy(hf, p, 12, stop)
        if stop[0] in f.tokens:
            k = f.tokens.index(stop[0])
            assert s.stopped and s.tokens == f.tokens[:k + 1]  # ends at the first stop, keeps it
        else:
            assert not s.stopped and len(s.tokens) == 12
    assert got[1].stopped and len(got[1].tokens) <= 5


def test_rows_ending_at_different_steps(tiny, monkeypatch):
    # rows end at many different steps; ended rows are dropped from the batch in a few compactions
    # (each copies the cache), and no row's sample depends on when the others ended
    import model
    _, ours = tiny
    prompts = prompts_of([7, 2, 15, 4], 97, seed=6)
    stop = list(range(3, 13))  # ~10% of the vocab: rows end after a few to a few dozen tokens
    sizes = []  # the cache's rows: at creation, then after each compaction
    init, select = model.KVCache.__init__, model.KVCache.select
    monkeypatch.setattr(model.KVCache, "__init__",
                        lambda self, layers, batch, *a: (sizes.append(batch), init(self, layers, batch, *a))[1])
    monkeypatch.setattr(model.KVCache, "select", lambda self, rows: (sizes.append(len(rows)), select(self, rows)))
    got = generate(ours, prompts, n=4, max_new_tokens=40, temperature=1.0, stop_ids=stop, seed=[5, 6, 7, 8])
    ends = {len(s.tokens) for s in got if s.stopped}
    assert len(ends) >= 4, ends
    # one row per sample from the start (the prefill writes each prompt's K/V into its 4 rows), then
    # each compaction keeps at most 3/4 of the rows
    assert sizes[0] == 16 and len(sizes) > 1 and all(b <= 0.75 * a for a, b in zip(sizes, sizes[1:])), sizes
    assert len(sizes) - 1 < len(ends), (sizes, ends)  # fewer compactions than distinct end steps
    for s in got:
        assert s.stopped == (s.tokens[-1] in stop) and not set(s.tokens[:-1]) & set(stop)
        assert s.stopped or len(s.tokens) == 40
    for i, p in enumerate(prompts):
        alone = generate(ours, [p], n=4, max_new_tokens=40, temperature=1.0, stop_ids=stop, seed=[5 + i])
        assert [s.tokens for s in alone] == [s.tokens for s in got[4 * i:4 * i + 4]]
        for a, b in zip(alone, got[4 * i:4 * i + 4]):
            assert a.stopped == b.stopped and max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_sampler_logprobs_equal_teacher_forced(tiny):
    _, ours = tiny
    prompts = prompts_of([4, 19, 11, 7], 97, seed=2)
    for temperature in (0.8, 1.0):
        samples = generate(ours, prompts, n=3, max_new_tokens=15, temperature=temperature, seed=11)
        assert len(samples) == 12 and [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        worst = 0.0
        for s in samples:
            seq = torch.tensor([prompts[s.prompt_index] + s.tokens])
            with torch.no_grad():
                lp, _ = token_logprobs(ours, seq, temperature=temperature)
            tf = lp[0, len(prompts[s.prompt_index]) - 1:]
            worst = max(worst, (tf - torch.tensor(s.logprobs)).abs().max().item())
        print(f"T={temperature}: max |sampler - teacher-forced| log-prob {worst:.2e}")
        assert worst <= 1e-4


def test_bf16_logprobs_of_the_same_samples_are_near_fp32(tiny):
    # the precision path: the same sequences scored by token_logprobs in bf16 compute (what --dtype auto
    # trains with on fast-bf16 hardware) and in fp32; log-softmax runs in fp32 either way, so the difference
    # is the rounding of bf16 matrix products: stated bound 0.02 nat per token, 0.005 on average
    import copy
    _, ours = tiny
    prompts = prompts_of([4, 19, 11, 7], 97, seed=5)
    samples = generate(ours, prompts, n=2, max_new_tokens=15, temperature=0.8, seed=3)
    T = max(len(prompts[s.prompt_index]) + len(s.tokens) for s in samples)
    seqs = torch.tensor([(prompts[s.prompt_index] + s.tokens + [0] * T)[:T] for s in samples])
    half = copy.deepcopy(ours).to(torch.bfloat16)
    with torch.no_grad():
        lp32, _ = token_logprobs(ours, seqs, temperature=0.8)
        lp16, _ = token_logprobs(half, seqs, temperature=0.8)
    assert lp16.dtype == torch.float32
    d = torch.cat([(lp16 - lp32)[i, len(prompts[s.prompt_index]) - 1:len(prompts[s.prompt_index]) - 1 + len(s.tokens)]
                   for i, s in enumerate(samples)]).abs()
    print(f"bf16 vs fp32 log-probs: max {d.max():.3g}, mean {d.mean():.3g}")
    assert d.max() < 0.02 and d.mean() < 0.005


def test_seed_determinism_and_top_p(tiny):
    _, ours = tiny
    prompts = prompts_of([3, 8], 97, seed=9)
    a = generate(ours, prompts, n=4, max_new_tokens=10, temperature=1.0, seed=123)
    b = generate(ours, prompts, n=4, max_new_tokens=10, temperature=1.0, seed=123)
    c = generate(ours, prompts, n=4, max_new_tokens=10, temperature=1.0, seed=124)
    assert [s.tokens for s in a] == [s.tokens for s in b] != [s.tokens for s in c]
    # a tiny top_p leaves only the argmax: sampling becomes greedy
    g = generate(ours, prompts, max_new_tokens=10, temperature=0)
    t = generate(ours, prompts, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5)
    assert [s.tokens for s in g] == [s.tokens for s in t]
    # max_batch splits the work without changing greedy results
    m = generate(ours, prompts * 3, max_new_tokens=10, temperature=0, max_batch=2)
    assert [s.tokens for s in m] == [s.tokens for s in g] * 3 and [s.prompt_index for s in m] == list(range(6))


def naive_logprobs(model, ids, temperature):
    logits = model(ids[:, :-1]) / temperature
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_token_logprobs_equals_naive_with_grads(tiny):
    _, ours = tiny
    ours = ours.train()
    ids = torch.randint(0, 97, (3, 40))
    w = torch.randn(3, 39)
    for temperature in (1.0, 0.8):
        ours.zero_grad()
        ref = naive_logprobs(ours, ids, temperature)
        (ref * w).sum().backward()
        g_ref = {n: p.grad.clone() for n, p in ours.named_parameters()}
        ours.zero_grad()
        from model import chunked_logprobs
        # chunks of 16 over 3 x 39 tokens: several chunks, the last one ragged
        got, ent = chunked_logprobs(ours(ids[:, :-1], hidden=True), ours.lm_head.weight, ids[:, 1:],
                                    temperature, entropy=True, chunk=16)
        (got * w).sum().backward()
        assert torch.allclose(got, ref, atol=1e-5)
        for n, p in ours.named_parameters():
            assert torch.allclose(p.grad, g_ref[n], atol=1e-5), n
        with torch.no_grad():
            logits = ours(ids[:, :-1]) / temperature
            p = torch.softmax(logits, -1)
            ent_ref = -(p * torch.log_softmax(logits, -1)).sum(-1)
        assert torch.allclose(ent, ent_ref, atol=1e-4)
    ours.eval()


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward pass: what training holds in memory
    between a forward and its backward, exactly and deterministically (CPU has no allocator stats)."""
    seen = {}

    def pack(t):  # a tensor saved by several ops (the LM head weight, say) is held once
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.slow
def test_token_logprobs_memory_at_large_vocab():
    from model import chunked_logprobs
    V, C, T = 152_064, 64, 2048  # Qwen2.5 vocab, a few thousand tokens
    h = torch.randn(1, T, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.02).requires_grad_()
    tgt = torch.randint(0, V, (1, T))
    naive, _ = saved_bytes(lambda: torch.log_softmax((h @ w.t()).float(), -1).gather(-1, tgt[..., None]))
    ours, (lp, _) = saved_bytes(lambda: chunked_logprobs(h, w, tgt, 1.0, chunk=256))
    print(f"bytes saved for backward: naive {naive / 2**20:.0f} MiB, chunked {ours / 2**20:.1f} MiB")
    assert naive >= T * V * 4 and ours < naive / 20
    lp.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


@pytest.mark.slow
def test_greedy_matches_transformers_smollm2(smollm2_path):
    ours = load_model(smollm2_path).eval()
    tok = load_tokenizer(smollm2_path)
    d, f = os.path.split(smollm2_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    questions = ["Hi!", "Name three colours of the rainbow.", "Write one sentence about cats and dogs living together.",
                 "What is 2+2?", "Give me a short tip for sleeping well at night, please, in plain words."]
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    stop = stop_token_ids(tok)
    got = generate(ours, prompts, max_new_tokens=24, temperature=0, stop_ids=stop)
    for p, s in zip(prompts, got):
        ref = hf_greedy(hf, p, 24, stop)
        assert s.tokens == ref, (tok.decode(s.tokens), tok.decode(ref))


def test_sampler_distribution_and_batch_invariance(tiny):
    from generate import next_token
    # the inverse-CDF draws follow softmax(logits / T), with top-p truncation
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(20000, 1)
    keys = torch.arange(20000)
    for T, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.8)):
        ids, _ = next_token(logits, T, top_p, keys, t=3)
        freq = torch.bincount(ids, minlength=5).float() / len(ids)
        p = torch.softmax(logits[0] / T, -1)
        if top_p < 1:
            keep = torch.zeros(5, dtype=torch.bool)
            order = p.argsort(descending=True)
            keep[order[(p[order].cumsum(0) - p[order]) <= top_p]] = True
            p = torch.where(keep, p, torch.zeros_like(p))
            p = p / p.sum()
        assert (freq - p).abs().max() < 0.015, (T, top_p, freq, p)
    # a prompt's samples do not depend on the other prompts in its batch (world-size invariance)
    _, ours = tiny
    prompts = prompts_of([4, 9, 6], 97, seed=4)
    seeds = [11, 22, 33]
    together = generate(ours, prompts, n=2, max_new_tokens=8, temperature=1.0, seed=seeds)
    alone = generate(ours, prompts[1:2], n=2, max_new_tokens=8, temperature=1.0, seed=seeds[1:2])
    assert [s.tokens for s in together[2:4]] == [s.tokens for s in alone]


def test_sample_streams_never_collide(tiny):
    # The trainer gives consecutive prompts consecutive seeds. Keys derived as hash32(seed * 31 + j)
    # gave seed s's sample j + 31 the stream of seed s + 1's sample j: identical answers for n >= 32.
    from generate import M32, hash32, sample_keys
    seeds = list(range(1000, 1064))
    old = hash32((torch.tensor(seeds)[:, None] * 31 + torch.arange(64)) & M32)
    assert len(set(old.flatten().tolist())) < 4096  # what the test would catch
    assert len(set(sample_keys(seeds, 64).tolist())) == 4096
    _, ours = tiny
    out = generate(ours, [[5, 6, 7]] * 64, n=64, max_new_tokens=8, temperature=1.0, seed=seeds)
    assert len({tuple(s.tokens) for s in out}) == 4096


def test_max_batch_refills_finished_rows(tiny, monkeypatch):
    # With max_batch, a row whose sample ended takes the next waiting prompt (continuous batching):
    # fewer decode steps than fixed waves of prompts, and the same samples as one unbounded batch.
    import model
    _, ours = tiny
    prompts = prompts_of([7, 2, 15, 4, 9, 3, 12, 5], 97, seed=6)
    stop = list(range(3, 13))
    kw = dict(n=2, max_new_tokens=30, temperature=1.0, stop_ids=stop, seed=7)
    ref = generate(ours, prompts, **kw)
    steps, admitted = [], []  # rows of each decode step; rows filled by each prefill
    decode, prefill = model.KVCache.decode, model.KVCache.prefill
    monkeypatch.setattr(model.KVCache, "decode", lambda self: (steps.append(len(self.lengths)), decode(self)))
    monkeypatch.setattr(model.KVCache, "prefill",
                        lambda self, lens, rows: (admitted.append(sum(map(len, rows))), prefill(self, lens, rows)))
    got = generate(ours, prompts, max_batch=4, **kw)
    assert [s.tokens for s in got] == [s.tokens for s in ref] and [s.stopped for s in got] == [s.stopped for s in ref]
    for a, b in zip(got, ref):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
    assert max(steps) == 4 and admitted[0] == 4 and set(admitted[1:]) == {2}  # whole prompts: n rows each
    waves = sum(max(len(s.tokens) for s in ref[i:i + 4]) - 1 for i in range(0, 16, 4))  # 2 prompts a wave
    print(f"decode steps: {len(steps)} refilling rows, {waves} in fixed waves")
    assert len(steps) < waves
    # a prompt's n samples may exceed the batch: they are admitted a row at a time
    small = generate(ours, prompts[:3], max_batch=3, **{**kw, "n": 4})
    assert [s.tokens for s in small] == [s.tokens for s in generate(ours, prompts[:3], **{**kw, "n": 4})]


# -----------------------------------------------------------------------------
# flash-attn's argument plumbing, checked on CPU through a stand-in

def reference_attention(q, k, v, causal):
    """q [B, T, H, hd], k/v [B, S, Hkv, hd]; fp32 math; flash's causal mask is aligned bottom-right."""
    B, T, H, hd = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    k, v = (x.float().repeat_interleave(H // Hkv, dim=2) for x in (k, v))
    att = torch.einsum("bthd,bshd->bhts", q.float(), k) / hd ** 0.5
    if causal:
        att = att.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(S - T + 1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", att.softmax(-1), v).to(q.dtype)


@pytest.fixture
def flash_standin(monkeypatch):
    """flash-attn's flash_attn_func and flash_attn_varlen_func in plain PyTorch, with their signatures,
    layouts and input checks, and model.py's CUDA path forced on; yields the calls made."""
    import model
    calls = []

    def check(q, k, v):
        assert q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
        assert q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-2] % k.shape[-2] == 0
        assert all(x.stride(-1) == 1 for x in (q, k, v))  # flash needs the head dim contiguous

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        check(q, k, v)
        assert q.dim() == 4 and k.shape[:2] == v.shape[:2] == q.shape[:2] and softmax_scale is None
        calls.append("dense")
        return reference_attention(q, k, v, causal)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        check(q, k, v)
        assert q.dim() == 3 and k.shape[0] == v.shape[0] == q.shape[0] and softmax_scale is None
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert cu.dtype == torch.int32 and cu.device == q.device and cu[0] == 0 and cu[-1] == q.shape[0]
        lens = cu_seqlens_q.diff().tolist()
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k == max(lens)
        calls.append("varlen")
        out = torch.empty_like(q)
        for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
            out[a:b] = reference_attention(q[None, a:b], k[None, a:b], v[None, a:b], causal)[0]
        return out

    monkeypatch.setattr(model, "flash_attn_func", flash_attn_func)
    monkeypatch.setattr(model, "flash_attn_varlen_func", flash_attn_varlen_func)
    monkeypatch.setattr(model, "use_flash", lambda t: t.dtype in (torch.float16, torch.bfloat16))
    return calls


def test_flash_attention_plumbing(tiny, flash_standin):
    # the CUDA path (flash-attn on padded batches and on packed prompts) against the SDPA path, in bf16
    import copy
    import model
    _, ours = tiny
    m = copy.deepcopy(ours).to(torch.bfloat16)
    idx = torch.randint(3, 97, (3, 21))
    prompts = prompts_of([5, 17, 1, 30, 9], 97, seed=8)
    with torch.no_grad():
        flash = m(idx)
        assert flash_standin == ["dense"] * 2  # one per layer
        flash_samples = generate(m, prompts, n=2, max_new_tokens=6, temperature=1.0, seed=3)
        assert flash_standin.count("varlen") == 2  # the prefill, one per layer
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model, "use_flash", lambda t: False)
            sdpa = m(idx)
            sdpa_samples = generate(m, prompts, n=2, max_new_tokens=6, temperature=1.0, seed=3)
    assert (flash - sdpa).abs().max() < 0.05 and flash.abs().max() > 0.1
    worst = max(abs(x - y) for a, b in zip(flash_samples, sdpa_samples) for x, y in zip(a.logprobs, b.logprobs))
    assert [s.tokens for s in flash_samples] == [s.tokens for s in sdpa_samples] and worst < 0.05, worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attention_cuda(tiny):
    flash_attn = pytest.importorskip("flash_attn")  # noqa: F841
    import copy
    import model
    _, ours = tiny
    m = copy.deepcopy(ours).to("cuda", torch.bfloat16)
    idx = torch.randint(3, 97, (3, 21), device="cuda")
    prompts = prompts_of([5, 17, 1, 30, 9], 97, seed=8)
    with torch.no_grad():
        assert model.use_flash(m.model.embed_tokens.weight)
        flash, flash_samples = m(idx), generate(m, prompts, n=2, max_new_tokens=6, temperature=1.0, seed=3)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model, "use_flash", lambda t: False)
            sdpa, sdpa_samples = m(idx), generate(m, prompts, n=2, max_new_tokens=6, temperature=1.0, seed=3)
    assert (flash - sdpa).abs().max() < 0.05
    worst = max(abs(x - y) for a, b in zip(flash_samples, sdpa_samples) for x, y in zip(a.logprobs, b.logprobs))
    assert worst < 0.05, worst


def test_two_level_cdf_inversion():
    # invert_cdf (block sums, then one block) picks what a search of the whole float64 CDF picks, and
    # never a token of probability 0, whether or not the vocabulary is a multiple of the block
    from generate import CDF_BLOCK, invert_cdf
    g = torch.Generator().manual_seed(0)
    for V in (CDF_BLOCK * 7, CDF_BLOCK * 7 + 5):
        p = torch.rand(64, V, generator=g) ** 8
        p[p < 0.3] = 0  # most tokens impossible, as after a sharp softmax
        p[:, -CDF_BLOCK:] = 0  # a whole block of them, at the end
        p = p / p.sum(-1, keepdim=True)
        u = torch.rand(64, 1000, generator=g, dtype=torch.float64)
        for k in range(0, 1000, 50):
            got = invert_cdf(p, u[:, k:k + 1]).squeeze(-1)
            cdf = p.cumsum(-1, dtype=torch.float64)
            ref = torch.searchsorted(cdf, u[:, k:k + 1] * cdf[:, -1:], right=True).squeeze(-1)
            assert (p.gather(-1, got[:, None]) > 0).all()
            assert (got == ref).float().mean() >= 0.99, (V, k)
        # the edges: u -> 0 gives the first possible token, u -> 1 the last
        first = (p > 0).float().argmax(-1)
        last = V - 1 - (p.flip(-1) > 0).float().argmax(-1)
        assert torch.equal(invert_cdf(p, torch.zeros(64, 1, dtype=torch.float64)).squeeze(-1), first)
        assert torch.equal(invert_cdf(p, torch.full((64, 1), 1 - 2**-40, dtype=torch.float64)).squeeze(-1), last)



def test_diverged_logits_give_nan_logprobs_not_an_index_error():
    # a model whose weights blew up gives NaN logits: the sampler still returns in-range ids, with NaN
    # log-probs that the training loop's non-finite checks catch, not an index error
    from generate import next_token, sample_keys
    for V, top_p in ((1000, 1.0), (1000, 0.9), (1024, 1.0)):
        logits = torch.full((3, V), float("nan"))
        logits[1, 5] = float("inf")
        ids, lp = next_token(logits, 1.0, top_p, sample_keys([1, 2, 3], 1), 0)
        assert ((ids >= 0) & (ids < V)).all() and torch.isnan(lp).all()

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_keep_the_samples(tiny, monkeypatch, dtype):
    # On a CPU with oneDNN, generate lays every Linear's weight out once per rollout: the samples and
    # their log-probs are those of the plain F.linear path (fp32 within rounding, bf16 alike), the
    # log-probs match teacher forcing in the model's dtype, and the weights are given back after.
    import contextlib
    import copy
    import model
    _, ours = tiny
    m = copy.deepcopy(ours).to(dtype)
    prompts = prompts_of([5, 17, 1, 30, 9], 97, seed=8)
    used = []
    forward = model.Linear.forward
    monkeypatch.setattr(model.Linear, "forward",
                        lambda self, x: (used.append(self.packed is not None), forward(self, x))[1])
    packed = generate(m, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=3)
    if not torch.backends.mkldnn.is_available() or (dtype == torch.bfloat16
                                                     and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("no oneDNN path for this dtype on this CPU")
    assert all(used) and all(lin.packed is None for lin in m.modules() if isinstance(lin, model.Linear))
    import generate as gen
    monkeypatch.setattr(gen, "packed_weights", lambda *a: contextlib.nullcontext())
    plain = generate(m, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=3)
    assert [s.tokens for s in packed] == [s.tokens for s in plain]
    tol = 1e-5 if dtype == torch.float32 else 1e-3  # (bf16: the same oneDNN kernel; bitwise equal here)
    worst = max(abs(x - y) for a, b in zip(packed, plain) for x, y in zip(a.logprobs, b.logprobs))
    assert worst <= tol, worst
    for s in packed:
        seq = torch.tensor([prompts[s.prompt_index] + s.tokens])
        with torch.no_grad():
            lp, _ = token_logprobs(m, seq)
        tf = lp[0, len(prompts[s.prompt_index]) - 1:]
        # bf16: the prefill + decode path and the whole-sequence path round differently (0.002 here)
        assert (tf - torch.tensor(s.logprobs)).abs().max() <= (1e-4 if dtype == torch.float32 else 0.02)


@pytest.mark.slow
def test_compiled_decode_step(tiny):
    # generate(compile=True) runs the decode step through torch.compile (dynamic shapes: rows leave
    # the batch, the span grows): the same samples as eager
    _, ours = tiny
    prompts = prompts_of([5, 17, 1, 30, 9], 97, seed=8)
    kw = dict(n=3, max_new_tokens=20, temperature=1.0, seed=1, stop_ids=list(range(3, 10)))
    compiled, eager = generate(ours, prompts, compile=True, **kw), generate(ours, prompts, **kw)
    assert [s.tokens for s in compiled] == [s.tokens for s in eager]
    assert max(abs(x - y) for a, b in zip(compiled, eager) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
