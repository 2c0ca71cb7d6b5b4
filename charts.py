"""
Charts as PNG files: the training curves of a train_gad.py run (train_gad.py draws them at the end,
evaluate.py --plot-metrics on demand), and the helpers evaluate.py's charts use.

    from charts import plot_metrics
    plot_metrics("out/demo/metrics.jsonl", "out/demo/metrics.png")

matplotlib is optional: without it nothing is drawn and the caller is told so.
"""

import io
import math

from data import DataError, read_jsonl, write_atomic


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def save_png(plt, fig, path):
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# panel title -> train_gad.py metrics drawn in it
TRAIN_PANELS = [("discriminator accuracy", ["d_acc"]), ("discriminator loss", ["d_loss"]),
                ("rewards", ["r_teacher", "r_student"]), ("response length (tokens)", ["resp_len_mean", "resp_len_max"]),
                ("KL to reference (k3)", ["kl"]), ("generator loss", ["sft_loss", "policy_loss"]),
                ("samples that loop, that are cut", ["loop_frac", "cut_frac"])]


def plot_metrics(path, out):
    """Training curves from train_gad.py's metrics.jsonl (whose torn last line, from a run killed
    mid-write, is skipped); absent fields leave a panel out. False when matplotlib is missing."""
    rows = []
    for where, rec in read_jsonl(path, torn_ok=True):
        if not isinstance(rec, dict):
            raise DataError(f"--plot-metrics: {where}: a JSON object is expected")
        rows.append(rec)
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    panels = [(t, [k for k in ks if any(num(r.get(k)) for r in rows)]) for t, ks in TRAIN_PANELS]
    if not (panels := [(t, ks) for t, ks in panels if ks]):
        raise DataError(f"--plot-metrics: {path}: none of {', '.join(k for _, ks in TRAIN_PANELS for k in ks)} found")
    if (plt := pyplot()) is None:
        print(f"note: matplotlib is not installed, {out} not written")
        return False
    step = lambda i, r: r["step"] if num(r.get("step")) else i
    # where the stage changes (warmup -> gad), drawn in every panel
    bounds = [(step(i, r), r["stage"]) for i, r in enumerate(rows)
              if i > 0 and r.get("stage") is not None and r.get("stage") != rows[i - 1].get("stage")]
    cols, nrows = min(3, len(panels)), math.ceil(len(panels) / 3)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.5 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, ks) in zip(axes.flat, panels):
        for k in ks:
            ax.plot(*zip(*[(step(i, r), r[k]) for i, r in enumerate(rows) if num(r.get(k))]), label=k, lw=1)
        for j, (x, stage) in enumerate(bounds):  # labels one under the other: stages can be a step apart
            ax.axvline(x, color="gray", ls=":", lw=0.8)
            ax.text(x, 0.98 - 0.07 * j, f" {stage}", fontsize=7, va="top", color="gray",
                    transform=ax.get_xaxis_transform())
        ax.set(title=title, xlabel="step")
        if len(ks) > 1:
            ax.legend(fontsize=7)
    save_png(plt, fig, out)
    print(f"wrote {out}")
    return True
