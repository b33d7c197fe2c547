"""Builds acall's optional C extension; the project's metadata lives in pyproject.toml.

``acall._speedups`` (a JSON string escaper that releases the GIL) is optional: where no
C compiler is available the build skips it with a warning and acall falls back to the
standard library's escaper, with the same output.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("acall._speedups", ["acall/_speedups.c"], optional=True)])
