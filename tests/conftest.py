"""Suite-wide settings.

The command line's first-run compile notice (spotfit._jit) is switched off: which test
happens to compile a kernel first depends on the cache and the order of the tests, and
many tests check stderr line by line.  tests/test_jit.py switches it back on where it tests it.
"""

import os

os.environ["SPOTFIT_COMPILE_NOTICE"] = "0"
