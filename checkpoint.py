"""
The run directory of train_gad.py: its lock, its checkpoints, and resuming from them.

    out/demo/
      .lock               held by the run writing here; a second run is refused
      metrics.jsonl       one record per step
      eval-000000.jsonl   greedy held-out answers, before and after training
      ckpt-000024/
        generator/        HF causal-LM checkpoint (transformers loads it; evaluate.py scores it)
        discriminator/    HF sequence-classification checkpoint
        resume/           torch.distributed.checkpoint in safetensors: each rank's shards of G, D,
                          the reference and both AdamW states; state.json: step, data position, args

A run saved on N processes resumes on M: DCP reshards on load. Its safetensors storage keeps the
metadata in the safetensors headers (JSON), so nothing is ever unpickled; DCP's default file-system
format would keep it as a pickle. Non-tensor state (step, data position) goes to state.json.
Only the newest --keep-resume checkpoints keep resume/; older ones keep their HF exports.

    import checkpoint
    checkpoint.save("out/demo", step, models, opts, state, tok, d_pad_id, keep_resume=2)
    state, ck = checkpoint.restore(checkpoint.resumable("out/demo"), models, opts, make_reference, log)
    kept = checkpoint.truncate_metrics("out/demo/metrics.jsonl", state["step"])  # records before the step

models = {"G": G, "D": D, "R": ref} and opts = {"G": g_opt, "D": d_opt}; None where a run has none.
"""

import json
import os
import re
import shutil
import sys

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from data import read_jsonl
from discriminator import save_discriminator
from distributed import release_freed_memory
from loading import save_model

try:
    import fcntl
except ImportError:  # no advisory locks on Windows: run one writer at a time yourself
    fcntl = None

# What a training run writes in its out-dir, and all that --overwrite ever deletes. evaluate.py's
# eval/ is not among them: it holds another program's results and caches.
RUN_ENTRY = re.compile(r"ckpt-\d{6}(\.tmp)?|metrics\.jsonl(\.tmp)?|metrics\.png|eval-\d{6}\.jsonl")


class RunDirError(Exception):
    """The out-dir cannot be used as asked; the message is one line."""


def run_entries(out_dir):
    """The entries of out_dir that a training run wrote there."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(f for f in os.listdir(out_dir) if RUN_ENTRY.fullmatch(f))


def check_out_dir(out_dir, resume, overwrite):
    """Before anything is loaded or written: the out-dir must be a directory we can create; a fresh
    run never writes into another run's files (a forgotten --resume would mix two runs); --resume
    never starts afresh over a run it cannot continue; --overwrite deletes only a training run."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunDirError(f"--out-dir {out_dir}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent if not os.path.isdir(out_dir) else out_dir, os.W_OK):
        raise RunDirError(f"--out-dir {out_dir}: cannot be created or written ({parent} is not a writable directory)")
    used = os.path.isdir(out_dir) and [f for f in os.listdir(out_dir) if f != ".lock"]
    if not used:
        return
    ours = run_entries(out_dir)
    if not ours and (resume or overwrite):
        raise RunDirError(f"--out-dir {out_dir}: holds no training run ({len(used)} other entries, such as "
                          f"{sorted(used)[0]!r}), so there is nothing to {'continue' if resume else 'overwrite'}; "
                          "choose another --out-dir")
    if resume and not resumable(out_dir):
        raise RunDirError(f"--out-dir {out_dir}: holds a run ({len(ours)} entries) but no checkpoint with resume "
                          "state to continue from; start afresh with --overwrite, or choose another --out-dir")
    if not resume and not overwrite:
        raise RunDirError(f"--out-dir {out_dir}: holds an earlier run ({len(used)} entries); continue it with "
                          "--resume, start afresh with --overwrite (deletes its checkpoints and metrics), or "
                          "choose another --out-dir")


_held = []  # the open lock files: a lock lasts as long as its file stays open


