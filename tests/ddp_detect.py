"""detect_poison.py's main under `accelerate launch` (tests/test_detect_poison.py): ends with os._exit(0)
after every process has finished, as a gloo rank may abort at interpreter exit with torch 2.14."""

import os
import sys

import detect_poison as dp

if __name__ == "__main__":
    dp.main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
