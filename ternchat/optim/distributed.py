"""Whole matrices per rank for the matrix optimizers, and optimizer state of sharded parameters.

The matrix optimizers (Muon, 8-bit Muon, GUM, FOAM, GaLore) need whole matrices: Newton-Schulz
orthogonalizes a matrix, GaLore projects it. `OwnedMatrices` gives each matrix one owner rank
(greedy by size, so the work is balanced), as nanochat's and Moonlight's distributed Muon do:
per transformer block, each sharded matrix and its gradient are gathered to the owner alone, the
owner runs the optimizer on the whole matrix, and the new values are scattered back as shards
(under DDP, where every rank already holds the averaged gradient, the owner steps and broadcasts
the matrix). Optimizer state exists only on the owner, so it is sharded, not replicated; and the
inner optimizer sees the matrices in the single-process order (the others without gradients), so
its draws, seeds and results are those of one process. The state of an optimizer over FSDP2's
sharded parameters is saved whole (`full_state`) and cut back to each rank's shards on load
(`shard_state`). The process-group set-up, DDP and FSDP2 themselves live in train/distributed.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import sys
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1



# --- whole matrices on their owner ----------------------------------------------------------------
def _shard_rows(rows: int, world: int) -> int:
    """Rows per dim-0 shard as FSDP2 cuts them (torch.chunk: the last shards may be short or empty)."""
    return -(-rows // world)


def gather_to_owner(local: torch.Tensor, rows: int, owner: int) -> torch.Tensor | None:
    """The whole matrix on `owner` from every rank's dim-0 shard; None elsewhere."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        return local
    chunk = _shard_rows(rows, world)
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
    dist.gather(padded, pieces, dst=owner)
    return torch.cat(pieces)[:rows] if rank == owner else None


