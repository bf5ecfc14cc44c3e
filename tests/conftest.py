"""Shared test setup: one CPU thread, `gpu` marker skipping, and a tiny checkpoint fixture."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
# Without a GPU, Triton kernels run in the interpreter. Triton reads this when a kernel is
# decorated, so it must be set before any flashport.kernels module is imported. The
# ahead-of-time compile test runs in a subprocess without it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA/ROCm GPU (torch.cuda.is_available() is false)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random DeepSeek-V4-Flash-shaped checkpoint (config, tokenizer, safetensors), seed 0."""
    from flashport.model.tiny import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny-model") / "tiny"
    write_tiny_checkpoint(path, seed=0)
    return path
