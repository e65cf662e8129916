"""Suite-wide test policy.

Threads: tiny models run fastest on one thread (their operations are too small to split, and on a shared
2-core machine two threads made them 3-40× slower); tests marked ``full_size`` (the full SD 1.5 shapes) get
every core.
"""

import os

import pytest
import torch

from ldm.config import tiny_sd1
from ldm.model import StableDiffusion


def pytest_configure(config):
    config.addinivalue_line("markers", "full_size: runs the full SD 1.5 shapes; uses every CPU core")


@pytest.fixture(autouse=True)
def torch_threads(request):
    previous = torch.get_num_threads()
    full_size = request.node.get_closest_marker("full_size") is not None
    torch.set_num_threads((os.cpu_count() or 1) if full_size else 1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """An editlab weights file of a random tiny SD 1-style model (for command-line tests)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    StableDiffusion(tiny_sd1()).save(path)
    return path
