"""The ranks of a `torchrun` launch, for the streaming merge: which rank this is, how many there
are, and the two collectives it needs. One process without torchrun is rank 0 of 1 and calls
nothing in torch.distributed."""
import os

import torch


class World:
    """rank / size of the job; joins the process group that torchrun's environment describes
    (WORLD_SIZE > 1) if the caller has not already: NCCL where CUDA is present, else gloo."""

    def __init__(self):
        import torch.distributed as dist
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.dist = dist if dist.is_available() and (dist.is_initialized() or launched) else None
        if self.dist is not None and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = self.dist.get_rank() if self.dist else 0
        self.size = self.dist.get_world_size() if self.dist else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    def own_device(self, device):
        """`device` for this rank: with several ranks, a bare "cuda" means one GPU per rank."""
        if self.size > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self):
        if self.dist is not None:
            self.dist.barrier()

    def max(self, value):
        """The largest `value` (an int) over the ranks."""
        if self.dist is None:
            return value
        on = torch.device("cuda", self.local_rank) \
            if self.dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.int64, device=on)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return int(t.item())
