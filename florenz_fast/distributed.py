"""Process groups and the one place where the model is wrapped: activation checkpointing, DDP / FSDP2, compile.

The model code stays single-device (DESIGN.md rule 5); `wrap_model` applies, in this order,
activation checkpointing per encoder/decoder layer, `torch.compile` per layer (optional), then DDP or FSDP2
(`fully_shard` per layer, then the root).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .florenz import Florenz


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device: str = "auto") -> World:
    """Join the torchrun process group when there is one (nccl on CUDA, gloo otherwise)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(rank=rank, size=size, local_rank=local, device=dev)


def all_reduce_sum(x: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


# Selective activation checkpointing: keep the outputs of the matmuls (expensive to recompute), recompute
# the elementwise work, norms and softmax (cheap, and most of the activation memory).
_SAVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten.baddbmm.default, torch.ops.aten.linear.default}
# The Triton attention forward (the `triton` backend's op) is kept too: its outputs (out, the size of q, and an
# fp32 lse per query row) are what its backward reads anyway, and recomputing them re-runs the whole Q.K^T / P.V
# pass. Matched by name, not imported: the op is registered when florenz_kernels.softcap_attention is first
# imported (by the backend on its first call, possibly after this policy was built), and importing it here would
# pull triton into the engine.
_SAVE_OP_NAMES = {"florenz::softcap_attention_fwd"}


def _selective_policy(ctx, op, *args, **kwargs):
    if op in _SAVE_OPS or (isinstance(op, torch._ops.OpOverload) and op.name() in _SAVE_OP_NAMES):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _layer_lists(model: Florenz) -> list[nn.ModuleList]:
    return [model.encoder.layers, model.decoder.layers]


def apply_activation_checkpointing(model: Florenz, policy: str) -> None:
    """policy: none | full (recompute each encoder/decoder layer in backward) | selective (keep the matmul and
    Triton attention outputs, recompute the rest)."""
    if policy == "none":
        return
    if policy not in ("full", "selective"):
        raise ValueError(f"activation_checkpointing must be none, full or selective, got {policy!r}")
    # The all-layer cross K/V GEMM runs outside the checkpointed layers, so every layer's K and V would stay alive
    # from forward to backward (26 layers x 2 x tokens x 1024 values: 9.5 GB for 89k bf16 encoder tokens of
    # florenz-3.5b) instead of being recomputed per layer. At training sizes the one GEMM is no faster than the
    # per-layer ones anyway (bench/results/h100/cross_bench.md), so checkpointed layers project their own.
    model.decoder.fuse_cross_kv = False
    kwargs = {}
    if policy == "selective":
        kwargs["context_fn"] = lambda: create_selective_checkpoint_contexts(_selective_policy)
    for layers in _layer_lists(model):
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)


def wrap_model(model: Florenz, world: World, *, parallel: str, activation_checkpointing: str = "none",
               compile: bool = False) -> nn.Module:
    """Returns the module to call for training (the unwrapped model stays reachable as the argument)."""
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        for layers in _layer_lists(model):
            for layer in layers:
                layer.compile()
    if parallel == "auto":
        parallel = "ddp" if world.distributed else "none"
    if parallel == "none":
        if world.distributed:
            raise ValueError("parallel=none with several processes: pick ddp or fsdp")
        return model
    if not world.distributed:
        raise ValueError(f"parallel={parallel} needs several processes (torchrun --nproc_per_node=N)")
    if parallel == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # each layer's weights are whole only inside its own forward: the decoder's all-layer cross K/V GEMM
        # reads every layer's k/v weights at once, so under FSDP2 each layer projects its own
        model.decoder.fuse_cross_kv = False
        for layers in _layer_lists(model):
            for layer in layers:
                fully_shard(layer)
        fully_shard(model.vision_tower)
        fully_shard(model)
        return model
    raise ValueError(f"parallel must be auto, none, ddp or fsdp, got {parallel!r}")


def no_sync(module: nn.Module, enabled: bool):
    """Skip gradient synchronisation for a non-final micro-batch (DDP no_sync / FSDP2 requires_gradient_sync)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def fsdp_no_sync():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()
