"""Seconds and peak memory of loading a model, measured in a fresh process.

ru_maxrss cannot measure a step inside a process: Linux carries the parent's high-water
mark across fork and exec, so a child of a large process (a test run) reports the parent's
peak. Instead the child resets its own high-water mark (writing 5 to /proc/self/clear_refs)
after its imports, loads, and reads VmHWM against the RSS it started from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import gc, json, sys, time
from pathlib import Path
from engine.loader.model_loader import load_model
import engine.backends.cpu  # the engine's imports, before the baseline

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

gc.collect()
base = status("VmRSS")
try:
    Path("/proc/self/clear_refs").write_text("5")
    reset = True
except OSError:  # a kernel without it: the peak figure would include the parent's
    reset = False
t0 = time.perf_counter()
loaded = load_model(sys.argv[1])
seconds = time.perf_counter() - t0
print(json.dumps({"load_s": seconds, "peak_growth": status("VmHWM") - base if reset else None,
                  "weights": loaded.weights.nbytes, "note": loaded.note}))
"""


def measure_load(path: Path, env: dict[str, str]) -> dict:
    """{load_s, peak_growth (bytes; None where the kernel cannot reset the peak), weights
    (bytes), note} of `load_model(path)` in a new process with environment `env`."""
    run = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], env=env,
                         cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(run.stdout.strip().splitlines()[-1])
