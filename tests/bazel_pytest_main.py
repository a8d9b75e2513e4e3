"""Entry point of the Bazel py_test targets: runs pytest on one test file.

Bazel runs `py_test` targets as plain Python programs; this runs the test
file given as argument under pytest (so `tests/conftest.py` applies), with
the multi-process tests (marked `slow`) deselected: those run with pytest
only (`make test`).
"""

import sys

import pytest

if __name__ == "__main__":
    sys.exit(
        pytest.main(
            ["-q", "-m", "not slow", "-p", "no:cacheprovider", *sys.argv[1:]]
        )
    )
