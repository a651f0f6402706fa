"""The benchmarks' warm starts: seconds spent in a fresh Python process, as a user's next run spends them."""

from __future__ import annotations

import os
import subprocess
import sys

# argv: saved folder, inputs file (torch.save of a tuple), target. Prints: total, import, load, first call,
# then the load's phases from its report (LOAD_PHASES; 0 for a phase the load did not have).
LOAD_PHASES = ("files", "graph", "package", "lowering", "forwards")
LOAD_SAVED = f"""
import sys, time
start = time.perf_counter()
import torch, graphopt
imported = time.perf_counter()
module = graphopt.load(sys.argv[1], target=sys.argv[3])
loaded = time.perf_counter()
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    module(*inputs)
if torch.cuda.is_available():
    torch.cuda.synchronize()
end = time.perf_counter()
phases = module.report.load_s or {{}}
print(end - start, imported - start, loaded - imported, end - loaded,
      *(phases.get(k, 0.0) for k in {LOAD_PHASES!r}))
"""

# argv: model name (a reference generator, or a GPU benchmark denoiser at its CPU scale), inputs file,
# bench folder. Prints: total, import, compile and first call (Inductor's on-disk caches as the environment
# leaves them: warm after a compile of the same model and shapes).
COMPILE_MODEL = """
import sys, time
start = time.perf_counter()
import torch
import graphopt.models  # the model's code, as the user's process imports it
sys.path.insert(0, sys.argv[3])
from _inputs import cpu_model
imported = time.perf_counter()
model = cpu_model(sys.argv[1])[0]
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    torch.compile(model, dynamic=False)(*inputs)
end = time.perf_counter()
print(end - start, imported - start, end - imported)
"""

# argv: a .pt2 file. Prints: seconds torch.export.load takes to read it.
READ_PROGRAM = """
import sys, time
import torch
start = time.perf_counter()
torch.export.load(sys.argv[1])
print(time.perf_counter() - start)
"""


def run_fresh(code: str, *argv: str | os.PathLike) -> list[float]:
    """Runs ``code`` in a fresh interpreter (this one's environment) and returns the numbers of its last
    line; raises RuntimeError with the last line of its stderr when it fails."""
    out = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                         env=dict(os.environ), check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed")
    return [float(v) for v in out.stdout.strip().splitlines()[-1].split()]
