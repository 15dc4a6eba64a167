"""Ray job entrypoint: `ray job submit -- python jobs/separation.py CONFIG [--set k=v ...]`."""

import sys

from raysafe.cli import main

if __name__ == "__main__":
    sys.exit(main(["separation", *sys.argv[1:]]))
