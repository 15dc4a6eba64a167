"""Ray job entrypoint: `ray job submit -- python jobs/translate.py CONFIG [--set k=v ...]`."""

import sys

from raysafe.cli import main

if __name__ == "__main__":
    sys.exit(main(["translate", *sys.argv[1:]]))
