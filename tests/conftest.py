import os

# Tests run offline: a hub lookup that cannot connect would retry for half a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest on one thread, and two OpenMP pools spinning on 2 cores (pytest
# beside a Ray worker) slow each other down by an order of magnitude.
torch.set_num_threads(1)

from hft_ray.models import BUILTIN_CONFIGS, load_model  # noqa: E402

TINY_MODELS = sorted(BUILTIN_CONFIGS)


@pytest.fixture(params=TINY_MODELS)
def tiny_model(request):
    """Each built-in tiny architecture, with weights, in eval mode (no dropout)."""
    return load_model(f"builtin:{request.param}", seed=0).eval()
