"""The process a branch trains in: threads, denormals, the process group, the device, DDP.

Under Ray Train the process group exists already (TorchTrainer sets it up and the RANK,
LOCAL_RANK, WORLD_SIZE variables); under torchrun it is created here from the same variables;
alone, there is none (world size 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hft_ray.train.peaks import HostPeak
from hft_ray.train.precision import cast


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    device: torch.device
    strategy: str = "ddp"      # ddp | fsdp
    host_peak: HostPeak = field(default_factory=HostPeak, compare=False, repr=False)

    @property
    def sharded(self) -> bool:
        """FSDP2 in a process group (alone, fsdp has nothing to shard over: plain training)."""
        return self.strategy == "fsdp" and dist.is_initialized()

    def wrap(self, model: torch.nn.Module, precision: str = "fp32") -> torch.nn.Module:
        """Freeze before this: DDP fixes the parameters it synchronises when it wraps, and FSDP2
        gives frozen parameters no gradient and no optimizer state on any rank."""
        if self.sharded:
            return shard(model, self.device, precision)
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def place(self, model: torch.nn.Module, job) -> torch.nn.Module:
        """The model on this worker's device, in the precision it trains in, with activations
        recomputed in the backward pass if the job asks (transformers' own checkpointing)."""
        model = cast(model, job.settings.precision)
        if not self.sharded:  # FSDP2 moves each unit to the device as it shards it (train/loading.py)
            model = model.to(self.device)
        if job.settings.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def reset_memory_peaks(self) -> None:
        """Start this process's peak memory figures afresh (train/peaks.py says how, per system)."""
        self.host_peak.reset()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def memory_peaks(self) -> dict[str, float]:
        """Every rank's peak host RSS since `reset_memory_peaks` (GB, `memory/host_peak_gb/rank<r>`)
        and, on GPUs, the largest rank's peak allocated and reserved memory. Every rank must call it."""
        mine = {"host": self.host_peak.gb()}
        if self.device.type == "cuda":
            mine["allocated"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            mine["reserved"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        every = [mine]
        if self.world > 1:
            every = [None] * self.world
            dist.all_gather_object(every, mine)
        peaks = {f"memory/host_peak_gb/rank{rank}": m["host"] for rank, m in enumerate(every)}
        if self.device.type == "cuda":
            peaks["memory/gpu_peak_gb"] = max(m["allocated"] for m in every)
            peaks["memory/gpu_reserved_gb"] = max(m["reserved"] for m in every)
        return peaks

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks (every rank must call it)."""
        if self.world == 1:
            return float(value)
        box = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(box)
        return float(box.item()) / self.world

    def broadcast(self, value):
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def shard(model: torch.nn.Module, device: torch.device, precision: str = "fp32") -> torch.nn.Module:
    """FSDP2: each decoder layer a unit (the classes transformers names in `_no_split_modules`,
    as accelerate's FSDP does), then the root (embeddings, final norm, lm_head, tied or not).
    Weights, gradients and optimizer state are split over the ranks; FSDP1 is not used (with
    mixed `requires_grad` in a unit it needs `use_orig_params` and saves no gradient memory,
    pytorch#104690). Rank 0 holds the weights, which are then broadcast into every rank's shards.
    bf16-mixed: float32 shards and AdamW state; each unit gathered in bf16 for its forward and
    backward, its gradients reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from hft_ray.train.loading import fill_from_rank0

    whole = model.state_dict() if dist.get_rank() == 0 else {}  # kept alive while FSDP2 moves and splits
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16-mixed" else MixedPrecisionPolicy()
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    fill_from_rank0(model, whole, device)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP (FSDP2 shards the model in place: it is its own)."""
    return getattr(model, "module", model)


def start_runtime(threads: int, strategy: str = "ddp") -> Runtime:
    """Join (or, under torchrun, create) the process group and set up this process for training."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        # Ray Train may show a worker every GPU of its node or only its own: either way this is it.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # One intra-op thread per CPU this worker holds: a 1-CPU worker spinning two OpenMP
        # threads beside another worker slows both down.
        torch.set_num_threads(max(1, threads))
        # Adam's second moments underflow into denormal floats, which x86 handles in microcode:
        # an FFT step of SmolLM2 took 42-48 s with them, 5-6 s without (benchmarks/README.md).
        torch.set_flush_denormal(True)
    return Runtime(dist.get_rank() if dist.is_initialized() else 0, world, device, strategy)
