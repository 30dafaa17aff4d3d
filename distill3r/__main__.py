"""``python -m distill3r <command> ...``: the ``distill3r`` console command."""

import sys

from distill3r.commands import main

if __name__ == "__main__":
    sys.exit(main())
