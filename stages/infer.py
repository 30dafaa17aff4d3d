"""DVC entry point of ``distill3r infer`` (:mod:`distill3r.commands.infer`): same arguments."""

import sys

from distill3r.commands.infer import main

if __name__ == "__main__":
    sys.exit(main())
