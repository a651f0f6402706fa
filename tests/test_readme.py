"""Every fenced block of README.md runs as written in a fresh empty folder, and again when it wrote anything there.

A ```python block runs as a script with this interpreter. A ```bash block runs its command chain
without the ``pip install`` steps: installing graphopt is what CI does before the suite starts
(``.ci/run``), and a test must not reinstall the package it is testing. Both runs must exit 0: the
second catches a snippet that refuses its own output (a save without ``overwrite=True``). A block that
left its folder empty has no output to refuse and runs once.

A block says how it is run on the line before its fence, in an HTML comment that does not render:

    <!-- readme-test: slow -->            runs, marked slow (a search, a benchmark)
    <!-- readme-test: gpu -->             runs, needs a CUDA GPU and compiled kernels (skipped without
                                          one, or under TRITON_INTERPRET=1, as tests/autotune's GPU tests)
    <!-- readme-test: slow, gpu -->
    <!-- readme-test: skip (the reason) -->   never runs; the reason is required

A block of another language, or a comment that is malformed or precedes no fence, fails
``test_every_block_runs_or_says_why_not``. Test ids name the section and the block's number in it.
"""

import dataclasses
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
RUNNABLE = ("python", "bash")
FLAGS = {"slow", "gpu"}
MARKER = re.compile(r"\s*<!--\s*readme-test:(?P<text>.*?)-->\s*")  # the whole line
SKIP = re.compile(r"skip\s*\((?P<reason>.*\S.*)\)")
TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Block:
    id: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    flags: frozenset[str] = frozenset()
    skip: str | None = None
    problems: tuple[str, ...] = ()


def parse_marker(text: str) -> tuple[frozenset[str], str | None, list[str]]:
    """(flags, skip reason, problems) of a ``readme-test:`` comment's text."""
    text = text.strip()
    skip = SKIP.fullmatch(text)
    if skip:
        return frozenset(), skip["reason"].strip(), []
    words = [w.strip() for w in text.split(",")]
    unknown = [w for w in words if w not in FLAGS]
    if unknown:
        return frozenset(), None, [f"unknown readme-test marker {', '.join(map(repr, unknown))}: use "
                                   f"{', '.join(sorted(FLAGS))} or skip (reason)"]
    return frozenset(words), None, []


def slug(heading: str) -> str:
    """``Sampling plans: fewer steps, ...`` -> ``sampling-plans``."""
    return re.sub(r"[^a-z0-9]+", "-", heading.split(":")[0].lower()).strip("-")


def readme_blocks(text: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks, and problems found outside any block (a marker preceding no fence)."""
    lines = text.splitlines()
    blocks, stray = [], []
    section, counts = "top", {}
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = slug(line.lstrip("#"))
        elif MARKER.fullmatch(line) and not (i + 1 < len(lines) and lines[i + 1].startswith("```")):
            stray.append(f"README.md:{i + 1}: a readme-test marker must be the line right before a fence")
        elif line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                stray.append(f"README.md:{i + 1}: unclosed fence")
                break
            counts[section] = counts.get(section, 0) + 1
            marker = MARKER.fullmatch(lines[i - 1]) if i else None
            flags, skip, problems = parse_marker(marker["text"]) if marker else (frozenset(), None, [])
            lang = line[3:].strip()
            if lang not in RUNNABLE and skip is None:
                problems.append(f"a ```{lang or '(no language)'} block runs only as {' or '.join(RUNNABLE)}; "
                                "mark it <!-- readme-test: skip (reason) -->")
            blocks.append(Block(f"{section}-{counts[section]}", i + 1, lang, "\n".join(lines[i + 1:end]) + "\n",
                                flags, skip, tuple(problems)))
            i = end
        i += 1
    return blocks, stray


BLOCKS, STRAY = readme_blocks(README.read_text())


def bash_commands(code: str) -> str:
    """The block's command chains without their ``pip install`` steps, as one ``&&`` chain."""
    steps = [step.strip() for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")
             for step in line.split("&&")]
    return " && ".join(s for s in steps if not s.startswith("pip install"))


def marks(block: Block) -> list[pytest.MarkDecorator]:
    if block.skip is not None:
        return [pytest.mark.skip(reason=f"README.md:{block.line}: {block.skip}")]
    found = []
    if "slow" in block.flags:
        found.append(pytest.mark.slow)
    if "gpu" in block.flags:
        found += [pytest.mark.gpu,
                  pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
                  pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="kernels are interpreted; set TRITON_INTERPRET=0")]
    return found


def test_every_block_runs_or_says_why_not():
    assert BLOCKS, "README.md has no fenced blocks"
    problems = STRAY + [f"README.md:{b.line} ({b.id}): {p}" for b in BLOCKS for p in b.problems]
    assert not problems, "\n".join(problems)
    assert len({b.id for b in BLOCKS}) == len(BLOCKS)
    for b in BLOCKS:
        if b.lang == "bash" and b.skip is None:
            assert bash_commands(b.code), f"{b.id}: nothing left to run without pip install; mark it skip"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=marks(b)) for b in BLOCKS])
def test_readme_block_runs_in_a_fresh_folder_and_again_over_its_output(block, tmp_path):
    if block.problems:
        pytest.fail("\n".join(block.problems))
    if block.lang == "python":
        script = tmp_path / "block.py"  # outside the working folder, which stays as the snippet left it
        script.write_text(block.code)
        command = [sys.executable, str(script)]
    else:
        command = ["bash", "-c", f"set -euo pipefail\n{bash_commands(block.code)}"]
    folder = tmp_path / "work"
    folder.mkdir()
    # `graphopt` and `python` in a command are this interpreter's, as after `pip install -e .`
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    times = []
    for run in ("first", "second"):
        if run == "second" and not any(folder.iterdir()):
            break  # nothing written: nothing a second run could refuse
        start, cpu = time.perf_counter(), _children_cpu_s()
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        times.append(f"{time.perf_counter() - start:.1f}s ({_children_cpu_s() - cpu:.1f}s CPU)")
        output = (result.stdout + result.stderr)[-4000:]
        assert result.returncode == 0, (f"README.md:{block.line} ({block.id}), {run} run, exit {result.returncode} "
                                        f"after {times[-1]}:\n{output}")
    print(f"{block.id}: {' + '.join(times)}")  # shown with -s: what each block costs the suite


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
