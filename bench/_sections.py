"""The benchmarks' one way of updating bench/RESULTS.md: replace the text between two markers."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, begin: str, end: str, text: str) -> None:
    """Put ``text`` (which starts with ``begin`` and ends with ``end``) in place of the marked section
    of ``path``, or append it when the file has none; other sections stay as they are."""
    current = path.read_text() if path.exists() else ""
    if begin in current and end in current:
        current = current[:current.index(begin)] + text + current[current.index(end) + len(end):]
    else:
        current = current.rstrip() + "\n\n" + text + "\n"
    path.write_text(current)
