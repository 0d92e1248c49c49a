"""Test-suite wiring: markers and what they imply.

* ``slow``: seconds each (inductor compiles, soak loops, examples); left out
  of the quick loop ``pytest -m "not slow"``.
* ``subprocess``: starts Python processes (torchrun jobs, examples, fresh
  interpreters); always slow too.
* ``cuda``: needs pmap to run on GPUs; skipped without one, or with
  ``TORCHPMAP_PLATFORM=cpu`` (which runs the virtual-device suite on a GPU machine).
"""

import pytest

from torchpmap import _devices


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = _devices.platform() == "cuda"
    for item in items:
        if item.get_closest_marker("subprocess") is not None:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("cuda") is not None and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (and TORCHPMAP_PLATFORM unset or cuda)"))
