"""Fixtures for the whole suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread_for_the_session() -> Iterator[None]:
    """Every test sees one intra-op thread, whichever tests are selected and in whatever order.

    Two reasons: ``torch.round`` is ~400x slower with 2 intra-op threads than with 1 on a 2-core machine, and a
    reduction's floating-point result depends on how it is split across threads, so a pinned count keeps seeded runs
    bit-reproducible whether a test runs alone or in the full suite.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
