"""discriminator.py and train_gad.py: the losses, EOS symmetry, D as an HF checkpoint, FSDP on 2
processes against 1, kill-and-resume, NaN stops, and that GAD and SeqKD actually teach."""
import json
import os
import subprocess
import sys

import pytest
import torch

import toy
from discriminator import Discriminator, bt_loss, d_accuracy, pad_id_for_scoring
from model import Transformer, end_of_turn_id, load_tokenizer, render_prompt, stop_token_ids, token_logprobs
from train_gad import group_advantages, k3_kl, load_rows, ppo_loss, student_response

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return dict(student=toy.make_student(d / "student"), train=toy.make_data(d / "train.jsonl", 64),
                test=toy.make_data(d / "test.jsonl", 16, seed=1), dir=d)


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
    a = dict(student=w["student"], train_data=w["train"], eval_data=w["test"], prompts_per_step=8,
             max_new_tokens=8, lr=1e-3, d_lr=1e-3, eval_markers="yes", eval_prompts=16, token_budget=64)
    a.update(kw)
    return [x for k, v in a.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def weights(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


# -- units ------------------------------------------------------------------------------------

def test_bt_loss_and_accuracy():
    rt, rs = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    expect = -(torch.log(torch.sigmoid(torch.tensor(1.0))) + torch.log(torch.tensor(0.5)) +
               torch.log(torch.sigmoid(torch.tensor(-2.0)))) / 3
    assert torch.allclose(bt_loss(rt, rs), expect)
    assert d_accuracy(rt, rs).item() == pytest.approx(1 / 3)  # a tie is not a win


def test_group_advantages():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    a = group_advantages(r)
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std(unbiased=True)
    assert torch.allclose(a[0], (r[0] - 2.5) / (std + 1e-6))
    assert torch.equal(a[1], torch.zeros(4))  # identical rewards: zeros, never NaN
    assert torch.isfinite(group_advantages(torch.tensor([[7.0]]))).all()


def test_k3_kl():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5, -30.0]), torch.tensor([-1.0, -1.0, -3.0, 0.0])
    d = ref - logp
    assert torch.allclose(k3_kl(logp, ref), (d.exp() - d - 1).clamp(-10, 10))
    assert k3_kl(logp, ref)[0] == 0 and (k3_kl(logp, ref) >= 0).all() and k3_kl(logp, ref)[3] == 10


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


def test_eos_symmetry(world, tmp_path):
    tok = load_tokenizer(world["student"])
    eot = end_of_turn_id(tok)
    text = "yes yes red cat"
    p = tmp_path / "one.jsonl"
    msgs = [{"role": "user", "content": "red dog"}]
    p.write_text(json.dumps({"id": "a", "messages": msgs, "teacher": text}) + "\n")
    rows, _ = load_rows(str(p), tok, eot, 100, 50)
    teacher_in = rows[0]["prompt"] + rows[0]["teacher_ids"]
    sample = tok(text, add_special_tokens=False)["input_ids"] + [eot]  # a student sample that stopped
    assert teacher_in == render_prompt(tok, msgs) + student_response(sample, True, eot)
    # whichever stop token ended the sample, D sees the same end-of-turn token
    assert student_response(sample[:-1] + [tok.eos_token_id], True, eot)[-1] == eot
    # a cut teacher answer has no end-of-turn, like a cut sample
    rows, _ = load_rows(str(p), tok, eot, 100, 3)
    assert rows[0]["teacher_ids"] == sample[:3]
    # malformed input names the file and line
    p.write_text(json.dumps({"id": "a", "messages": msgs, "teacher": "x"}) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"one.jsonl:2: malformed row"):
        load_rows(str(p), tok, eot, 100, 50)


def test_discriminator_hf_checkpoint(world, tmp_path):
    transformers = pytest.importorskip("transformers")
    D = Discriminator.from_pretrained(world["student"]).eval()
    assert D.lm_head is None and D.score.weight.std().item() == pytest.approx(0.02, rel=0.5)
    tok = load_tokenizer(world["student"])
    pad = pad_id_for_scoring(tok, stop_token_ids(tok))
    D.save_pretrained(tmp_path / "d", tokenizer=tok, pad_token_id=pad)
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
    D2 = Discriminator.from_pretrained(str(tmp_path / "d"))
    assert torch.equal(D2.score.weight, D.score.weight)


