"""Builds acall's optional C extension; the project's metadata lives in pyproject.toml.

``acall._speedups`` (a JSON string escaper that releases the GIL, a plain-container
walker, the ``args_id`` bytes, a key check and a slot-filling constructor for records) is
optional: where no C compiler is available the build skips it with a warning and acall
falls back to plain Python, with the same output.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("acall._speedups", ["acall/_speedups.c"], optional=True)])
