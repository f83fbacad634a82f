"""The package's boundaries, as docs/design.md draws them: the core and the data need neither
Ray nor MLflow; the function every worker runs needs only torch and transformers (a GPU machine
has no Ray, MLflow, pydantic or datasets); modules stay short."""

import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "hft_ray"


def modules_after_import(*names: str) -> set[str]:
    code = f"import sys; import {', '.join(names)}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {m.split(".")[0] for m in out.split()}


def package_modules(folder: str) -> list[str]:
    return [f"hft_ray.{folder}.{p.stem}" for p in sorted((PACKAGE / folder).glob("*.py")) if p.stem != "__init__"]


def test_the_core_and_the_data_import_neither_ray_nor_mlflow():
    loaded = modules_after_import(*package_modules("core"), *package_modules("data"))
    assert "torch" in loaded, "the check itself imports what it should"
    assert not {"ray", "mlflow"} & loaded


def test_the_train_function_imports_only_torch_and_transformers():
    loaded = modules_after_import("hft_ray.train.branch", "hft_ray.train.__main__", *package_modules("train"))
    assert {"torch", "transformers"} <= loaded
    assert not {"ray", "mlflow", "pydantic", "datasets"} & loaded


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_readable_in_one_sitting(path):
    assert len(path.read_text().splitlines()) <= 300
