"""discriminator.py, train_gad.py and checkpoint.py: the losses and their properties, EOS symmetry,
D as an HF checkpoint, FSDP on 2 processes against 1 (fp32 exactly, bf16 within a tolerance),
resume on N -> M processes, the out-dir's safety rules, NaN handling, init-from, the ablation flags,
and that GAD and SeqKD actually teach."""
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import toy
from data import DataError, read_rows, render_prompt, student_response, tokenize_rows
from discriminator import Discriminator, d_accuracy, pad_id_for_scoring, pair_loss, save_discriminator
from distributed import micro_batches
from loading import LoadError, end_of_turn_id, load_model, load_tokenizer, stop_token_ids
from model import token_logprobs
import train_gad
from train_gad import group_advantages, k3_kl, ppo_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(toy_world):
    return toy_world


def run(args, out, nproc=1, check=True, timeout=600):
    cmd = [sys.executable, "train_gad.py"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_gad.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + args + ["--out-dir", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(r.stdout[-3000:] + r.stderr[-3000:])
    return r


def base_args(w, **kw):
    """The toy run; fp32 by default, where 1 vs 2 processes and resume are exact (see DESIGN.md)."""
    a = dict(student=w["student"], train_data=w["train"], eval_data=w["test"], prompts_per_step=8,
             max_new_tokens=8, lr=1e-3, d_lr=1e-3, eval_markers="yes", eval_prompts=16, token_budget=64,
             dtype="float32", n_samples=8)
    a.update(kw)
    a.setdefault("d_head_lr", a["d_lr"])  # one D lr, as these tests were written (the demo's head lr is larger)
    return [x for k, v in a.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


def assert_same_metrics(a_run, b_run, rel=1e-6, abs_=1e-9, steps=None):
    assert [m["step"] for m in a_run] == [m["step"] for m in b_run]
    for a, b in zip(a_run, b_run):
        if steps is not None and a["step"] not in steps:
            continue
        assert set(a) == set(b), (a["step"], set(a) ^ set(b))
        for k in a:
            if isinstance(a[k], str):
                assert a[k] == b[k], (a["step"], k)
            elif not k.startswith(("t_", "tok_per_s", "peak_mem")):  # measurements, not results
                assert a[k] == pytest.approx(b[k], rel=rel, abs=abs_), (a["step"], k)


def tree_digest(path):
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(d, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


# -- units ------------------------------------------------------------------------------------

def test_pair_losses_properties():
    rt, rs = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    bt = pair_loss("bt", rt, rs)
    # log(1 + e^-(rt - rs)): ln 2 for a tie, below for a right order, above for a wrong one
    assert bt[0].item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert bt[1].item() == pytest.approx(math.log(2)) and bt[2].item() == pytest.approx(math.log1p(math.exp(2.0)))
    # BT sees only differences; BCE sees absolute scores (hence the head bias it needs)
    assert torch.allclose(pair_loss("bt", rt + 5, rs + 5), bt)
    assert not torch.allclose(pair_loss("bce", rt + 5, rs + 5), pair_loss("bce", rt, rs))
    assert pair_loss("bce", torch.tensor(0.0), torch.tensor(0.0)).item() == pytest.approx(math.log(2))
    assert pair_loss("bce", torch.tensor(20.0), torch.tensor(-20.0)).item() < 1e-8
    # gradients push the teacher's score up and the student's down, for both losses
    for kind in ("bt", "bce"):
        t, s = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        pair_loss(kind, t, s).sum().backward()
        assert t.grad.item() < 0 < s.grad.item()
    assert d_accuracy(rt, rs).item() == pytest.approx(1 / 3)  # a tie is not a win
    with pytest.raises(ValueError):
        pair_loss("hinge", rt, rs)


def test_group_advantages():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    a = group_advantages(r)
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std(unbiased=True)
    assert torch.allclose(a[0], (r[0] - 2.5) / (std + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))  # identical rewards: zeros, never NaN
    assert torch.isfinite(group_advantages(torch.tensor([[7.0]]))).all()
    # invariant to a shift and a positive scale of a group's rewards (a BCE head bias cancels)
    assert torch.allclose(group_advantages(r[:1] * 3 + 7), a[:1], atol=1e-5)


def test_k3_kl_is_an_unbiased_nonnegative_estimator():
    torch.manual_seed(0)
    p, q = torch.softmax(0.7 * torch.randn(50), 0), torch.softmax(0.7 * torch.randn(50), 0)  # the clamp never binds
    x = torch.multinomial(p, 400_000, replacement=True)
    k3 = k3_kl(p.log()[x], q.log()[x])
    exact = (p * (p.log() - q.log())).sum()
    assert (k3 >= 0).all() and k3.mean().item() == pytest.approx(exact.item(), rel=0.03)
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0  # zero where the policies agree
    assert k3_kl(torch.tensor([-30.0]), torch.tensor([0.0])).item() == 10  # clamped like verl


def test_ppo_clip_and_dual_clip():
    old = torch.zeros(6)
    logp = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5, 5.0]))
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    loss, clipped = ppo_loss(logp, old, adv, 0.2, 3.0)
    # A>0: min(r, clip(r)) * A; A<0: max(r, clip(r)) * A, then at most c * |A| (dual clip)
    assert torch.allclose(loss, torch.tensor([-1.0, -1.2, -0.5, 1.5, 0.8, 3.0]))
    assert clipped.tolist() == [0, 1, 0, 0, 1, 0]
    # ratio 1 (the paper's single minibatch): the loss is -A and its gradient -A * dlogp
    lp = torch.zeros(3, requires_grad=True)
    a = torch.tensor([2.0, -1.0, 0.5])
    ppo_loss(lp, lp.detach(), a, 0.2, 3.0)[0].sum().backward()
    assert torch.allclose(lp.grad, -a)


def test_micro_batches_keep_groups_whole_and_fit_the_budget():
    items = [[[1] * (3 + i % 5)] + [[2] * (2 + (i * 7) % 9) for _ in range(3)] for i in range(11)]
    seen = []
    for which, ids, lens in micro_batches(items, 40, torch.device("cpu")):
        rows = [s for i in which for s in items[i]]
        assert ids.shape[0] == len(rows) and lens.tolist() == [len(s) for s in rows]
        assert all(ids[r, :len(s)].tolist() == s for r, s in enumerate(rows))
        assert ids.numel() <= 40 or len(which) == 1  # an item larger than the budget goes alone
        seen += which
    assert sorted(seen) == list(range(11))


def test_bt_gradient_over_micro_batches_equals_the_pairwise_loss(world):
    """The loop's claim: with each prompt's teacher answer and its n samples in one micro-batch,
    the summed gradient over micro-batches is the gradient of the plain mean pairwise loss."""
    torch.manual_seed(0)
    D = load_model(world["student"], Discriminator)
    n = 3
    groups = [[[2, 4, 7 + i] + [5 + (i + j) % 9] * (1 + (i * j) % 4) for j in range(n + 1)] for i in range(5)]
    pairs = len(groups) * n
    D.zero_grad()
    for which, ids, lens in micro_batches(groups, 24, torch.device("cpu")):  # several micro-batches
        s = D(ids, lens).view(len(which), n + 1)
        (pair_loss("bt", s[:, :1], s[:, 1:]).sum() / pairs).backward()
    split = {k: p.grad.clone() for k, p in D.named_parameters()}
    D.zero_grad()
    one = lambda seq: D(torch.tensor([seq]), torch.tensor([len(seq)]))[0]  # each sequence on its own
    torch.stack([pair_loss("bt", one(g[0]), one(g[j])) for g in groups for j in range(1, n + 1)]).mean().backward()
    for k, p in D.named_parameters():
        assert torch.allclose(split[k], p.grad, atol=1e-6, rtol=1e-4), k


def test_one_d_update_widens_the_margin_of_its_pairs(world):
    """A defect check for D's update: after one AdamW step on a batch of pairs, those pairs' margins
    D(teacher) - D(sample) are larger and their BT loss smaller (the sign and the wiring are right)."""
    torch.manual_seed(0)
    D = load_model(world["student"], Discriminator)
    opt = torch.optim.AdamW(D.parameters(), lr=1e-3)
    n = 4
    groups = [[[2, 4, 7 + i, 5, 19, 19, 19]] + [[2, 4, 7 + i, 5, 8 + (i + j) % 5, 9, 10] for j in range(n)]
              for i in range(6)]

    def margins():
        out = []
        for which, ids, lens in micro_batches(groups, 10_000, torch.device("cpu")):
            s = D(ids, lens).view(len(which), n + 1)
            out.append(s[:, :1] - s[:, 1:])
        return torch.cat(out)

    before = margins()
    pair_loss("bt", before, torch.zeros_like(before)).mean().backward()
    opt.step()
    with torch.no_grad():
        after = margins()
    assert after.mean() > before.mean() + 0.01 and (after > before).float().mean() > 0.9
    assert pair_loss("bt", after, 0).mean() < pair_loss("bt", before.detach(), 0).mean()


def test_eos_symmetry(world, tmp_path):
    tok = load_tokenizer(world["student"])
    eot = end_of_turn_id(tok)
    text = "yes yes red cat"
    p = tmp_path / "one.jsonl"
    msgs = [{"role": "user", "content": "red dog"}]
    p.write_text(json.dumps({"id": "a", "messages": msgs, "teacher": text}) + "\n")
    rows, _ = tokenize_rows(read_rows(str(p)), tok, eot, 100, 50)
    teacher_in = rows[0]["prompt"] + rows[0]["teacher_ids"]
    sample = tok(text, add_special_tokens=False)["input_ids"] + [eot]  # a student sample that stopped
    assert teacher_in == render_prompt(tok, msgs) + student_response(sample, True, eot)
    # whichever stop token ended the sample, D sees the same end-of-turn token
    assert student_response(sample[:-1] + [tok.eos_token_id], True, eot)[-1] == eot
    # a cut teacher answer has no end-of-turn, like a cut sample
    rows, _ = tokenize_rows(read_rows(str(p)), tok, eot, 100, 3)
    assert rows[0]["teacher_ids"] == sample[:3]
    # an answer the API cut (finish_reason "length"), shorter than the limit, is cut here too
    p.write_text(json.dumps({"id": "a", "messages": msgs, "teacher": text, "finish_reason": "length"}) + "\n")
    rows, _ = tokenize_rows(read_rows(str(p)), tok, eot, 100, 50)
    assert rows[0]["teacher_ids"] == sample[:-1]
    # malformed input names the file and line
    p.write_text(json.dumps({"id": "a", "messages": msgs, "teacher": "x"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"one.jsonl:2: not valid JSON"):
        read_rows(str(p))


def test_discriminator_hf_checkpoint(world, tmp_path):
    transformers = pytest.importorskip("transformers")
    D = load_model(world["student"], Discriminator).eval()
    assert D.lm_head is None and D.score.weight.std().item() == pytest.approx(0.02, rel=0.5)
    tok = load_tokenizer(world["student"])
    pad = pad_id_for_scoring(tok, stop_token_ids(tok))
    save_discriminator(D, tmp_path / "d", tokenizer=tok, pad_token_id=pad)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "d").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    eot = end_of_turn_id(tok)
    seqs = [render_prompt(tok, [{"role": "user", "content": "red cat"}]) + [7, 8, eot],  # ends with eot
            render_prompt(tok, [{"role": "user", "content": "sun"}]) + [9]]
    T = max(map(len, seqs))
    idx = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    lens = torch.tensor([len(s) for s in seqs])
    with torch.no_grad():
        ours, ref = D(idx, lens), hf(input_ids=idx).logits[:, 0]
    assert torch.allclose(ours, ref, atol=1e-5)
    D2 = load_model(str(tmp_path / "d"), Discriminator)
    assert torch.equal(D2.score.weight, D.score.weight)
    # a BCE head's bias is left out of the HF export: a constant shift, which the export says
    with torch.no_grad():
        D.add_head_bias().score.bias.fill_(0.5)
        shifted = D(idx, lens)
    save_discriminator(D, tmp_path / "bce", tokenizer=tok, pad_token_id=pad)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "bce").eval()
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=idx).logits[:, 0], shifted - 0.5, atol=1e-5)


