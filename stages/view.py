"""Show a reconstruction written by ``infer`` in the browser, or export it as one HTML file.

    python stages/view.py reports/infer [--scene NAME] [--port 8080] [--static view.html]

The options and what the viewer shows: ``python stages/view.py --help`` and
:mod:`distill3r.viewer`. Not a DVC stage: it only reads ``infer``'s outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this checkout's package, not the one installed in the venv (a queued `dvc exp run`
# runs in a copy of the repository: it must import the copy's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill3r.viewer.cli import main

if __name__ == "__main__":
    sys.exit(main())
