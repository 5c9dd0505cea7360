"""Training across processes started by torchrun: DDP or FSDP2, and whole matrices per rank for Muon.

`torchrun --standalone --nproc-per-node N -m ternchat train ...` starts N processes; each reads
its rank from the environment, joins one process group (NCCL on GPUs, gloo on CPU) and trains on
its share of every global batch (`TokenLoader` gives rank r the r-th `batch_size` windows).
`dist.strategy`:

- "ddp": `DistributedDataParallel` replicates the model and all-reduces (averages) gradients.
- "fsdp2": `torch.distributed.fsdp.fully_shard` on every transformer block and then on the root,
  so each rank keeps 1/N of every parameter, gradient and AdamW state (as DTensors sharded on
  dim 0) and all-gathers one block's weights at a time; `dist.fsdp_param_dtype = "bf16"`
  gathers bf16 copies (half the traffic) and reduces gradients in fp32.

`dist.offload` (with "fsdp2", also in one process without torchrun, which then gets a one-rank
process group) passes FSDP2's `CPUOffloadPolicy`: the shards of the fp32 weights and their
gradients live in pinned host memory, each block's are copied to the GPU for its forward and
backward (prefetched on FSDP2's own streams) and the reduced gradients copied back. The matrix
optimizers' state stays in host memory as well, and each block's matrices step on the GPU
(`OwnedMatrices`): the GPU never holds more than a few blocks.

The matrix optimizers (Muon, 8-bit Muon, GUM, FOAM, GaLore) need whole matrices: Newton-Schulz
orthogonalizes a matrix, GaLore projects it. `OwnedMatrices` gives each matrix one owner rank
(greedy by size, so the work is balanced), as nanochat's and Moonlight's distributed Muon do:
per transformer block, each sharded matrix and its gradient are gathered to the owner alone, the
owner runs the optimizer on the whole matrix, and the new values are scattered back as shards
(under DDP, where every rank already holds the averaged gradient, the owner steps and broadcasts
the matrix). Optimizer state exists only on the owner, so it is sharded, not replicated; and the
inner optimizer sees the matrices in the single-process order (the others without gradients), so
its draws, seeds and results are those of one process.

A checkpoint is written in the single-process format (`train/checkpoint.py`): the ranks gather
full tensors and rank 0 writes them. Every rank reads it back and keeps its shard, so a run
resumes at any number of ranks.
"""

from __future__ import annotations

import gc
import os
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any group exists (shutdown_distributed says why)
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from ternchat.config import DistConfig


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


def launched_ranks() -> Ranks:
    """The ranks torchrun put in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(cfg: DistConfig, ranks: Ranks) -> torch.device:
    """Join the process group of a torchrun job (or make a one-process group for `dist.offload`, which FSDP2
    needs even alone); returns this rank's device."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", ranks.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if ranks.distributed and cfg.strategy == "none":
        raise ValueError(f"started with {ranks.world_size} processes but dist.strategy = 'none'; "
                         "set --set dist.strategy=ddp or fsdp2")
    if dist.is_initialized() or not (ranks.distributed or cfg.offload):
        return device
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if cfg.offload and backend == "nccl":
        backend = "cpu:gloo,cuda:nccl"  # the host-resident shards' collectives (checkpoints) run on gloo
    if ranks.distributed:
        dist.init_process_group(backend, device_id=device if cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device


def model_home(cfg: DistConfig, device: torch.device) -> torch.device:
    """Where to build the model: on the host under `dist.offload` (FSDP2 moves one block at a time to the
    device to shard it, then keeps the shards in host memory), otherwise on the device."""
    return torch.device("cpu") if cfg.offload else device


def parallelize(model: nn.Module, cfg: DistConfig, ranks: Ranks, device: torch.device) -> nn.Module:
    """Shard or replicate `model` across the job's ranks; returns the module to call for the forward."""
    if not (ranks.distributed or cfg.offload):
        return model
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        replica = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        _replicas.add(replica)
        return replica
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.fsdp_param_dtype == "bf16" else None,
                                     reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.offload else OffloadPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=precision, offload_policy=offload,
                    reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mp_policy=precision, offload_policy=offload,
                reshard_after_forward=cfg.reshard_after_forward)
    if cfg.offload:
        _host_sums[model] = HostGradientSum(model.parameters())
    return model


