"""Process-group set-up for runs launched by torchrun.

torchrun starts one process per device and passes its place in the group through the
environment: RANK (global index), LOCAL_RANK (index on this machine) and WORLD_SIZE. Without
those variables a run is an ordinary single process. GPUs use the NCCL backend, CPUs gloo.

NOTE: DistributedDataParallel is tested on CPU with gloo (tests/test_distributed.py). FSDP needs an
accelerator (torch 2.13 raises on CPU), and the FSDP path of train() has not yet been run on GPUs,
so treat parallel="fsdp" as untested.
"""

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessGroupInfo:
    rank: int  # global rank; rank 0 writes files and prints
    world_size: int
    local_rank: int  # selects the GPU on this machine
    device: str  # "cuda:<local_rank>" or "cpu"
    initialised: bool  # whether this call created a process group (so shutdown destroys it)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str = "auto") -> ProcessGroupInfo:
    """Join the process group torchrun describes, or return a one-process description.

    device="auto" uses this process's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU.
    """
    if not launched_by_torchrun():
        resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        return ProcessGroupInfo(0, 1, 0, resolved, False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
        resolved = f"cuda:{local_rank}"
    else:
        resolved = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    log.info("process group rank=%d world_size=%d device=%s", rank, world, resolved)
    return ProcessGroupInfo(rank, world, local_rank, resolved, True)


def barrier(info: ProcessGroupInfo) -> None:
    if info.initialised:
        dist.barrier()


def shutdown(info: ProcessGroupInfo) -> None:
    if info.initialised and dist.is_initialized():
        dist.destroy_process_group()
