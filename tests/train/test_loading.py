"""A branch's model under fsdp (hft_ray/train/loading.py): rank 0 alone reads the checkpoint, the
other ranks hold its structure on the meta device until FSDP2 has sharded it and rank 0's weights
are broadcast into the shards. Run under torchrun with 2 CPU processes (gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from hft_ray.train.models import char_tokenizer

HERE = Path(__file__).parent


def model_folder(folder: Path, dtype: torch.dtype, **config) -> int:
    """A random LLaMA saved as a model folder in `dtype`; its bytes."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{"num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32_000,
                                         "max_position_embeddings": 256, **config})
    model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def load_on_two_ranks(folder: Path, precision: str) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(HERE / "torchrun_load.py"), str(folder), precision, str(folder)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in (0, 1)]


def test_every_rank_gets_the_checkpoints_weights_in_its_training_dtype_and_tied_ones_stay_tied(tmp_path):
    """A bf16 folder trained in bf16 (fp32 sharded loading runs in tests/train/test_branch.py, whose
    fsdp losses match ddp's)."""
    model_folder(tmp_path, torch.bfloat16, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 tie_word_embeddings=True)
    ranks = load_on_two_ranks(tmp_path, "bf16")
    assert ranks[0]["equal"] and not ranks[0]["missing"], ranks[0]
    assert all(r["tied"] and r["dtypes"] == ["torch.bfloat16"] for r in ranks), ranks


def test_the_second_rank_never_holds_a_whole_copy(tmp_path):
    """A 168M-parameter LLaMA in bf16 (305 MiB): the second rank's RSS grows by its half of the
    weights and the one tensor being broadcast (at most the 62 MiB embedding here; 1/16 of
    Llama-3-8B), where reading it whole in float32 and casting it grew by 4x the model's bytes.
    Measured: 0.71-0.78 (rank 1; the bound is 0.91) and 1.5-1.9 (rank 0, which holds the whole
    model until it is sharded)."""
    size = model_folder(tmp_path, torch.bfloat16, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                        tie_word_embeddings=False)
    ranks = load_on_two_ranks(tmp_path, "bf16")
    growth = [(r["peak"] - r["before"]) / size for r in ranks]
    bound = 0.5 + 1.5 * ranks[1]["largest"] / size + 0.1  # a half, the broadcast tensor and its slice, 10% slack
    message = f"growth as shares of the model's {size / 2**20:.0f} MiB: {growth}, bound {bound:.2f}"
    print(message)
    assert growth[1] < bound < 1, message
    assert ranks[0]["equal"]
