"""pytest fixtures shared by the ``qat`` tests (helpers live in ``qat_testutils``; the thread count is pinned for the
whole suite in ``tests/conftest.py``)."""
