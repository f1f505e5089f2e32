import os
import warnings

# Triton kernels run on CPU tensors through Triton's interpreter. Triton reads this when a kernel
# is defined, and other tests import Triton (through inductor) before tests/kernels/test_kernels.py runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Under pytest-xdist (``-n 2``) each worker gets its share of the cores: more threads than cores only makes the
# workers' intra-op threads wait on each other.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))
warnings.filterwarnings("ignore", message=".*requires torchvision.*")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
