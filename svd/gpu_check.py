"""Moved to svd/tools/gpu_check.py; `python -m svd.gpu_check` still runs it."""

from svd.tools.gpu_check import *  # noqa: F403
from svd.tools.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
