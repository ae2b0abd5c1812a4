"""Keep the training process's random state and thread count across calls into an engine.

Creating a vLLM engine re-seeds the process ("The global random seed is set to ...": python's
``random``, numpy and torch) and sets torch to one CPU thread; generating may draw from the global
generators too. A run's own draws (dropout, anything seeded by ``train.seed``) and its speed must
not depend on whether an engine was used, or on a resume, so every engine call runs inside
:func:`kept_process_state`: what it changed is put back afterwards.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def kept_process_state() -> Iterator[None]:
    """Run the body, then restore python's, numpy's and torch's random states (CPU, and every CUDA
    device once CUDA is in use) and torch's CPU thread count as they were before it."""
    py = random.getstate()
    npy = np.random.get_state()
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
