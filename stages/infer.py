"""DVC entry point of ``distill3r infer`` (:mod:`distill3r.commands.infer`): same arguments."""

import sys
from pathlib import Path

# this checkout's package, not the one installed in the venv (a queued `dvc exp run`
# runs in a copy of the repository: it must import the copy's code)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill3r.commands.infer import main

if __name__ == "__main__":
    sys.exit(main())