# -- the loop ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_fsdp_two_processes_equal_one(world, tmp_path):
    """One warmup step (D + SFT) and one GAD step (PPO + KL): in fp32 the same weights on 2 processes
    as on 1; in bf16 (the default on this CPU) the same metrics within 2%."""
    args = base_args(world, warmup_steps=1, d_only_steps=0, max_steps=2, lr=1e-4, d_lr=1e-4)
    run(args, tmp_path / "one")
    run(args, tmp_path / "two", nproc=2)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    keys = ("d_loss", "d_acc", "r_student", "r_teacher", "sft_loss", "policy_loss", "kl", "resp_len_mean")
    for a, b in zip(m1, m2):
        for k in keys:
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    worst = 0.0
    for part in ("generator", "discriminator"):
        w1 = weights(tmp_path / "one" / "ckpt-000002" / part)
        w2 = weights(tmp_path / "two" / "ckpt-000002" / part)
        for k in w1:
            worst = max(worst, (w1[k] - w2[k]).abs().max().item())
    print(f"max |w(1 process) - w(2 processes)| after 2 steps, fp32: {worst:.2e}")
    assert worst < 1e-5
    bf16 = [a for a in args]
    bf16[bf16.index("--dtype") + 1] = "bfloat16"
    run(bf16, tmp_path / "one16")
    run(bf16, tmp_path / "two16", nproc=2)
    b1, b2 = metrics(tmp_path / "one16"), metrics(tmp_path / "two16")
    assert [m["resp_len_mean"] for m in b1] == [m["resp_len_mean"] for m in b2]  # the same samples
    for a, b in zip(b1, b2):
        for k in ("d_loss", "r_student", "r_teacher", "sft_loss", "kl"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=0.02, abs=2e-3), k
    print("bf16 1 vs 2 processes:", [(a.get("d_loss"), b.get("d_loss")) for a, b in zip(b1, b2)])


