"""Data parallelism on accelerate's process state: who we are, and the few collectives we need.

Launch with `torchrun --nproc_per_node N -m dealcl run …`, `accelerate launch -m dealcl run …`
or `dealcl run --num-processes N`. Every rank holds the whole model and all data; each
optimizer step's global batch is drawn once (same seed everywhere) and sharded across ranks,
the loss is normalised by the step's global answer-token count, and the summed gradients are
therefore exactly the single-process gradient. Every rank then takes the same optimizer step,
so parameters, optimizer state and method state (GORP's SVD and memory, DEAL's filter and MLP,
O-LoRA's frozen adapters, Replay's buffer, EWC's Fisher) stay identical without further sync.

With `fsdp=true` (or under an accelerate FSDP config) the frozen base weights of every
transformer block are sharded over the ranks with PyTorch's FSDP2 (`fully_shard`) and
all-gathered one block at a time, so a model that does not fit one device trains on several.
Adapters and method state are created after sharding, stay outside FSDP and are replicated
exactly as above. Every FSDP forward is a collective: ranks must run the same number of them,
so shards are padded to equal counts (`lockstep_count`) and generation runs with
`synced_gpus`.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch


class Processes:
    """The process group as dealcl sees it; a single process needs no communication at all."""

    def __init__(self, state=None) -> None:
        self.state = state
        self.world = state.num_processes if state is not None else 1
        self.rank = state.process_index if state is not None else 0
        self.is_main = self.rank == 0
        self.sharded = False  # set by shard_blocks: the base weights are split over the ranks

    @property
    def device(self) -> torch.device:
        if self.state is not None:
            return torch.device(self.state.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def shard(self, items: list) -> list:
        """This rank's share: every world-th item, so shards differ in size by at most one."""
        return items[self.rank :: self.world]

    def on_main(self, action: Callable[[], Any]) -> Any:
        """Run `action` on rank 0 only (a write to the run directory) and keep the ranks in step.

        A user error raised there (an output directory in the way, a full disk) is sent to
        every rank and raised on each, so that no rank waits forever for one that gave up.
        Returns the action's value on rank 0 and None elsewhere; doubles as a barrier.
        """
        if self.world == 1:
            return action()
        from ..errors import UserError

        value, outcome = None, [None]
        if self.is_main:
            try:
                value = action()
            except UserError as exc:
                outcome = [str(exc)]
        torch.distributed.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise UserError(outcome[0])
        return value

    def close(self) -> None:
        """Leave the process group cleanly: wait for every rank, then tear the group down, so
        that no rank exits while another still talks to it."""
        if self.world > 1 and torch.distributed.is_initialized():
            self.state.wait_for_everyone()
            torch.distributed.destroy_process_group()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (sum) the gradients of `params` in one flat buffer."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def lockstep_count(self, count: int) -> int:
        """The largest `count` over ranks when the model is sharded (each rank then pads its
        work to it, so that every rank runs the same forwards); `count` itself otherwise."""
        if not self.sharded:
            return count
        value = torch.tensor([count], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return int(value.item())

    def shard_blocks(self, model: torch.nn.Module) -> int:
        """Shard the weights of every transformer block (the model's `_no_split_modules`, e.g.
        LlamaDecoderLayer, T5Block) over the ranks, each shard on this rank's device (the
        caller moves the rest); returns the number of blocks. Embeddings, final norm and LM head stay whole (small next
        to the blocks: 2 of 16 GB on Llama-3.1-8B). Call before adapters are added: parameters
        created later are not FSDP's and stay replicated. A model sharded already is left alone."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        from ..errors import UserError

        names = set(getattr(model, "_no_split_modules", None) or [])
        # fully_shard subclasses a block's class (FSDPLlamaDecoderLayer), hence the MRO.
        blocks = [m for m in model.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]
        if not blocks:
            raise UserError(f"FSDP: {type(model).__name__} names no transformer block class (_no_split_modules) to shard")
        if not all(isinstance(b, FSDPModule) for b in blocks):
            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in blocks:
                fully_shard(block, mesh=mesh, reshard_after_forward=True)
        self.sharded = True
        return len(blocks)

    def sum_values(self, values: dict[str, float]) -> dict[str, float]:
        """Sum named numbers over ranks (a rank may lack a key: it counts as zero)."""
        if self.world == 1:
            return values
        merged: dict[str, float] = {}
        for part in self.gather([values]):
            for key, value in part.items():
                merged[key] = merged.get(key, 0.0) + value
        return merged

    def gather(self, items: list[Any]) -> list[Any]:
        """Concatenate every rank's list, in rank order, on every rank."""
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)


def single_process() -> Processes:
    return Processes(None)


def fsdp_requested() -> bool:
    """Launched under an accelerate FSDP config (`accelerate launch --use_fsdp …`)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


@lru_cache(maxsize=1)
def launched_processes() -> Processes:
    """The processes this program was launched with (torchrun / accelerate launch), or one."""
    import os

    from ..errors import UserError

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
        raise UserError(
            "DeepSpeed ZeRO is not supported: use fsdp=true to shard the base weights over the ranks "
            "(docs/SCALING.md has the method x backend matrix); launch without the DeepSpeed config"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return single_process()
    from accelerate import PartialState

    return Processes(PartialState(cpu=not torch.cuda.is_available()))