class HostGradientSum:
    """The sum of the micro-batches' gradients of FSDP2-offloaded parameters, kept off the parameters.

    With `CPUOffloadPolicy`, FSDP2 copies a reduced gradient to the host without blocking, into pinned
    memory, only while the parameter has no gradient yet. From the second micro-batch on it copies into
    pageable memory, blocking, and adds on the CPU (torch's `_fsdp_collectives.foreach_reduce`). On an
    H100 that path dominated preset C's step (docs/scale.md). Taking each micro-batch's gradients off the
    parameters after its backward (`collect`) keeps every copy on the pinned, asynchronous path; FSDP2
    has waited for those copies when backward returns. `restore` puts the sums back before clipping and
    the optimizer step."""

    def __init__(self, params: Iterable[nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        self.sums: dict[nn.Parameter, torch.Tensor] = {}

    @torch.no_grad()
    def collect(self) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if p in self.sums:
                self.sums[p].to_local().add_(p.grad.to_local())
            else:
                self.sums[p] = p.grad
            p.grad = None

    def restore(self) -> None:
        for p, total in self.sums.items():
            p.grad = total
        self.sums = {}


_host_sums: weakref.WeakKeyDictionary[nn.Module, HostGradientSum] = weakref.WeakKeyDictionary()


def micro_batch_done(model: nn.Module) -> None:
    """After a micro-batch's backward: move its gradients where the next one cannot slow them down."""
    if model in _host_sums:
        _host_sums[model].collect()


def gradients_complete(model: nn.Module) -> None:
    """After the last micro-batch: every parameter's gradient is its sum over the micro-batches again."""
    if model in _host_sums:
        _host_sums[model].restore()


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the ranks (in place; gloo has no AVG, so SUM / N)."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


_replicas: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # the DDP wrappers parallelize made


def shutdown_distributed() -> None:
    """Leave the process group and destroy it, joining gloo's worker threads while the interpreter is whole.
    Call it after dropping the sharded or replicated model.

    A group that outlives `destroy_process_group` keeps its worker threads into interpreter finalization,
    where a thread that releases the last collective's tensors needs the GIL: the rank aborts at exit
    ("terminate called without an active exception", SIGABRT), more often under load. Two things held
    the group past destroy: `torch.distributed.nn`'s `group=group.WORLD` default arguments, evaluated when
    it is imported (FSDP2 imports it), which is why this module imports it before any group exists; and
    DeviceMeshes, which newer torch lets hold their groups and which DTensor's process-wide caches
    (sharding propagation, redistribution plans) keep alive after the model is gone, so their groups are
    dropped here. DDP's reducers are dropped as well: a reducer that held the group's last reference
    would destroy it with the GIL held while gloo's worker needed the GIL, and the process would hang."""
    for replica in list(_replicas):
        if hasattr(replica, "reducer"):
            del replica.reducer
    _replicas.clear()
    gc.collect()
    _release_meshes()
    if dist.is_initialized():
        dist.destroy_process_group()


def _release_meshes() -> None:
    """Drop the process groups that live DeviceMeshes hold (newer torch keeps them in `_pg_registry`)."""
    for obj in gc.get_objects():
        # by the class's MRO: DeviceMesh's isinstance check would touch every object, deprecated ones too
        if DeviceMesh in type(obj).__mro__ and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank (one process: [obj])."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    objects: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


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


# --- whole tensors for checkpoints and evaluation copies --------------------------------------------
def any_sharded(tensors: Iterable[torch.Tensor]) -> bool:
    return any(isinstance(t, DTensor) for t in tensors)


def is_sharded(model: nn.Module) -> bool:
    return any_sharded(model.parameters())


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors; for a sharded model a collective whose result only rank 0
    receives (in host memory; the other ranks get {})."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors (every rank has them) into a plain or a sharded model."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise RuntimeError(f"the state does not match the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, target in own.items():
            piece = own_shard(state[name], target) if isinstance(target, DTensor) else state[name]
            (target.to_local() if isinstance(target, DTensor) else target).copy_(piece)


# --- optimizer state of FSDP2's sharded parameters -------------------------------------------------
def full_state(state: dict) -> dict:
    """A torch optimizer's state dict with every DTensor gathered whole (a collective on all ranks)."""
    return {"state": {i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
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
    params = list(params)
    out = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out[i] = {k: DTensor.from_local(own_shard(v, p).contiguous(), p.device_mesh, p.placements,
                                        run_check=False, shape=p.shape, stride=p.stride())
                  if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
                  for k, v in s.items()}
    return {"state": out, "param_groups": state["param_groups"]}
