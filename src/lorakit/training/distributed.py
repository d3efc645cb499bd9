"""One process or several: `accelerate launch --num_processes N lorakit train ...` (DDP semantics).

Only the adapter parameters train, and they live in one small module, so instead of wrapping the U-Net in
DistributedDataParallel each process averages the adapter gradients itself with one all-reduce of a flat
buffer before the optimizer step: the same arithmetic as DDP, without DDP's requirement that the forward
pass go through the wrapper (lorakit's adapters are attached to the base model's layers). Every process
sees its own share of each epoch's batches; only the main process writes files and logs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class Processes:
    def __init__(self, device: str | torch.device | None = None):
        from accelerate import PartialState

        on_cpu = str(device) == "cpu" if device is not None else not torch.cuda.is_available()
        self.state = PartialState(cpu=on_cpu)  # cpu=True is what makes accelerate set up gloo without GPUs
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.device = torch.device(device) if device is not None else self.state.device
        self.is_main = self.state.is_main_process

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, batches: list) -> list:
        """This process's share of an epoch's batches; every process gets the same count."""
        if not self.distributed:
            return batches
        usable = len(batches) // self.world * self.world
        return batches[self.rank:usable:self.world]

    @torch.no_grad()
    def average_gradients(self, params: list[torch.Tensor]) -> None:
        if not self.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any (a stop request must stop all of them together)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    @torch.no_grad()
    def check_in_sync(self, params: list[torch.Tensor]) -> None:
        """Raise if the processes' adapter weights differ (they must be identical after every step)."""
        if not self.distributed:
            return
        checksum = torch.stack([p.double().sum() for p in params]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world)]
        dist.all_gather(gathered, checksum)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"adapter weights differ between processes: {[float(g) for g in gathered]}")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()
