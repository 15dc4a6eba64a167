"""Ray job entrypoint: `ray job submit -- python jobs/sweep.py CONFIG [--set k=v ...]`."""

import sys

from raysafe.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
