import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repo is a flat set of scripts, not a package


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """A test that runs a training script in this process may leave its stop-signal handlers behind (run_main
    ignores SIGTERM once a run stopped on it, as the process leaves). Every later child would inherit SIG_IGN, and a
    multiprocessing pool's terminate() could not end it: restore them after each test."""
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    saved = {sig: signal.getsignal(sig) for sig in stop_signals}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
