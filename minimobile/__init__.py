"""minimobile: MobileNet-V1 in JAX/Flax, built from explicit depthwise and pointwise convolutions."""

import sys

__version__ = "0.1.0"

# `python -m minimobile.<tool>`: Python imports this package while it finds the tool, and only then
# (sys.argv[0] is "-m" until then) does the tool import JAX, which takes a second or more. A Ctrl-C
# in that time would end in a traceback of the import machinery, or be lost (see errors.py); it now
# ends in one line. An `import minimobile` in a program of yours leaves its signals alone.
if sys.argv[:1] == ["-m"]:
    from minimobile.errors import exit_at_once_on_signals

    exit_at_once_on_signals()
