"""pytest fixtures shared by the ``qat`` tests (helpers live in ``qat_testutils``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """``torch.round`` is ~400x slower with 2 intra-op threads than with 1 on the 2-core CI box; keep tests fast."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