def scatter_from_owner(whole: torch.Tensor | None, local: torch.Tensor, rows: int, owner: int) -> None:
    """Copy each rank's dim-0 shard of the owner's `rows`-row `whole` matrix into that rank's `local`."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        if whole.data_ptr() != local.data_ptr():
            local.copy_(whole)
        return
    chunk = _shard_rows(rows, world)
    received = local.new_empty((chunk, *local.shape[1:]))
    pieces = None
    if rank == owner:
        padded = local.new_zeros((chunk * world, *local.shape[1:]))
        padded[:rows] = whole
        pieces = list(padded.chunk(world))
    dist.scatter(received, pieces, src=owner)
    local.copy_(received[:local.shape[0]])


def balanced_owners(sizes: list[int], world: int) -> list[int]:
    """An owner rank per matrix: largest first, each to the least loaded rank (ties: lowest rank)."""
    load, owners = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return owners


class OwnedMatrices:
    """A matrix optimizer whose matrices are each stepped, whole, by one owner rank.

    `groups` are the matrices in single-process order, one list per transformer block; `build`
    makes the inner optimizer from groups of tensors. The inner optimizer is built over stand-ins
    for every matrix, so its indices, seeds and draws are the single-process ones, but only the
    owner's stand-ins ever get a gradient, so only the owner creates state for a matrix.

    Under FSDP2 a stand-in holds no data between steps: for its block's step it takes the gathered
    matrix on the compute device (the FSDP2 mesh's), and gives it back after. Where the shards live
    in host memory (`dist.offload`), the stand-in's optimizer state lives there too and travels to
    the compute device for that step only, so Newton-Schulz and GaLore's projections run on the GPU,
    matrix by matrix, while the GPU holds one block's matrices, gradients and state at a time.
    """

    def __init__(self, groups: list[list[nn.Parameter]], build: Callable[[list[list[torch.Tensor]]], torch.optim.Optimizer],
                 ranks: Ranks):
        self.groups, self.rank, self.world = groups, ranks.rank, ranks.world_size
        self.params = [p for g in groups for p in g]
        self.owner = dict(zip(self.params, balanced_owners([p.numel() for p in self.params], self.world)))
        self.sharded = any_sharded(self.params)
        if self.sharded:
            self.home = self.params[0].to_local().device  # where the shards and the optimizer state live
            mesh_type = self.params[0].device_mesh.device_type
            self.device = (torch.device(mesh_type, torch.get_device_module(mesh_type).current_device())
                           if mesh_type != "cpu" else torch.device("cpu"))
            self.whole = {p: self._no_data_like(p, self.home) for p in self.params}
        else:
            self.whole = {p: p for p in self.params}
        self.inner = build([[self.whole[p] for p in g] for g in groups])

    @staticmethod
    def _no_data_like(p: nn.Parameter, device: torch.device) -> torch.Tensor:
        t = torch.empty(p.shape, dtype=p.dtype, device=device)
        t.untyped_storage().resize_(0)
        return t

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def owned(self, p: nn.Parameter) -> bool:
        return self.owner[p] == self.rank

    @torch.no_grad()
    def step(self) -> None:
        if not self.sharded:
            self._step_replicated()
            return
        for group in self.groups:  # one block at a time bounds the whole matrices alive on a rank
            self._step_sharded(group)
        if self.device.type == "cuda" and self.home.type == "cpu":
            torch.cuda.synchronize(self.device)  # the state's copies back to host memory are complete

    def _step_replicated(self) -> None:
        for p in self.params:  # every rank holds the averaged gradient; only the owner steps
            if not self.owned(p):
                p.grad = None
        self.inner.step()
        handles = [dist.broadcast(p.data, src=self.owner[p], async_op=True) for p in self.params]
        for h in handles:
            h.wait()

    def _move_state(self, whole: torch.Tensor, device: torch.device) -> None:
        state = self.inner.state.get(whole, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.device != device:
                state[key] = value.to(device, non_blocking=True)

    def _step_sharded(self, group: list[nn.Parameter]) -> None:
        for p in group:
            value = gather_to_owner(p.to_local(), p.shape[0], self.owner[p])
            grad = gather_to_owner(p.grad.to_local(), p.shape[0], self.owner[p]) if p.grad is not None else None
            if self.owned(p):
                whole = self.whole[p]
                whole.data = value.to(self.device, non_blocking=True)
                whole.grad = grad.to(self.device, non_blocking=True) if grad is not None else None
                self._move_state(whole, self.device)
        self.inner.step()
        for p in group:
            whole = self.whole[p] if self.owned(p) else None
            scatter_from_owner(whole, p.to_local(), p.shape[0], self.owner[p])
            if whole is not None:
                self._move_state(whole, self.home)
                whole.grad = None
                whole.data = self._no_data_like(p, self.home)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    # The state dict holds the single-process layout: gathered on rank 0 to save, filtered to the owned
    # matrices on load. Indices are positions in `self.params`, as torch's optimizers number them.
    def state_dict(self) -> dict:
        mine = self.inner.state_dict()
        if not dist.is_initialized():
            return mine
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, {i: s for i, s in mine["state"].items()})
        merged = {}
        for states in everyone:
            merged.update(states)
        return {"state": dict(sorted(merged.items())), "param_groups": mine["param_groups"]}

    def load_state_dict(self, state: dict) -> None:
        owned = {i for i, p in enumerate(self.params) if self.owned(p)}
        self.inner.load_state_dict({"state": {i: s for i, s in state["state"].items() if int(i) in owned},
                                    "param_groups": state["param_groups"]})


# --- sharded parameters and their optimizer state -------------------------------------------------
def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor, without importing torch.distributed.tensor (a second of every process's
    start): no DTensor exists before that module is imported, as FSDP2 does."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    return any(is_dtensor(t) for t in tensors)


def is_sharded(model: nn.Module) -> bool:
    return any_sharded(model.parameters())


def full_state(state: dict) -> dict:
    """A torch optimizer's state dict with every DTensor gathered whole (a collective on all ranks)."""
    return {"state": {i: {k: v.full_tensor() if is_dtensor(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def own_shard(whole: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's dim-0 shard of `whole`, cut as FSDP2 cut `like` (torch.chunk), on `like`'s local device."""
    rank, world = like.device_mesh.get_local_rank(), like.device_mesh.size()
    pieces = torch.chunk(whole, world, dim=0)
    piece = pieces[rank] if rank < len(pieces) else whole[:0]
    local = like.to_local()
    if piece.shape != local.shape:
        raise ValueError(f"a {tuple(whole.shape)} tensor cannot fill this rank's {tuple(local.shape)} shard")
    return piece.to(local.device)


def shard_state(state: dict, params: Iterable[torch.Tensor]) -> dict:
    """Cut the whole tensors of a saved optimizer state down to this rank's shards of `params` (kept where
    the parameter's shard lives: on the device, or in host memory under offload)."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    out = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out[i] = {k: DTensor.from_local(own_shard(v, p).contiguous(), p.device_mesh, p.placements,
                                        run_check=False, shape=p.shape, stride=p.stride())
                  if is_dtensor(p) and torch.is_tensor(v) and v.shape == p.shape else v
                  for k, v in s.items()}
    return {"state": out, "param_groups": state["param_groups"]}
