"""Print what the verl tests measured (verl's built-in Dr. GRPO against the whole-batch objective)."""

from verl_env import MEASURED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if MEASURED:
        terminalreporter.section("verl 0.9.1: gradient against the whole mini-batch's Dr. GRPO gradient")
        for line in MEASURED:
            terminalreporter.write_line(line)
