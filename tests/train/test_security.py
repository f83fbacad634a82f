"""Security defaults (docs/design.md): checkpoints load from safetensors only, never pickle.
(Token auth and loopback-only servers: tests/cli/test_cluster.py; trust_remote_code:
tests/config/test_spec.py.)"""

from pathlib import Path

import pytest
import torch

from hft_ray.train.checkpoints import load_checkpoint, write_checkpoint
from hft_ray.train.models import char_tokenizer, load_model


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_with_pickled_weights_is_refused_without_unpickling(tmp_path):
    folder = Path(write_checkpoint(tmp_path / "ckpt", load_model("builtin:tiny-llama"), char_tokenizer()))
    (folder / "model.safetensors").unlink()
    torch.save({"payload": Payload(str(tmp_path / "pwned"))}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_checkpoint(folder)
    assert not (tmp_path / "pwned").exists()


def test_a_safetensors_checkpoint_round_trips(tmp_path):
    model = load_model("builtin:tiny-llama", seed=3)
    loaded, _ = load_checkpoint(write_checkpoint(tmp_path / "ckpt", model, char_tokenizer()))
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)  # every tensor, none missing or extra
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
