"""What a step keeps in memory: the bytes autograd saves for backward, and the
peak CUDA memory. Used by the benchmarks and the training tools."""

import torch


def saved_bytes(run, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` executes,
    leaving out the storages of the tensors in ``exclude`` (parameters, say)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def peak_memory(step, device: torch.device) -> int | None:
    """Peak CUDA memory above what was allocated before one call of step(); None
    off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
