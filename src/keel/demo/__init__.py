"""``keel demo``: the first article's scenario, made visible.

Several real processes increment one shared counter at once, three ways: each in its own memory (the
article's broken ``LoanWorkflow``), through a shared record read and then blindly written back, and
with keel's ``store.update``. The first two lose updates every time; keel loses none.
"""

from __future__ import annotations

from keel.demo.report import Verdict, WayResult
from keel.demo.runner import DemoReport, DemoSettings, run_demo
from keel.demo.watch import DemoError

__all__ = ["DemoError", "DemoReport", "DemoSettings", "Verdict", "WayResult", "run_demo"]
