"""
What FSDP2 and the process group ask of the training loop: starting the group (torchrun or one
process), sharding a model with its precision policy, micro-batches that every rank runs as many
of, a step's metrics in one collective, and a clipped optimizer step that skips non-finite gradients.

    from distributed import init_distributed, shard, micro_batches, StepMetrics, clip_and_step
    rank, world, device = init_distributed()
    model = shard(model, device, bf16=True, checkpointing=False)
    for which, ids, lengths in micro_batches(groups, token_budget=4096, device=device): ...
"""

import ctypes
import os
import socket

import torch
import torch.distributed as dist


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator decides
        return None


def keep_freed_memory():
    """glibc gives each large allocation its own mmap (always above 32 MB) and hands it back to the
    kernel when freed, so every [chunk, vocab] buffer of every step starts in fresh pages that fault in
    one by one: on a CPU that costs more than the passes over them. Keep freed memory for reuse."""
    if libc := _glibc():
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'd chunks
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the top of the heap back


def release_freed_memory():
    """Hand the free pages that keep_freed_memory kept back to the kernel. The heap grows over a run
    (9 GiB per process by the demo's 26th step), and a checkpoint's full-state buffers come on top:
    without this the demo's final save reached 12 GiB per process, more than a 24 GB machine holds."""
    if libc := _glibc():
        libc.malloc_trim(0)


def init_distributed():
    """torchrun's env, or a one-process group, so that the same FSDP2 code runs everywhere."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        keep_freed_memory()
    return dist.get_rank(), dist.get_world_size(), device


def peak_memory_gib(device):
    """The process's peak memory so far: allocated on a GPU, resident (ru_maxrss) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def fast_bf16(device):
    """Hardware where bf16 matrix products are fast: CUDA GPUs, and CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def shard(model, device, bf16, checkpointing):
    """FSDP2: each block is its own unit, the root holds embeddings, final norm and head. Weights,
    gradients and optimizer states stay fp32 and sharded; with bf16 compute, each unit's weights are
    all-gathered in bf16 and gradients reduced in fp32 (the same policy on CPU and GPU)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.model.layers:
        block.checkpointing = checkpointing
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # the root reshards after its forward too (FSDP2 keeps it gathered by default): after a no-grad
    # forward no backward comes to reshard it, and the module would then hold the gathered weights
    return fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=True)


def micro_batches(items, token_budget, device):
    """Yield (item indices, ids [rows, T] right-padded, lengths [rows]) in micro-batches of about
    token_budget padded tokens. An item is a list of sequences that share a micro-batch (for D: a
    prompt's teacher answer and its n samples, so that every pair is complete in one forward); an
    item larger than the budget goes alone. Every rank yields the same number of micro-batches, none
    empty: each FSDP2 forward all-gathers weights, so all ranks must run as many. (Every rank holds
    the same number of items, so the rank with the most micro-batches has at least one per item.)"""
    longest = [max(map(len, it)) for it in items]
    bins = []
    for i in sorted(range(len(items)), key=lambda i: longest[i]):  # by length: little padding
        if bins and (sum(len(items[j]) for j in bins[-1]) + len(items[i])) * longest[i] <= token_budget:
            bins[-1].append(i)
        else:
            bins.append([i])
    count = torch.tensor([len(bins)], device=device)
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    while len(bins) < count.item():  # split the fullest bin until the counts match
        k = max(range(len(bins)), key=lambda k: len(bins[k]))
        bins[k:k + 1] = [bins[k][:len(bins[k]) // 2], bins[k][len(bins[k]) // 2:]]
    for which in bins:
        seqs = [s for i in which for s in items[i]]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
        yield which, ids.to(device), torch.tensor([len(s) for s in seqs], device=device)


class StepMetrics:
    """A step's metrics as device tensors: summed over micro-batches with no host sync, then over
    ranks in a single collective at the end of the step. A metric added with per=N is reported as its
    global sum divided by N (a mean over the step's N pairs, prompts, ...); top() keeps a maximum.

        m.add(d_loss=pair_losses, per=pairs)
        m.top(resp_len_max=lengths)
        m.reduce()  # {"d_loss": ..., "resp_len_max": ...}, the same on every rank
    """

    def __init__(self, device):
        self.device, self.sums, self.maxes, self.per = device, {}, {}, {}

    def add(self, per=None, **kw):
        for k, v in kw.items():
            self.sums[k] = self.sums.get(k, 0) + torch.as_tensor(v, device=self.device).detach().double().sum()
            if per is not None:
                self.per[k] = per

    def top(self, **kw):
        for k, v in kw.items():
            v = torch.as_tensor(v, device=self.device).detach().double().max()
            self.maxes[k] = torch.maximum(self.maxes[k], v) if k in self.maxes else v

    def reduce(self):
        keys = list(self.sums) + list(self.maxes)
        if not keys:
            return {}
        mine = torch.stack([self.sums[k] for k in self.sums] + [self.maxes[k] for k in self.maxes])
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        every = torch.stack(parts).cpu()
        out = {k: (every[:, i].sum() if i < len(self.sums) else every[:, i].max()).item() for i, k in enumerate(keys)}
        return {k: v / self.per[k] if k in self.per else v for k, v in out.items()}


def clip_and_step(opt, max_norm):
    """Clip the global gradient norm and step, unless the norm is not finite (NaN/inf anywhere): then
    the step is skipped, like verl, so one bad batch never reaches the weights. -> (norm, stepped)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    ok = bool(torch.isfinite(norm))
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)  # through the optimizer: its params are FSDP's sharded ones
    return norm, ok
