"""Test-suite wiring: markers and what they imply.

* ``slow``: seconds each (inductor compiles, soak loops, examples); left out
  of the quick loop ``pytest -m "not slow"``.
* ``subprocess``: starts Python processes (torchrun jobs, examples, fresh
  interpreters); always slow too.
* ``cuda``: needs a GPU; skipped without one.
"""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("subprocess") is not None:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("cuda") is not None and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
