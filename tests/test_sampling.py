"""The KV-cache sampler against transformers' generate and against teacher-forced log-probs;
chunked token log-probs against the naive full-logits path (values, gradients, memory)."""
import os

import pytest
import torch

from model import Transformer, generate, load_tokenizer, render_prompt, stop_token_ids, token_logprobs
from test_model import tiny_hf

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    hf = tiny_hf("llama_gqa_tied", seed=3)
    hf.save_pretrained(d)
    return hf, Transformer.from_pretrained(str(d)).eval()


def prompts_of(lens, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (L,), generator=g).tolist() for L in lens]


def hf_greedy(hf, prompt, max_new, stop):
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=max_new, do_sample=False, eos_token_id=list(stop) or None,
                      pad_token_id=0, min_new_tokens=0)
    return out[0, len(prompt):].tolist()


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
    sizes = []
    select = model.KVCache.select
    monkeypatch.setattr(model.KVCache, "select", lambda self, rows: (sizes.append(len(rows)), select(self, rows)))
    got = generate(ours, prompts, n=4, max_new_tokens=40, temperature=1.0, stop_ids=stop, seed=[5, 6, 7, 8])
    ends = {len(s.tokens) for s in got if s.stopped}
    assert len(ends) >= 4, ends
    assert sizes[0] == 16 and all(b <= 0.75 * a for a, b in zip(sizes[1:], sizes[2:])), sizes
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
    ours = Transformer.from_pretrained(smollm2_path).eval()
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
    from model import next_token
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
