"""The benches share the test suite's set-up: TRITON_INTERPRET=1 without a GPU, `gpu` tests skipped without one."""

from tests.conftest import pytest_collection_modifyitems  # noqa: F401  (importing it also sets TRITON_INTERPRET)
