"""Under torchrun, for tests/train/test_loading.py: load a model folder the way a branch's first
stage does under fsdp (rank 0 reads it, the others build its structure on the meta device, FSDP2
shards it, rank 0's weights are broadcast into the shards), then write what each rank saw:
its RSS before the load and its peak after it (bytes), whether tied weights are still one
tensor, and (rank 0) whether the gathered weights equal the folder's, bit for bit."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from hft_ray.train.job import TrainSettings
from hft_ray.train.loading import branch_model, structure
from hft_ray.train.peaks import _rss_bytes, _status_bytes
from hft_ray.train.runtime import start_runtime

folder, precision, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
runtime = start_runtime(1, "fsdp")
job = SimpleNamespace(settings=TrainSettings(strategy="fsdp", precision=precision))
# What the loading imports (the model's classes, the tokenizer) is not what it holds: warmed first.
structure(transformers.AutoConfig.from_pretrained(folder), torch.float32)
transformers.AutoTokenizer.from_pretrained(folder)
before = _rss_bytes()
model, _ = branch_model(str(folder), job, runtime)
model = runtime.wrap(model)
peak = _status_bytes("VmHWM")
tied = model.lm_head.weight is model.get_input_embeddings().weight
gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
largest = max(p.numel() * p.element_size() for p in model.parameters())
report = {"rank": runtime.rank, "largest": largest, "before": before, "peak": peak, "tied": tied,
          "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
if runtime.rank == 0:
    saved = load_file(str(folder / "model.safetensors"))
    target = torch.bfloat16 if precision == "bf16" else torch.float32
    report["equal"] = all(torch.equal(gathered[name], saved[name].to(target)) for name in saved)
    report["missing"] = sorted(set(saved) - set(gathered))
(out / f"rank-{runtime.rank}.json").write_text(json.dumps(report))
dist.destroy_process_group()
