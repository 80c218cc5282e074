"""Fixtures shared by several test files."""
import os
import secrets

import numpy as np
import pytest

import kernels


@pytest.fixture
def rng():
    """A fresh random generator per test; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("KERNELS_TEST_SEED", secrets.randbits(32)))
    print(f"random seed {seed} (rerun with KERNELS_TEST_SEED={seed})")
    return np.random.default_rng(seed)


@pytest.fixture
def cpp_backend():
    """Run the test on the C++ kernels, restoring the previous backend choice afterwards."""
    previous = kernels.reference_enabled()
    kernels.use_reference(False)
    yield
    kernels.use_reference(previous)
