"""bench/plots.py: the documentation's performance plots, made from benchmark results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.servers import ROOT

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_are_made_from_the_results_file(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "bench/plots.py", "bench/results/throughput.json", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["overhead.png", "throughput-bare.png", "throughput-ratios.png"]
    for name in names:
        made = (tmp_path / name).read_bytes()
        assert made.startswith(PNG) and len(made) > 10_000
        assert (ROOT / "docs" / "img" / name).read_bytes().startswith(PNG)  # what docs/performance.md embeds
