"""Root conftest: decides, once per process and before anything imports triton, whether
Triton kernels run compiled (a CUDA device is present) or under Triton's interpreter.

Triton reads `TRITON_INTERPRET` when a kernel is decorated, so it must be set before the first
`import triton` (transformers may import it too); an explicit value in the environment wins.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def nan_empty(monkeypatch):
    """Fill every `torch.empty` with NaN (integers: their max value) so that a kernel reading
    memory it never wrote fails its comparison. Use it in kernel tests only."""
    original = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = original(*args, **kwargs)
        if tensor.is_floating_point():
            tensor.fill_(math.nan)
        elif tensor.dtype != torch.bool and not tensor.is_complex():
            tensor.fill_(torch.iinfo(tensor.dtype).max)
        return tensor

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    yield