@pytest.mark.slow
def test_fsdp_generate_unshards_once(world, tmp_path):
    script = tmp_path / "gen_check.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {ROOT!r})
from generate import generate
from loading import load_model
from distributed import shard
dist.init_process_group("gloo")
rank = dist.get_rank()
plain = load_model({world['student']!r}).eval()
sharded = shard(load_model({world['student']!r}), torch.device("cpu"), False, False)
prompts = [[2, 4, 9, 11, 3, 2, 5], [2, 4, 12, 3, 2, 5], [2, 4, 13, 14, 15, 16, 3, 2, 5]][rank:]  # ranks differ
gathers = []
orig = dist.all_gather_single  # FSDP2's weight all-gather, through the public c10d API
def counting(*a, **k):
    gathers.append(1)
    return orig(*a, **k)
dist.all_gather_single = counting
a = generate(sharded, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=[5, 6, 7][rank:], stop_ids=[3])
dist.all_gather_single = orig
b = generate(plain, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=[5, 6, 7][rank:], stop_ids=[3])
assert [s.tokens for s in a] == [s.tokens for s in b], "sharded != plain"
assert len(gathers) == 3, gathers  # 2 blocks + root, once each for the whole rollout
w = sharded.model.layers[0].mlp.up_proj.weight
assert w.to_local().shape[0] < w.shape[0], "not resharded after the rollout"
dist.barrier()
print("ok", rank)
""")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout.count("ok") == 2, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.mark.slow
def test_kill_and_resume_on_other_process_counts(world, tmp_path):
    """A run cut after its step-3 checkpoint and resumed logs the same metrics for the following
    steps as an uninterrupted run, also when it was saved on 2 processes and resumed on 1, or the
    other way round; a torn metrics line and a half-written checkpoint are ignored."""
    kw = dict(warmup_steps=2, d_only_steps=1, save_every=3, eval_prompts=4)
    run(base_args(world, max_steps=6, **kw), tmp_path / "full")
    full = metrics(tmp_path / "full")
    for before, after in ((2, 1), (1, 2)):
        cut = tmp_path / f"cut{before}{after}"
        run(base_args(world, max_steps=3, **kw), cut, nproc=before)
        with open(cut / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": 3, "stage": "gad", "junk": "a step that never got saved"}) + "\n")
            f.write('{"step": 4, "stage": "ga')  # a torn last line: the kill came mid-write
        os.makedirs(cut / "ckpt-000006.tmp")  # a save that crashed halfway
        r = run(base_args(world, max_steps=6, **kw) + ["--resume"], cut, nproc=after)
        assert "resumed from" in r.stdout and "ckpt-000003" in r.stdout
        assert_same_metrics(full, metrics(cut), rel=1e-5, abs_=1e-7)
        wf = weights(tmp_path / "full" / "ckpt-000006" / "generator")
        wc = weights(cut / "ckpt-000006" / "generator")
        assert max((wf[k] - wc[k]).abs().max().item() for k in wf) < 1e-5


@pytest.mark.slow
def test_out_dir_is_never_reused_by_accident(world, tmp_path):
    out = tmp_path / "run"
    args = base_args(world, warmup_steps=1, d_only_steps=1, max_steps=2, save_every=1, eval_prompts=0)
    run(args, out)
    digest = tree_digest(out)
    # a forgotten --resume: refused in one line, nothing touched
    r = run(args, out, check=False)
    assert r.returncode != 0 and "--resume" in r.stderr.strip().splitlines()[-1] and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr and tree_digest(out) == digest
    # a second run while one holds the lock is refused too, also with --resume
    with open(out / ".lock") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run(args + ["--resume"], out, check=False)
    assert r.returncode != 0 and "another run is writing" in r.stderr and tree_digest(out) == digest
    # --overwrite starts afresh: the old checkpoints and metrics are gone, the new run is whole
    (out / "notes.txt").write_text("mine")
    run(base_args(world, warmup_steps=1, d_only_steps=1, max_steps=1, eval_prompts=0) + ["--overwrite"], out)
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt-")) == ["ckpt-000001"]
    assert [m["step"] for m in metrics(out)] == [0] and (out / "notes.txt").read_text() == "mine"
    # --resume over a run whose checkpoints have no resume state: refused, nothing rewritten
    for st in out.glob("ckpt-*/resume/state.json"):
        st.unlink()
    digest = tree_digest(out)
    r = run(args + ["--resume"], out, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "no checkpoint with resume state" in r.stderr.strip().splitlines()[-1] and tree_digest(out) == digest
    # --overwrite keeps what the run did not write (evaluate.py's eval/), and refuses a directory
    # that holds no training run
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    run(base_args(world, warmup_steps=1, d_only_steps=1, max_steps=1, eval_prompts=0) + ["--overwrite"], out)
    assert (out / "eval" / "results.json").read_text() == "{}"
    other = tmp_path / "evals"
    (other / "eval").mkdir(parents=True)
    (other / "eval" / "results.json").write_text("{}")
    digest = tree_digest(other)
    for flag in ("--overwrite", "--resume"):
        r = run(args + [flag], other, check=False)
        assert r.returncode == 1 and "holds no training run" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
        assert tree_digest(other) == digest
    # an out-dir that is a file: one line before anything is loaded
    (tmp_path / "file").write_text("x")
    r = run(args, tmp_path / "file", check=False)
    assert r.returncode != 0 and "not a directory" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_resume_keeps_k_checkpoints_and_falls_back(world, tmp_path):
    """On 2 processes: the newest K checkpoints keep their resume state; a checkpoint that misses one
    process's shard, or has one truncated, is named in one line and the next older one is loaded
    whole (DCP's safetensors reader alone would load the shards present and leave the rest as is)."""
    out = tmp_path / "run"
    args = base_args(world, warmup_steps=1, d_only_steps=1, max_steps=4, save_every=1, eval_prompts=0)
    run(args + ["--keep-resume", "2"], out, nproc=2)
    full = metrics(out)
    have = sorted(d for d in os.listdir(out) if d.startswith("ckpt-"))
    assert have == [f"ckpt-00000{i}" for i in (1, 2, 3, 4)]
    assert [os.path.isdir(out / d / "resume") for d in have] == [False, False, True, True]
    assert all((out / d / "generator" / "config.json").exists() for d in have)  # HF exports stay
    shards = sorted((out / "ckpt-000004" / "resume").glob("shard-*.safetensors"))
    assert len(shards) == 2
    shards[0].unlink()  # rank 0's half of every tensor
    more = base_args(world, warmup_steps=1, d_only_steps=1, max_steps=5, save_every=1, eval_prompts=0) + ["--resume"]
    r = run(more, out, nproc=2)
    assert "ckpt-000004: cannot load it" in r.stderr and "shard-00001" in r.stderr and "is missing" in r.stderr
    assert "resumed from" in r.stdout and "ckpt-000003" in r.stdout
    assert [m["step"] for m in metrics(out)] == [0, 1, 2, 3, 4]
    assert_same_metrics(full[3:4], metrics(out)[3:4])  # step 3 again, from a whole ckpt-000003: the same
    # a truncated shard is caught before DCP reads it, the same way
    shard = next((out / "ckpt-000005" / "resume").glob("shard-00002-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    r = run(more[:more.index("--max-steps") + 1] + ["6"] + more[more.index("--max-steps") + 2:], out)
    assert "ckpt-000005: cannot load it" in r.stderr and "bytes" in r.stderr and "ckpt-000004" in r.stdout


@pytest.mark.slow
def test_a_save_changes_nothing(world, tmp_path):
    """Saving every step, during the D-only steps too, gives bitwise the same run as saving only at
    the end: no phantom optimizer step (torch's get_state_dict would give G's stateless AdamW one), and
    each optimizer's step count is the number of updates it made. --init-from a checkpoint of the D-only
    steps continues exactly."""
    kw = dict(warmup_steps=3, d_only_steps=2, max_steps=4, eval_prompts=0)
    run(base_args(world, **kw), tmp_path / "end")
    run(base_args(world, save_every=1, keep_resume=4, **kw), tmp_path / "every")
    end, every = metrics(tmp_path / "end"), metrics(tmp_path / "every")
    assert_same_metrics(end, every, rel=0, abs_=0)
    for part in ("generator", "discriminator"):
        a, b = (weights(tmp_path / d / "ckpt-000004" / part) for d in ("end", "every"))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    from safetensors import safe_open
    steps = {}
    for f in (tmp_path / "every" / "ckpt-000004" / "resume").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            steps.update({k: st.get_tensor(k).item() for k in st.keys() if k.endswith(".step")})
    assert {v for k, v in steps.items() if k.startswith("optD.")} == {4}  # D trains at every step
    assert {v for k, v in steps.items() if k.startswith("optG.")} == {2}  # G only in steps 2 and 3
    state = json.loads((tmp_path / "every" / "ckpt-000001" / "resume" / "state.json").read_text())
    assert "optG" not in state["saved"] and "optD" in state["saved"]  # G had not stepped: nothing to save
    run(base_args(world, init_from=tmp_path / "every" / "ckpt-000001", **kw), tmp_path / "init")
    assert_same_metrics(end[1:], metrics(tmp_path / "init"), rel=0, abs_=0)
    a, b = (weights(tmp_path / d / "ckpt-000004" / "generator") for d in ("end", "init"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_nan_is_skipped_then_stops_with_last_checkpoint(world, tmp_path):
    out = tmp_path / "nan"
    r = run(base_args(world, warmup_steps=2, d_only_steps=0, max_steps=8, save_every=1, lr=1e30, d_lr=1e30),
            out, check=False)
    assert r.returncode != 0
    assert "gradient norm not finite" in r.stderr and "update skipped" in r.stderr  # skipped, not applied
    msg = [l for l in r.stderr.splitlines() if "loss is" in l]
    assert msg and ("nan" in msg[0] or "inf" in msg[0]) and "Last good checkpoint" in msg[0], r.stderr[-2000:]
    assert "3 steps in a row" in msg[0]
    ckpts = sorted(d for d in os.listdir(out) if d.startswith("ckpt-"))
    assert ckpts and not any(d.endswith(".tmp") for d in ckpts)
    last = msg[0].split("Last good checkpoint: ")[1].strip()
    assert os.path.exists(os.path.join(last, "resume", "state.json"))
    load_model(os.path.join(last, "generator"))  # still loads


@pytest.mark.slow
def test_gad_stage_alone_teaches(world, tmp_path):
    """No SFT warmup: D learns what the teacher's answers have, and G learns it from D's reward."""
    out = tmp_path / "gad"
    r = run(base_args(world, warmup_steps=0, max_steps=40, save_every=0, dtype="auto"), out)
    print(r.stdout[-600:])
    with open(out / "eval-000000.jsonl") as f:
        before = [json.loads(l) for l in f]
    with open(out / "eval-000040.jsonl") as f:
        after = [json.loads(l) for l in f]
    rate_b, rate_a = toy.yes_rate([x["response"] for x in before]), toy.yes_rate([x["response"] for x in after])
    print(f"'yes' rate of greedy answers: {rate_b:.2f} -> {rate_a:.2f}")
    assert rate_a > rate_b + 0.3
    # mean reward of the student's answers, before and after, both under the final D
    D = load_model(str(out / "ckpt-000040" / "discriminator"), Discriminator).eval()

    def mean_score(rows):
        seqs = [x["prompt_ids"] + x["response_ids"] for x in rows]
        idx = torch.tensor([s + [0] * (max(map(len, seqs)) - len(s)) for s in seqs])
        with torch.no_grad():
            return D(idx, torch.tensor([len(s) for s in seqs])).mean().item()

    sb, sa = mean_score(before), mean_score(after)
    print(f"mean final-D reward of the student's answers: {sb:.3f} -> {sa:.3f}")
    assert sa > sb + 0.5
    ms = metrics(out)
    # the reward comes from D's update pass: no separate scoring phase (t_score) any more
    assert all(m["stage"] == "gad" for m in ms) and all(k in ms[0] for k in (
        "d_loss", "d_acc", "r_teacher", "r_student", "reward_std", "zero_adv_frac", "policy_loss", "kl", "entropy",
        "clip_frac", "g_grad_norm", "d_grad_norm", "resp_len_mean", "resp_len_max", "cut_frac", "tok_per_s",
        "t_sample", "t_d", "t_g")) and "t_score" not in ms[0]
    assert all(m["clip_frac"] == 0 for m in ms)  # one update per rollout: the ratio is 1, the clip inert


@pytest.mark.slow
def test_seqkd_lowers_heldout_nll(world, tmp_path):
    out = tmp_path / "seqkd"
    run(base_args(world, mode="seqkd", max_steps=20, lr=3e-3, max_new_tokens=12), out)
    ms = metrics(out)
    assert all(m["stage"] == "seqkd" and "d_loss" not in m for m in ms)
    tok = load_tokenizer(world["student"])
    rows, _ = tokenize_rows(read_rows(world["test"]), tok, end_of_turn_id(tok), 100, 12)

    def nll(path):
        model = load_model(path).eval()
        tot, cnt = 0.0, 0
        for r in rows:
            ids = torch.tensor([r["prompt"] + r["teacher_ids"]])
            with torch.no_grad():
                lp, _ = token_logprobs(model, ids)
            tot -= lp[0, len(r["prompt"]) - 1:].sum().item()
            cnt += len(r["teacher_ids"])
        return tot / cnt

    before, after = nll(world["student"]), nll(str(out / "ckpt-000020" / "generator"))
    print(f"held-out teacher NLL: {before:.3f} -> {after:.3f}")
    assert after < before - 0.3


@pytest.mark.slow
def test_init_from_continues_like_one_run(world, tmp_path):
    """Warmup in one run, GAD from its checkpoint in another: the GAD steps' metrics equal the
    single run's (optimizer states, data position and step count carry over)."""
    kw = dict(warmup_steps=2, d_only_steps=1, eval_prompts=0)
    run(base_args(world, max_steps=4, **kw), tmp_path / "one")
    run(base_args(world, max_steps=2, **kw), tmp_path / "warm")
    run(base_args(world, max_steps=4, init_from=tmp_path / "warm" / "ckpt-000002", **kw), tmp_path / "gad")
    one, gad = metrics(tmp_path / "one"), metrics(tmp_path / "gad")
    assert [m["step"] for m in gad] == [2, 3] and gad[0]["stage"] == "gad"
    assert_same_metrics(one[2:], gad)
    # a SeqKD checkpoint has no discriminator: a GAD run starts from it with a fresh D (--disc-init)
    run(base_args(world, mode="seqkd", max_steps=1, eval_prompts=0), tmp_path / "sk")
    r = run(base_args(world, max_steps=2, warmup_steps=1, d_only_steps=0, eval_prompts=0,
                      init_from=tmp_path / "sk" / "ckpt-000001", disc_init=world["student"]), tmp_path / "sk_gad")
    assert "initialised from" in r.stdout and [m["stage"] for m in metrics(tmp_path / "sk_gad")] == ["gad"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--d-loss", "bce"], ["--freeze-d-after-warmup"]])
def test_ablation_flags_under_two_processes(world, tmp_path, flags):
    out = tmp_path / "abl"
    run(base_args(world, warmup_steps=1, d_only_steps=0, max_steps=3, eval_prompts=0, save_every=1) + flags, out,
        nproc=2)
    ms = metrics(out)
    assert [m["stage"] for m in ms] == ["warmup", "gad", "gad"] and all(math.isfinite(m["d_loss"]) for m in ms)
    d1, d3 = (weights(out / f"ckpt-00000{i}" / "discriminator") for i in (1, 3))
    if "--freeze-d-after-warmup" in flags:  # D neither steps nor computes a gradient in the GAD stage
        assert "d_grad_norm" in ms[0] and all("d_grad_norm" not in m for m in ms[1:])
        assert all(torch.equal(d1[k], d3[k]) for k in d1)
    else:  # BCE trains D, with a head bias kept in the resume state and left out of the HF export
        assert not all(torch.equal(d1[k], d3[k]) for k in d1) and "score.bias" not in d3
        from safetensors import safe_open
        keys = set()
        for f in (out / "ckpt-000003" / "resume").glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                keys |= set(st.keys())
        assert "D.score.bias" in keys


@pytest.mark.slow
def test_d_head_lr_is_the_score_heads_own(world, tmp_path):
    # D's body at a rate of 1e-20: after one D-only step it is still the student's, and the head moved by
    # about --d-head-lr (Adam's first step is ~lr per weight): 1e-2 against 1e-20 from the same start
    heads = {}
    for head_lr in (1e-2, 1e-20):
        out = tmp_path / f"head{head_lr}"
        run(base_args(world, warmup_steps=1, d_only_steps=1, max_steps=1, eval_prompts=0, d_lr=1e-20,
                      d_head_lr=head_lr), out)
        d = weights(out / "ckpt-000001" / "discriminator")
        body = {k: v for k, v in weights(world["student"]).items() if k in d}
        assert len(body) == len(d) - 1 and max((d[k] - v).abs().max().item() for k, v in body.items()) < 1e-15
        heads[head_lr] = d["score.weight"]
    step = (heads[1e-2] - heads[1e-20]).abs()
    assert 0.5e-2 < step.max().item() < 1.5e-2 and step.mean().item() > 1e-3, step


@pytest.mark.slow
def test_ppo_minibatches_make_the_clip_work(world, tmp_path):
    out = tmp_path / "ppo"
    run(base_args(world, warmup_steps=0, max_steps=2, eval_prompts=0, lr=3e-3, ppo_minibatches=2, ppo_epochs=2), out)
    ms = metrics(out)
    assert all(m["clip_frac"] > 0 for m in ms), [m["clip_frac"] for m in ms]


def test_bad_flags_and_data(world, tmp_path, monkeypatch, capsys):
    """Bad flags stop at parse time (argparse, exit 2), bad inputs in load_inputs, before the process group
    starts or anything is written; each is one line naming the flag, file or line. In this process."""
    def inputs(**kw):
        return train_gad.load_inputs(train_gad.parse_args(base_args(world, **kw) + ["--out-dir", str(tmp_path / "o")]), 1)

    for kw, error, says in ((dict(train_data=tmp_path / "missing.jsonl"), DataError, "missing.jsonl: no such file"),
                            (dict(eval_data=tmp_path / "missing.jsonl"), DataError, "missing.jsonl: no such file"),
                            (dict(student=tmp_path / "nope"), LoadError, "nope: no such file")):
        with pytest.raises(error, match=says):
            inputs(**kw)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "a", "messages": [{"role": "user", "content": "hi"}], "teacher": "\xff"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: not UTF-8"):
        inputs(train_data=bad)
    bad.write_text(json.dumps({"id": "a", "messages": [{"role": "robot", "content": "hi"}], "teacher": "x"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: message 1 needs a role"):
        inputs(train_data=bad)
    other = toy.make_student(tmp_path / "other")  # D must read G's tokens
    tok = load_tokenizer(other)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    with pytest.raises(train_gad.Stop, match="tokenizer differs from the student's"):
        inputs(disc_init=other)
    assert not (tmp_path / "o").exists()  # nothing was written for a bad input
    for flag, value in (("--prompts-per-step", "0"), ("--max-new-tokens", "-5"), ("--n-samples", "0"),
                        ("--temperature", "0"), ("--lr", "-1e-6"), ("--d-lr", "nan"), ("--top-p", "1.5"),
                        ("--token-budget", "many")):
        with pytest.raises(SystemExit) as e:
            train_gad.parse_args(base_args(world) + [flag, value])
        assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err.strip().splitlines()[-1], flag
    for argv, says, world_size in ((base_args(world, n_samples=1), "--n-samples 1", "1"),
                                   (base_args(world, prompts_per_step=3), "--prompts-per-step 3 must be divisible by the "
                                    "2 processes", "2")):
        monkeypatch.setenv("WORLD_SIZE", world_size)
        with pytest.raises(SystemExit) as e:
            train_gad.parse_args(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err
    # the command line: the same errors as one last line on stderr, exit 1, no traceback
    monkeypatch.delenv("WORLD_SIZE")
    r = run(base_args(world, train_data=tmp_path / "missing.jsonl"), tmp_path / "o", check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == f"train_gad.py: {tmp_path}/missing.jsonl: no such file"
    assert "Traceback" not in r.stderr


def test_end_to_end_tiny(world, tmp_path):
    """The whole loop once, on one process: a D-only step, a warmup step and a GAD step, with the eval
    before and after, a checkpoint and the chart."""
    out = tmp_path / "run"
    r = run(base_args(world, warmup_steps=2, d_only_steps=1, max_steps=3, eval_prompts=4), out)
    ms = metrics(out)
    assert [m["stage"] for m in ms] == ["d_only", "warmup", "gad"]
    assert {"d_loss", "d_acc", "reward_std", "resp_len_mean", "cut_frac", "zero_adv_frac"} <= set(ms[0])
    assert "sft_loss" in ms[1] and {"g_loss", "policy_loss", "kl", "clip_frac", "entropy"} <= set(ms[2])
    assert all(m["peak_mem_gib"] > 0 and m["tok_per_s"] > 0 for m in ms)
    assert (out / "eval-000000.jsonl").exists() and (out / "eval-000003.jsonl").exists()
    assert (out / "ckpt-000003" / "generator" / "model.safetensors").exists() and (out / "metrics.png").exists()
    assert "mean final-D score of the student's answers" in r.stdout


@pytest.mark.slow
def test_ctrl_c_and_full_disk_end_in_one_line(world, tmp_path):
    import signal
    import time
    out = tmp_path / "int"
    args = base_args(world, warmup_steps=0, max_steps=1000, eval_prompts=0)
    p = subprocess.Popen([sys.executable, "train_gad.py"] + args + ["--out-dir", str(out)], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if the runner ignores it
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "interrupted" in stderr.strip().splitlines()[-1] and "--resume" in stderr
    # a full disk while a checkpoint is written: one line naming the file; the older checkpoint stays whole
    out = tmp_path / "full"
    inject = ("import errno, runpy, sys, checkpoint\n"
              "save, calls = checkpoint.save, []\n"
              "def full(*a, **k):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 2:\n"
              "        raise OSError(errno.ENOSPC, 'No space left on device', a[0] + '/ckpt-000002.tmp')\n"
              "    return save(*a, **k)\n"
              "checkpoint.save = full\n"
              "sys.argv = ['train_gad.py'] + sys.argv[1:]\n"
              "runpy.run_path('train_gad.py', run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", inject] + base_args(world, warmup_steps=1, d_only_steps=1, max_steps=3,
                       save_every=1, eval_prompts=0) + ["--out-dir", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"train_gad.py: {out}/ckpt-000002.tmp: No space left on device"
    assert (out / "ckpt-000001" / "resume" / "state.json").exists()


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues_exactly(world, tmp_path):
    """A scheduler's SIGTERM to torchrun on 2 processes: the step in progress ends on both, a checkpoint
    is written, the workers exit 143 with one line, and --resume continues as the uninterrupted run."""
    import signal
    import time
    kw = dict(warmup_steps=2, d_only_steps=1, max_steps=8, eval_prompts=0)
    run(base_args(world, **kw), tmp_path / "full", nproc=2)
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gad.py"]
    p = subprocess.Popen(cmd + base_args(world, **kw) + ["--out-dir", str(out)], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    line = [l for l in stderr.splitlines() if l.startswith("train_gad.py: ")]
    assert len(line) == 1 and "terminated (SIGTERM) after step" in line[0] and "--resume" in line[0], stderr[-3000:]
    assert "exitcode  : 143" in stderr or "exit code 143" in stderr or p.returncode != 0, stderr[-2000:]
    saved = sorted(d for d in os.listdir(out) if d.startswith("ckpt-"))
    assert len(saved) == 1 and int(saved[0][5:]) == len(metrics(out)) < 8, (saved, len(metrics(out)))
    run(base_args(world, **kw) + ["--resume"], out, nproc=2)
    assert_same_metrics(metrics(tmp_path / "full"), metrics(out))
    a, b = (weights(d / "ckpt-000008" / "generator") for d in (tmp_path / "full", out))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_resume_refuses_a_changed_run(world, tmp_path, capsys):
    """--resume compares the flags that define a run with the saved ones and names the one changed; the
    operational ones may change. A flag that changes D's shape for --init-from is named too."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    args = base_args(world, warmup_steps=1, d_only_steps=1, max_steps=2) + ["--out-dir", str(out)]
    saved = vars(train_gad.parse_args(args))
    (out / "ckpt-000001" / "resume").mkdir(parents=True)
    (out / "ckpt-000001" / "resume" / "state.json").write_text(json.dumps(
        {"step": 1, "epoch": 0, "cursor": 8, "world": 1, "args": saved, "saved": ["G", "D", "optD"], "files": {}}))
    for flag, value, says in (("--n-samples", "4", "--n-samples is 4 here, but 8 in the run"),
                              ("--max-new-tokens", "16", "--max-new-tokens is 16 here, but 8"),
                              ("--mode", "seqkd", "--mode is seqkd here, but gad"),
                              ("--train-data", world["test"], "--train-data is"),
                              ("--d-loss", "bce", "--d-loss is bce here, but bt"),
                              ("--lr", "2e-3", "--lr is 0.002 here, but 0.001")):
        with pytest.raises(train_gad.Stop, match=says):
            train_gad.load_inputs(train_gad.parse_args(args + ["--resume", flag, value]), 1)
    for flag, value in (("--max-steps", "9"), ("--save-every", "1"), ("--token-budget", "128"), ("--eval-every", "1")):
        train_gad.load_inputs(train_gad.parse_args(args + ["--resume", flag, value]), 1)  # operational: accepted
    with pytest.raises(SystemExit):
        train_gad.parse_args(["--help"])
    helps = " ".join(capsys.readouterr().out.split())
    assert "the flags that define it unchanged: --mode, --student," in helps and "--n-samples" in helps
    with pytest.raises(train_gad.Stop, match="--d-loss bce: the discriminator of --init-from"):
        train_gad.load_inputs(train_gad.parse_args(base_args(world, d_loss="bce") + [
            "--out-dir", str(tmp_path / "new"), "--init-from", str(out / "ckpt-000001")]), 1)


def test_blank_teacher_answers_and_a_failing_chat_template(world, tmp_path, capsys):
    rows = [json.loads(l) for l in open(world["train"])][:4]
    rows[1]["teacher"], rows[2]["teacher"] = "", "   "
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = train_gad.parse_args(base_args(world, train_data=data) + ["--out-dir", str(tmp_path / "o")])
    _, got, _, _, _ = train_gad.load_inputs(args, 1)
    assert [r["id"] for r in got] == [rows[0]["id"], rows[3]["id"]]
    assert "2 rows left out (2 with a blank teacher answer)" in capsys.readouterr().err
    hostile = tmp_path / "hostile"
    import shutil
    shutil.copytree(world["student"], hostile)
    tok = load_tokenizer(str(hostile))
    tok.chat_template = "{{ raise_exception('only one user turn, please') }}"
    tok.save_pretrained(hostile)
    r = run(base_args(world, student=hostile, train_data=data), tmp_path / "o", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"row {rows[0]['id']}: the chat template" in r.stderr.strip().splitlines()[-1]
    assert "only one user turn, please" in r.stderr.strip().splitlines()[-1]


def test_first_gad_step_starts_at_the_reference_in_bf16(world, tmp_path):
    """At the first GAD step G is the reference and the policy that sampled: the KL must be 0 and the PPO
    ratio 1. In bf16 on CPU the no-grad forwards (reference, old log-probs) and the training forward must
    compute attention alike for that to hold."""
    out = tmp_path / "bf16"
    run(base_args(world, dtype="bfloat16", d_only_steps=1, warmup_steps=2, max_steps=3, eval_prompts=0), out)
    first = metrics(out)[2]
    assert first["stage"] == "gad"
    assert first["kl"] == 0 and first["clip_frac"] == 0, first


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_release_freed_memory_hands_the_kept_heap_back():
    # keep_freed_memory lets the heap grow over a run; the demo's final save came on top of 9 GiB per process and
    # was killed on a 24 GB machine. In a subprocess: mallopt changes the allocator of the whole process
    code = """if True:
        import torch, distributed
        def rss():
            return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) / 1024
        distributed.keep_freed_memory()
        keep = []
        for i in range(24):  # growing shapes, a few kept alive between them, as a run's steps leave the heap
            t = torch.ones(256 * (8 + i), 1024)
            if i % 4 == 0:
                keep.append(t[:1].clone())
            del t
        before = rss()
        distributed.release_freed_memory()
        print(before, rss())"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    before, after = map(float, out.stdout.split())
    assert before - after > 100, (before, after)  # MB: the freed tensors' pages went back to the kernel
