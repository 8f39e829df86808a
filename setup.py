"""Build the optional C fast path; everything else is declared in pyproject.toml.

``optional=True``: where no compiler is available the package installs without it and
``typedcoll._protocol`` uses the pure-Python fast path, which speaks the same wire protocol.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("typedcoll.core._speedups", ["src/typedcoll/core/_speedups.c"], optional=True)])
