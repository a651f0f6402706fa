"""bench/gpu_checks.sh refuses what it cannot run before it writes anything."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_checks.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("args, message", [
    ([], "usage: bash bench/gpu_checks.sh OUTDIR [PHASES]"),
    (["{out}", "tests,benches"], "unknown phase 'benches'"),
    (["{out}", "tests", "extra"], "usage: bash bench/gpu_checks.sh OUTDIR [PHASES]"),
])
def test_bad_arguments_exit_2_with_the_usage_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "logs"
    run = subprocess.run(["bash", str(SCRIPT), *(a.format(out=out) for a in args)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert run.returncode == 2 and message in run.stderr
    assert "tests,runtime,bench,kernels" in run.stderr  # the phases it knows
    assert not out.exists()