def lock_out_dir(out_dir, overwrite):
    """Rank 0: create the out-dir and hold its lock for the life of the process. With --overwrite,
    the earlier run's checkpoints and metrics go, under the lock."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".lock"), "w")
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise RunDirError(f"--out-dir {out_dir}: another run is writing there (it holds {out_dir}/.lock)") from None
    if overwrite:
        for name in run_entries(out_dir):
            p = os.path.join(out_dir, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    _held.append(f)


def _state(models, opts, keys):
    """The DCP state dict of the named models and optimizers (sharded DTensors, no copies), and the
    names left out of it because they alias another entry (tied embeddings): safetensors stores a
    tensor once. An optimizer must have state already: get_state_dict gives a stateless one state
    by taking a zero step, which would count as one of its updates."""
    sd, aliases = {}, {}
    for k in keys:
        if k.startswith("opt"):
            _, osd = get_state_dict(models[k[3:]], opts[k[3:]])
            part = osd["state"]  # param_groups (lr, betas, ...) come from the flags, never from the file
        else:
            part = get_model_state_dict(models[k])
        first = {}
        for name, v in list(part.items()):
            t = max(v.values(), key=lambda x: x.numel()) if isinstance(v, dict) else v  # an AdamW state: its exp_avg
            t = t.to_local() if hasattr(t, "to_local") else t
            where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else name
            if where in first:
                aliases[(k, name)] = first[where]
                del part[name]
            else:
                first[where] = name
        sd[k] = part
    return sd, aliases


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out_dir, step, models, opts, state, tokenizer, d_pad_id, keep_resume):
    """Write ckpt-<step> atomically: everything goes to ckpt-<step>.tmp, every file and directory is
    fsynced, then one rename. A crash leaves the older checkpoints and a .tmp dir that resume ignores.
    Rank 0 writes the HF exports of G and D (D's with d_pad_id, see save_discriminator)."""
    release_freed_memory()  # the full-state buffers below come on top of the heap the run has grown
    rank = dist.get_rank()
    final = os.path.join(out_dir, f"ckpt-{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "resume"))
    dist.barrier()
    for key, kind in (("G", "generator"), ("D", "discriminator")):
        if models.get(key) is not None:
            full = get_model_state_dict(models[key], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0 and key == "G":
                save_model(models[key], os.path.join(tmp, kind), tokenizer, state_dict=full)
            elif rank == 0:
                save_discriminator(models[key], os.path.join(tmp, kind), tokenizer, state_dict=full, pad_token_id=d_pad_id)
            del full
    # an optimizer that has not stepped yet (G in the D-only steps) has nothing to save, and stays so
    keys = [k for k, m in models.items() if m is not None] + [f"opt{k}" for k, o in opts.items() if o is not None and o.state]
    # save_distributed: every rank writes its own shard file (the default would have all ranks
    # write the same file name); DCP fsyncs the files it writes
    dcp.save(_state(models, opts, keys)[0], storage_writer=HuggingFaceStorageWriter(os.path.join(tmp, "resume"),
                                                                                 save_distributed=True))
    dist.barrier()
    if rank == 0:
        resume = os.path.join(tmp, "resume")
        # every rank's files with their sizes: a load checks them all before it reads one (DCP's
        # safetensors reader sizes each tensor from the files present and would skip a missing one)
        files = {f: os.path.getsize(os.path.join(resume, f)) for f in sorted(os.listdir(resume))}
        with open(os.path.join(resume, "state.json"), "w") as f:
            json.dump({**state, "saved": keys, "files": files}, f, indent=2)
        for d, _, files in os.walk(tmp):
            for name in files:
                _fsync(os.path.join(d, name))
            _fsync(d)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _fsync(out_dir)  # the rename itself is durable only once the directory is
        for old in resumable(out_dir)[keep_resume:]:
            shutil.rmtree(os.path.join(old, "resume"))  # the HF exports stay
    dist.barrier()
    return final


def resumable(out_dir):
    """Checkpoints with resume state, newest first (a .tmp dir is a save that never finished)."""
    if not os.path.isdir(out_dir):
        return []
    done = [d for d in os.listdir(out_dir) if d.startswith("ckpt-") and not d.endswith(".tmp")
            and os.path.exists(os.path.join(out_dir, d, "resume", "state.json"))]
    return [os.path.join(out_dir, d) for d in sorted(done, reverse=True)]


def saved_args(out_dir):
    """The flags of the run in out_dir, from its newest readable resume state (None without one)."""
    for ck in resumable(out_dir):
        try:
            return read_state(ck)["args"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def read_state(ck):
    with open(os.path.join(ck, "resume", "state.json")) as f:
        return json.load(f)


def check_complete(ck, st):
    """Every file the save wrote is there at its size, else a ValueError naming the first that is not.
    Checkpoints saved before the file list was kept are checked for one shard file per process."""
    resume = os.path.join(ck, "resume")
    if "files" not in st:
        have = {f.split("-model-")[0] for f in os.listdir(resume) if f.startswith("shard-")}
        missing = [f"shard-{r + 1:05d}-*" for r in range(st.get("world", 1)) if f"shard-{r + 1:05d}" not in have]
        if missing:
            raise ValueError(f"resume/{missing[0]} is missing (saved on {st.get('world', 1)} processes)")
        return
    for name, size in st["files"].items():
        p = os.path.join(resume, name)
        if not os.path.isfile(p):
            raise ValueError(f"resume/{name} is missing")
        if os.path.getsize(p) != size:
            raise ValueError(f"resume/{name} has {os.path.getsize(p)} bytes, {size} were saved")


def load(ck, models, opts):
    """Load a checkpoint's resume state into the models and optimizers (on any number of processes)
    and return its state.json. What the checkpoint has not saved (say the discriminator of a SeqKD
    run, or the state of an optimizer that had not stepped) is left as it is. Raises on anything
    missing or unreadable, before anything is loaded; the caller may try an older checkpoint."""
    st = read_state(ck)
    check_complete(ck, st)
    keys = [k for k in st["saved"] if (models.get(k[3:] if k.startswith("opt") else k) is not None)]
    sd, aliases = _state(models, opts, keys)
    dcp.load(sd, storage_reader=HuggingFaceStorageReader(os.path.join(ck, "resume")))
    for (k, name), same in aliases.items():
        sd[k][name] = sd[k][same]
    for k in keys:
        if not k.startswith("opt"):
            o = opts.get(k) if f"opt{k}" in keys else None
            if o is None:
                set_model_state_dict(models[k], sd[k])
            else:
                _, osd = get_state_dict(models[k], o)
                set_state_dict(models[k], o, model_state_dict=sd[k],
                               optim_state_dict={"state": sd[f"opt{k}"], "param_groups": osd["param_groups"]})
    return st


def restore(sources, models, opts, make_reference, log=print):
    """Load the first of the checkpoints `sources` (newest first) that loads whole, naming each one
    that does not in one line on stderr; make_reference() builds the reference policy where the
    checkpoint saved one. Returns (its state.json, its path), (None, None) without sources, and raises
    RunDirError when none of them loads."""
    for ck in sources:
        try:
            st = read_state(ck)
            models["R"] = make_reference() if "R" in st["saved"] else None
            return load(ck, models, opts), ck
        except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
            log(f"{ck}: cannot load it ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); "
                "trying the next older checkpoint", file=sys.stderr)
    if sources:
        raise RunDirError(f"no loadable checkpoint among {', '.join(sources)}")
    return None, None


def truncate_metrics(path, step):
    """Drop the records of steps from `step` on (a run resumed from an earlier checkpoint logs them
    again) and a torn last line; returns the records kept."""
    if not os.path.exists(path):
        return []
    keep = [m for _, m in read_jsonl(path, torn_ok=True) if m["step"] < step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in keep)
    os.replace(path + ".tmp", path)
    return keep