# -- the loop ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_fsdp_two_processes_equal_one(world, tmp_path):
    """One warmup step (D + SFT) and one GAD step (PPO + KL): the same weights on 2 processes as on 1."""
    args = base_args(world, warmup_steps=1, d_only_steps=0, max_steps=2, lr=1e-4, d_lr=1e-4)
    run(args, tmp_path / "one")
    run(args, tmp_path / "two", nproc=2)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for a, b in zip(m1, m2):
        for k in ("d_loss", "d_acc", "r_student", "r_teacher", "sft_loss", "policy_loss", "kl", "resp_len_mean"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    worst = 0.0
    for part in ("generator", "discriminator"):
        w1 = weights(tmp_path / "one" / "ckpt-000002" / part)
        w2 = weights(tmp_path / "two" / "ckpt-000002" / part)
        for k in w1:
            worst = max(worst, (w1[k] - w2[k]).abs().max().item())
    print(f"max |w(1 process) - w(2 processes)| after 2 steps: {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.slow
def test_fsdp_generate_unshards_once(world, tmp_path):
    script = tmp_path / "gen_check.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {ROOT!r})
from model import Transformer, generate
from train_gad import shard
dist.init_process_group("gloo")
rank = dist.get_rank()
plain = Transformer.from_pretrained({world['student']!r}).eval()
sharded = shard(Transformer.from_pretrained({world['student']!r}), torch.device("cpu"), False, False)
prompts = [[2, 4, 9, 11, 3, 2, 5], [2, 4, 12, 3, 2, 5], [2, 4, 13, 14, 15, 16, 3, 2, 5]][rank:]  # ranks differ
calls = []
import torch.distributed.fsdp._fully_shard._fsdp_param_group as pg
orig = pg.FSDPParamGroup.unshard
def counting(self, *a, **k):
    if not self.is_unsharded: calls.append(1)
    return orig(self, *a, **k)
pg.FSDPParamGroup.unshard = counting
a = generate(sharded, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=[5, 6, 7][rank:], stop_ids=[3])
pg.FSDPParamGroup.unshard = orig
b = generate(plain, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=[5, 6, 7][rank:], stop_ids=[3])
assert [s.tokens for s in a] == [s.tokens for s in b], "sharded != plain"
assert len(calls) == 3, calls  # 2 blocks + root, once each for the whole rollout
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
def test_kill_and_resume(world, tmp_path):
    """A run resumed from its step-3 checkpoint logs the same metrics for the following steps."""
    args = base_args(world, warmup_steps=2, d_only_steps=1, max_steps=6, save_every=3, eval_prompts=4)
    run(args, tmp_path / "full")
    # the interrupted run: stop after step 3 (a kill after the save), then --resume to the end
    run(base_args(world, warmup_steps=2, d_only_steps=1, max_steps=3, save_every=3, eval_prompts=4),
        tmp_path / "cut")
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "stage": "gad", "junk": "a step that never got saved"}) + "\n")
    os.makedirs(tmp_path / "cut" / "ckpt-000006.tmp")  # a save that crashed halfway
    run(args + ["--resume"], tmp_path / "cut")
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [m["step"] for m in cut] == list(range(6))
    timing = ("t_", "tok_per_s")
    for a, b in zip(full, cut):
        for k in a:
            if isinstance(a[k], str):
                assert a[k] == b[k], (a["step"], k)
            elif not k.startswith(timing):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)
    wf = weights(tmp_path / "full" / "ckpt-000006" / "generator")
    wc = weights(tmp_path / "cut" / "ckpt-000006" / "generator")
    assert all(torch.equal(wf[k], wc[k]) for k in wf)


