"""Context parallelism for the benchmarks: the processes ``torchrun`` starts, diffusers' own engine.

``torchrun --nproc-per-node N -m omni_compile.bench.e2e --cp ulysses ...`` runs one process per GPU (per
CPU process with ``--cpu-smoke``): :func:`init` joins them (NCCL on GPUs, gloo on CPUs), :func:`enable`
shards the model with ``model.enable_parallelism(ContextParallelConfig(...))``; the backend then finds its
sites through diffusers' collectives (docs/runtime.md, "Context parallelism"). Nothing here runs a
parallel loop of its own: every rank runs the benchmark's loop on its shard.
"""

from __future__ import annotations

import os
import sys

import torch

MODES = ("none", "ulysses", "ring")


def init(mode: str) -> tuple:
    """``(rank, world)`` of this process, joined to the others ``torchrun`` started (``(0, 1)`` for
    ``mode="none"``). Ranks other than 0 print nothing (their numbers are rank 0's, the loop is SPMD)."""
    if mode == "none":
        return 0, 1
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise SystemExit(f"--cp {mode} runs under torchrun: torchrun --nproc-per-node N -m omni_compile.bench.e2e "
                         f"--cp {mode} ...")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        # diffusers 0.42.1 places each rank on device `rank % torch.accelerator.device_count()`, which is 0 on
        # a CPU build of torch (ZeroDivisionError)
        torch.accelerator.device_count = lambda: 1
    rank = dist.get_rank()
    if rank:
        sys.stdout = open(os.devnull, "w")
    return rank, dist.get_world_size()


def enable(model, mode: str, world: int) -> None:
    """Shard ``model`` over the ``world`` ranks: Ulysses (heads inside attention) or ring (keys and values
    all-gathered; on GPUs through diffusers' ``_native_cudnn`` attention, on a CPU through
    :func:`ring_on_cpu`)."""
    from diffusers import ContextParallelConfig

    if getattr(type(model), "_cp_plan", None) is None:
        raise SystemExit(f"diffusers gives {type(model).__name__} no context-parallel plan (_cp_plan)")
    if mode == "ring":
        if torch.cuda.is_available():
            # diffusers' default (native SDPA) refuses ring: it returns no log-sum-exp; cuDNN's does
            model.set_attention_backend("_native_cudnn")
        else:
            ring_on_cpu()
    cfg = ContextParallelConfig(ulysses_degree=world) if mode == "ulysses" else ContextParallelConfig(ring_degree=world)
    model.enable_parallelism(config=cfg, cp_plan=cp_plan(model))


def cp_plan(model) -> dict:
    """The model's ``_cp_plan``, minus Wan's ``""`` entry: it shards ``timestep`` expecting Wan 2.2's
    per-token 2-D timesteps, and for a 1-D one diffusers 0.42.1 calls ``logger.warning_once``, which its
    logger does not have (``AttributeError``, eager too)."""
    plan = dict(type(model)._cp_plan)
    if type(model).__name__.startswith("Wan"):
        plan.pop("", None)
    return plan


def ring_on_cpu() -> None:
    """diffusers 0.42.1 runs ring attention only with a backend that returns the log-sum-exp; its native
    (SDPA) op refuses (``return_lse=True``) and the flash/cuDNN ones have no CPU kernel. This gives the
    native op an lse path through ``aten._scaled_dot_product_flash_attention_for_cpu`` (what a GPU run gets
    from ``_native_cudnn`` / ``_native_flash``), so ring runs on CPU ranks."""
    import diffusers.models.attention_dispatch as ad

    orig = ad._native_attention_forward_op
    if getattr(orig, "_omni_lse", False):
        return

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return orig(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                        _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        return out.permute(0, 2, 1, 3), lse.transpose(1, 2)

    forward_op._omni_lse = True
    ad._native_attention_forward_op = forward_op


def gather(value, world: int) -> list:
    """``value`` of every rank (a small Python object), in rank order."""
    if world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def finish(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
