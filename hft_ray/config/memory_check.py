"""The memory preflight: a pipeline whose branches cannot fit the workers' memory is refused
before anything starts (exit 2), with the estimate and what would fit (hft_ray/core/memory.py)."""

from __future__ import annotations

from hft_ray.config.spec import FFTMethod, HFTMethod, PipelineSpec
from hft_ray.core.memory import GiB, Setup, Shapes, estimate, what_fits
from hft_ray.train.methods import method_class

# The largest memory each GPU type Ray names comes with (GiB; an A100 has 40 or 80): a cluster is
# checked against the largest, so the preflight never refuses what the workers' GPUs could hold.
GPU_MEMORY_GIB = {"V100": 32, "P100": 16, "T4": 16, "P4": 8, "K80": 12, "A10G": 24, "L4": 24, "L40S": 48,
                  "A100": 80, "H100": 94, "H200": 141, "H20": 96, "B200": 192, "B300": 288, "GB200": 192,
                  "GB300": 288, "RTX-PRO-6000": 96}


def cluster_gpu_memory(accelerators: tuple[str, ...]) -> tuple[float, str] | None:
    """Bytes a worker's GPU has at most, from the GPU types Ray detected on the cluster's nodes;
    None if it names none that is known."""
    known = [(GPU_MEMORY_GIB[a], a) for a in accelerators if a in GPU_MEMORY_GIB]
    if not known:
        return None
    gib, name = max(known)
    return gib * GiB, f"the cluster's {name} GPUs (up to)"


def worker_memory(spec: PipelineSpec) -> tuple[float, str] | None:
    """Bytes a worker has, and where the figure comes from: `train.memory_gb`, else the GPU as
    torch reports it (with use_gpu, on a machine that has one); else unknown (no check)."""
    if spec.train.memory_gb:
        return spec.train.memory_gb * GiB, "train.memory_gb"
    import torch

    if spec.train.use_gpu and torch.cuda.is_available():
        device = torch.cuda.get_device_properties(0)
        return device.total_memory, f"the {device.name}'s"
    return None


def setup_of(spec: PipelineSpec) -> Setup:
    t = spec.train
    # Activations are held for one forward pass: a micro-batch's sequences on each worker.
    per_forward = t.micro_batch_size * t.workers if t.micro_batch_size else t.batch_size
    return Setup(spec.precision, t.strategy, t.workers, per_forward, t.max_length, t.gradient_checkpointing,
                 t.bf16_kahan)


def check_memory(spec: PipelineSpec, model, known: tuple[float, str] | None = None) -> list[str]:
    """Every branch (and pretraining) that cannot fit, named with its estimate and what would;
    against `known` (bytes, where the figure comes from), else `worker_memory`."""
    known = known or worker_memory(spec)
    if known is None:
        return []
    limit, where = known
    shapes, setup = Shapes.of(model), setup_of(spec)
    branches = {f"methods.{name}": method for name, method in spec.methods.items()}
    if spec.pretrain:
        branches["pretrain"] = FFTMethod(kind="fft")  # pretraining trains every parameter
    problems = []
    for key, method in branches.items():
        kind = method_class(method.kind)
        count = kind.trained_params(model, method)
        need = estimate(shapes, count, setup)
        if need.peak <= limit:
            continue
        parts = need.gib()
        # What HFT at its defaults would train, offered where the method trains everything.
        hft = method_class("hft").trained_params(model, HFTMethod(kind="hft")) if kind.trains_everything else None
        fits = what_fits(shapes, count, setup, limit, hft)
        problems.append(
            f"{key}: needs about {parts['peak']} GiB per worker (weights {parts['weights']}, gradients "
            f"{parts['gradients']}, AdamW state {parts['optimizer']}, step temporaries {parts['step_temporaries']}, "
            f"activations {parts['activations']}), more than {where} {limit / GiB:.3g} GiB; "
            + (f"would fit: {'; '.join(fits)}" if fits else "no single change of precision, checkpointing, "
               "sharding or method makes it fit; set train.micro_batch_size (gradient accumulation), or lower "
               "train.max_length"))
    return problems
