"""A torchrun rank that runs `mixer ARGS`, then reports what a test of how ranks end needs, as one JSON line on
stdout: when `main` returned, and which threads its process still has (from Linux's /proc)."""

import json
import os
import sys
import time
from pathlib import Path

from mlpmixer.cli import main

code = main(sys.argv[1:])
threads = sorted(Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task"))
print(json.dumps({"rank": int(os.environ["RANK"]), "returned": time.time(), "threads": threads}), flush=True)
sys.exit(code)
