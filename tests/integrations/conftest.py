"""The integration tests' set-up: one CPU thread for the tiny model, and a summary of what the verl tests measured."""

import pytest
import torch

from verl_env import MEASURED


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model runs fastest on one thread (and does not fight other jobs for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if MEASURED:
        terminalreporter.section("verl 0.9.1: gradient against the whole mini-batch's Dr. GRPO gradient")
        for line in MEASURED:
            terminalreporter.write_line(line)
