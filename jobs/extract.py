"""Ray job entrypoint: `ray job submit -- python jobs/extract.py CONFIG [--set k=v ...]`."""

import sys

from raysafe.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
