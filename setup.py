"""Build the optional C code; everything else is declared in pyproject.toml.

``optional=True``: where no compiler is available the package installs without it. Without
``core/_speedups.c`` the Python steps of ``core/protocol.py`` serve every call (the same wire
protocol); without ``codecs/_ints.c`` msgspec decodes lists of ints itself (the same results).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("typedcoll.core._speedups", ["src/typedcoll/core/_speedups.c"], optional=True),
    Extension("typedcoll.codecs._ints", ["src/typedcoll/codecs/_ints.c"], optional=True),
])
