"""A module that tests/test_preload.py asks workers to preload: it records where and
when it was imported."""

import os
import time

LOADED_PID = os.getpid()
LOADED_AT = time.time()
