"""The `hft-ray` command (console script `hft-ray = hft_ray.cli:main`)."""

from hft_ray.cli.main import main

__all__ = ["main"]
