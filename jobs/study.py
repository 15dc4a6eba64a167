"""Ray job entrypoint: `ray job submit -- python jobs/study.py CONFIG [--set k=v ...]`."""

import sys

from raysafe.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
