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

The matrix optimizers need whole matrices; each is stepped by one owner rank (`OwnedMatrices` in
optim/distributed.py, which the optimizer factory builds).

A checkpoint is written in the single-process format (`train/checkpoint.py`): the ranks gather
full tensors and rank 0 writes them. Every rank reads it back and keeps its shard, so a run
resumes at any number of ranks.
"""

from __future__ import annotations

import gc
import os
import weakref
from typing import Iterable

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  before any group exists (shutdown_distributed says why)
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from ternchat.config import DistConfig
from ternchat.optim.distributed import Ranks, is_dtensor, is_sharded, own_shard


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


# --- whole tensors for checkpoints and evaluation copies --------------------------------------------
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
            piece = own_shard(state[name], target) if is_dtensor(target) else state[name]
            (target.to_local() if is_dtensor(target) else target).copy_(piece)
