"""Host memory of a sharded branch on CPU: a random LLaMA of 0.44B parameters saved in bf16 as a
model folder, its base written by `hft-ray`'s own code (`initial_checkpoint`), then one HFT
stage (category, ratio 0.5, pure bf16 with Kahan AdamW) under `strategy: fsdp` on 2 processes
(torchrun, gloo), through the branch function every worker runs.

    python benchmarks/fsdp_memory.py             # 0.44B; about 3 min on 2 cores
    python benchmarks/fsdp_memory.py --tiny      # a 2-layer model, for a quick look

Figures per rank, as shares of the model's bf16 bytes, each above the same run on a tiny model
(the processes' own imports): the RSS growth over the sharded load (rank 1: its shards and the
tensor being broadcast; rank 0 also holds the whole model until it is sharded), and the stage's
peak (`memory/host_peak_gb/rank<r>`: the load, the shards' gradients and AdamW's three bf16
states for the trained half, activations). Writes benchmarks/results/fsdp_memory.json.

The workers run with MALLOC_MMAP_THRESHOLD_=65536. With glibc's default (a threshold that rises
to the largest block freed), the all-gathered units and unsharded gradients each step frees stay
in the heap, and the host RSS of a CPU rank grows to several times what it holds
(`--glibc-default`; benchmarks/results/fsdp_memory_glibc_default.json). On GPUs those buffers
live in torch's CUDA allocator, not in the host heap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

RESULT = Path(__file__).parent / "results" / "fsdp_memory.json"
MMAP_THRESHOLD = 65536  # glibc: larger blocks are mapped and handed back to the system when freed
SHAPES = {"0.44B": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24),
          "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)}


def model_folder(folder: Path, shape: str) -> int:
    from hft_ray.train.models import char_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_attention_heads=8, num_key_value_heads=4, vocab_size=32_000,
                                      max_position_embeddings=256, tie_word_embeddings=False, **SHAPES[shape])
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def base_of(source: Path, folder: Path) -> str:
    """The base as `hft-ray run` writes it."""
    from hft_ray.config.spec import parse_spec
    from hft_ray.run.base import initial_checkpoint
    from hft_ray.storage import Location

    spec = parse_spec({"name": "bench", "model": {"source": str(source)},
                       "domains": {"upper": {"source": "builtin:upper"}},
                       "stages": [{"domain": "upper", "steps": 1}], "methods": {"hft": {"kind": "hft"}}}, "bench")
    return initial_checkpoint(spec, Location(folder))


def job_file(base: str, folder: Path, steps: int) -> Path:
    import random

    from hft_ray.data.batching import part_of
    from hft_ray.data.domains import BUILTIN_DOMAINS
    from hft_ray.train.job import BranchJob, StageJob, TrainSettings
    from hft_ray.train.models import char_tokenizer

    rows = tuple(BUILTIN_DOMAINS["upper"].generate(random.Random(0), 64))
    parts = (part_of(rows, char_tokenizer(), folder / "tokens", max_length=32),)
    method = {"kind": "hft", "granularity": "category", "ratio": 0.5, "seed": 0}
    stage = StageJob(1, "hft stage 1/1 (upper)", parts, steps, 1e-5, 1, str(folder / "stage-1"), method)
    settings = TrainSettings(batch_size=4, max_length=32, log_every=steps, precision="bf16", strategy="fsdp")
    path = folder / "job.json"
    path.write_text(BranchJob("hft", base, (stage,), settings).to_json())
    return path


def worker(job_path: Path, out: Path) -> None:
    """Under torchrun: the branch, with each rank's RSS before and after the sharded load."""
    import torch.distributed as dist

    import hft_ray.train.runtime as runtime_module
    from hft_ray.train.branch import train_branch
    from hft_ray.train.channel import LocalChannel
    from hft_ray.train.events import StageTrained
    from hft_ray.train.job import BranchJob
    from hft_ray.train.loading import structure
    from hft_ray.train.peaks import _rss_bytes, _status_bytes

    job = BranchJob.load(job_path)
    structure(transformers.AutoConfig.from_pretrained(job.start), torch.bfloat16)  # imports, not weights
    transformers.AutoTokenizer.from_pretrained(job.start)
    figures = {"before": _rss_bytes()}
    shard = runtime_module.shard

    def measured(model, device, precision="fp32"):
        sharded = shard(model, device, precision)
        figures["loaded_peak"] = _status_bytes("VmHWM")
        return sharded

    runtime_module.shard = measured
    trained = []

    def keep(event) -> None:
        if isinstance(event, StageTrained):
            trained.append(event)

    train_branch(job, LocalChannel(job_path.parent, keep))
    rank = dist.get_rank()
    if trained:
        figures["stage_peaks_gb"] = trained[0].memory
    (out / f"rank-{rank}.json").write_text(json.dumps(figures))


def run(shape: str, steps: int, folder: Path, glibc_default: bool) -> dict:
    size = model_folder(folder / "source", shape)
    started = time.perf_counter()
    base = base_of(folder / "source", folder / "out")
    base_s = time.perf_counter() - started
    job = job_file(base, folder, steps)
    env = {**os.environ, **({} if glibc_default else {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__,
                             "--worker", str(job), str(folder)], capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    ranks = [json.loads((folder / f"rank-{r}.json").read_text()) for r in (0, 1)]
    from safetensors import safe_open

    with safe_open(f"{base}/model.safetensors", "pt") as f:
        base_dtypes = sorted({f.get_slice(k).get_dtype() for k in f.keys()})
    return {"shape": shape, "params": size // 2, "model_bytes": size, "base_dtypes": base_dtypes,
            "base_linked": os.path.samefile(f"{base}/model.safetensors", folder / "source" / "model.safetensors"),
            "base_s": round(base_s, 2), "ranks": ranks}


def shares(big: dict, tiny: dict) -> dict:
    """Each rank's growth above the tiny run, as shares of the big model's bytes."""
    out = {}
    for r in (0, 1):
        b, t = big["ranks"][r], tiny["ranks"][r]
        load = ((b["loaded_peak"] - b["before"]) - (t["loaded_peak"] - t["before"])) / big["model_bytes"]
        key = f"memory/host_peak_gb/rank{r}"  # every rank's, in rank 0's event
        stage = (big["ranks"][0]["stage_peaks_gb"][key] - tiny["ranks"][0]["stage_peaks_gb"][key]) * 2**30
        stage /= big["model_bytes"]
        out[f"rank{r}"] = {"load": round(load, 3), "stage_peak": round(stage, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--glibc-default", action="store_true", help="glibc's dynamic mmap threshold")
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    shape = "tiny" if args.tiny else "0.44B"
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        big = run(shape, args.steps, Path(a), args.glibc_default)
        tiny = run("tiny", args.steps, Path(b), args.glibc_default)
    flags = " --tiny" * args.tiny + " --glibc-default" * args.glibc_default
    result = {"command": "python benchmarks/fsdp_memory.py" + flags,
              "malloc_mmap_threshold": None if args.glibc_default else MMAP_THRESHOLD,
              "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "model": big, "baseline": tiny,
              "growth_as_model_shares": shares(big, tiny)}
    print(json.dumps(result["growth_as_model_shares"], indent=1))
    if not args.tiny:
        path = RESULT.with_stem(RESULT.stem + "_glibc_default" * args.glibc_default)
        path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
