"""The benchmark CLIs' last step: print the JSON report, and also write it to a file when asked."""
from __future__ import annotations

import json


def emit(report: dict, output: str | None) -> None:
    text = json.dumps(report, indent=2)
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    print(text)