@pytest.mark.slow
def test_nan_stops_and_keeps_last_checkpoint(world, tmp_path):
    out = tmp_path / "nan"
    r = run(base_args(world, warmup_steps=2, d_only_steps=0, max_steps=6, save_every=1, lr=1e30, d_lr=1e30),
            out, check=False)
    assert r.returncode != 0
    msg = [l for l in r.stderr.splitlines() if "loss is" in l]
    assert msg and ("nan" in msg[0] or "inf" in msg[0]) and "Last good checkpoint" in msg[0], r.stderr[-2000:]
    ckpts = sorted(d for d in os.listdir(out) if d.startswith("ckpt-"))
    assert ckpts and not any(d.endswith(".tmp") for d in ckpts)
    last = msg[0].split("Last good checkpoint: ")[1].strip()
    assert os.path.exists(os.path.join(last, "resume", "state.json"))
    Transformer.from_pretrained(os.path.join(last, "generator"))  # still loads


@pytest.mark.slow
def test_gad_stage_alone_teaches(world, tmp_path):
    """No SFT warmup: D learns what the teacher's answers have, and G learns it from D's reward."""
    out = tmp_path / "gad"
    r = run(base_args(world, warmup_steps=0, max_steps=40, save_every=0), out)
    print(r.stdout[-600:])
    with open(out / "eval-000000.jsonl") as f:
        before = [json.loads(l) for l in f]
    with open(out / "eval-000040.jsonl") as f:
        after = [json.loads(l) for l in f]
    rate_b, rate_a = toy.yes_rate([x["response"] for x in before]), toy.yes_rate([x["response"] for x in after])
    print(f"'yes' rate of greedy answers: {rate_b:.2f} -> {rate_a:.2f}")
    assert rate_a > rate_b + 0.3
    # mean reward of the student's answers, before and after, both under the final D
    D = Discriminator.from_pretrained(str(out / "ckpt-000040" / "discriminator")).eval()

    def mean_score(rows):
        seqs = [x["prompt_ids"] + x["response_ids"] for x in rows]
        idx = torch.tensor([s + [0] * (max(map(len, seqs)) - len(s)) for s in seqs])
        with torch.no_grad():
            return D(idx, torch.tensor([len(s) for s in seqs])).mean().item()

    sb, sa = mean_score(before), mean_score(after)
    print(f"mean final-D reward of the student's answers: {sb:.3f} -> {sa:.3f}")
    assert sa > sb + 0.5
    ms = metrics(out)
    assert all(m["stage"] == "gad" for m in ms) and all(k in ms[0] for k in (
        "d_loss", "d_acc", "r_teacher", "r_student", "reward_std", "zero_adv_frac", "policy_loss", "kl", "entropy",
        "clip_frac", "g_grad_norm", "d_grad_norm", "resp_len_mean", "resp_len_max", "cut_frac", "tok_per_s",
        "t_sample", "t_score", "t_d", "t_g"))


@pytest.mark.slow
def test_seqkd_lowers_heldout_nll(world, tmp_path):
    out = tmp_path / "seqkd"
    run(base_args(world, mode="seqkd", max_steps=20, lr=3e-3, max_new_tokens=12), out)
    ms = metrics(out)
    assert all(m["stage"] == "seqkd" and "d_loss" not in m for m in ms)
    tok = load_tokenizer(world["student"])
    rows, _ = load_rows(world["test"], tok, end_of_turn_id(tok), 100, 12)

    def nll(path):
        model = Transformer.from_pretrained(path).eval()
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


def test_bad_flags_and_data(world, tmp_path):
    r = run(base_args(world, train_data=tmp_path / "missing.jsonl"), tmp_path / "o", check=False)
    assert r.returncode != 0 and "missing.jsonl: no such file" in r.stderr.strip().splitlines()[-1]
    r = run(base_args(world, prompts_per_step=3), tmp_path / "o", nproc=2, check=False)
    assert r.returncode != 0 and "--prompts-per-step 3 must be divisible by the 2 processes" in r.stderr
    r = run(base_args(world, student=tmp_path / "nope"), tmp_path / "o", check=False)
    assert r.returncode != 0 and "nope: no such file" in r.stderr.strip().splitlines()[-1]
