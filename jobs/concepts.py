"""Ray job entrypoint: `ray job submit -- python jobs/concepts.py CONFIG [--set k=v ...]`."""

import sys

from raysafe.cli import main

if __name__ == "__main__":
    sys.exit(main(["concepts", *sys.argv[1:]]))
