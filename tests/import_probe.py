"""What importing some modules pulls in, read in a fresh interpreter: the cheap-import tests share it."""
from __future__ import annotations

import subprocess
import sys


def heavy_imports(modules: list[str], heavy: tuple[str, ...], then: str = "") -> list[str]:
    """The names of `heavy` found in sys.modules after importing `modules` (and running `then`)."""
    code = (f"import sys, {', '.join(modules)}\n{then}\n"
            f"print(','.join(sorted(m for m in {heavy!r} if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return out.split(",") if out else []
