"""A torchrun rank that runs `mixer ARGS`, then writes what a test of how ranks end needs to
$RANK_REPORTS/rank-RANK.json (files: the ranks' stdout lines could interleave): when `main` returned, and
which threads its process still has (from Linux's /proc)."""

import json
import os
import sys
import time
from pathlib import Path

from mlpmixer.cli import main

code = main(sys.argv[1:])
threads = sorted(Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task"))
report = {"rank": int(os.environ["RANK"]), "returned": time.time(), "threads": threads}
(Path(os.environ["RANK_REPORTS"]) / f"rank-{report['rank']}.json").write_text(json.dumps(report))
sys.exit(code)
