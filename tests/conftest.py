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


@pytest.fixture(params=["cpp", "reference"])
def backend(request):
    """Run the test once on the C++ kernels and once on the reference, restoring the choice after."""
    previous = kernels.reference_enabled()
    kernels.use_reference(request.param == "reference")
    yield request.param
    kernels.use_reference(previous)


@pytest.fixture
def cpp_backend():
    """Run the test on the C++ kernels, restoring the previous backend choice afterwards."""
    previous = kernels.reference_enabled()
    kernels.use_reference(False)
    yield
    kernels.use_reference(previous)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors: with two OpenMP threads on two shared,
    busy cores every parallel region waits for a descheduled thread (a 20 ms step took 0.1-5 s
    here). Modules take it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="module")
def own_cache_dir(tmp_path_factory):
    """Every test module starts with an empty cache directory of its own (the synthetic sets and
    the measured peak FLOP/s go there, for this process and the subprocesses it starts), so no
    test passes because an earlier run or another module left something behind. Within a module
    a later test may find what an earlier one generated; each still passes alone."""
    previous = os.environ.get("DEEPLAB_CACHE")
    os.environ["DEEPLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["DEEPLAB_CACHE"]
    if previous is None:
        os.environ.pop("DEEPLAB_CACHE", None)
    else:
        os.environ["DEEPLAB_CACHE"] = previous
