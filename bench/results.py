"""bench/RESULTS.md is assembled from sections, one per benchmark; each run replaces its own section."""

from __future__ import annotations

import re
import time
from pathlib import Path

HEADER = (
    "# Benchmark results\n\nFigures measured on this machine by the scripts in bench/; each section names its script.\n"
)


def write_section(path: Path, title: str, body: str) -> None:
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- begin: {title} -->", f"<!-- end: {title} -->"
    stamp = time.strftime("%Y-%m-%d")
    block = f"{begin}\n## {title}\n\n_measured {stamp}_\n\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
