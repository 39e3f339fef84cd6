"""The moment this process began running turbovae: imported first by the package (``__init__``), so
that ``runtime.process_seconds`` (summary.json's ``total_seconds``) counts this process's own time, its
imports included, and not that of a shell that ran before and then ``exec``-ed it (the kernel's start
time of a process is the fork's, which ``exec`` keeps)."""

import time

STARTED = time.perf_counter()
