"""bench/gpu_checks.sh refuses what it cannot run before it writes anything, and keeps to its budget."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_checks.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("args, message", [
    ([], "usage: bash bench/gpu_checks.sh OUTDIR [PHASES"),
    (["{out}", "tests,benches"], "unknown phase 'benches'"),
    (["{out}", "tests", "300", "extra"], "usage: bash bench/gpu_checks.sh OUTDIR [PHASES"),
    (["{out}", "tests", "5m"], "BUDGET_S must be whole seconds, got '5m'"),
])
def test_bad_arguments_exit_2_with_the_usage_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "logs"
    run = subprocess.run(["bash", str(SCRIPT), *(a.format(out=out) for a in args)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert run.returncode == 2 and message in run.stderr
    assert "tests,runtime,bench,kernels" in run.stderr  # the phases it knows
    assert not out.exists()


def test_phases_run_in_the_order_given_and_a_spent_budget_skips_them(tmp_path):
    # a budget of 0 s leaves no phase its 60 s minimum: each is listed as skipped, in the order asked
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "logs"), "bench,tests", "0"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    summary = (tmp_path / "logs" / "summary.txt").read_text()
    assert "== bench: skipped" in summary and "== tests: skipped" in summary
    assert summary.index("== bench") < summary.index("== tests") and "runtime" not in summary
    assert not list((tmp_path / "logs").glob("*.log"))  # nothing ran


def test_graphopt_is_installed_first_where_it_does_not_import_and_a_failed_install_stops_the_run(tmp_path):
    fake = tmp_path / "python"  # a Python without graphopt whose pip cannot install it (no registry)
    fake.write_text('#!/usr/bin/env bash\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "no index reachable"; fi\n'
                    "exit 1\n")
    fake.chmod(0o755)
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "logs"), "tests", "300"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120, env={**os.environ, "PYTHON": str(fake)})
    assert run.returncode == 1
    summary = (tmp_path / "logs" / "summary.txt").read_text()
    assert "== install: " in summary and "pip install --no-deps --no-build-isolation -e ." in summary
    assert "no index reachable" in summary and "== tests" not in summary
