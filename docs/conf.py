"""Sphinx configuration for the acall documentation.

Build (warnings are errors)::

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

# autodoc imports acall from this checkout, not from an installed copy.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import acall  # noqa: E402

project = "acall"
author = "acall developers"
copyright = "acall developers"  # noqa: A001
release = "0.1.0"
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: ``{eval-rst}`` blocks for autodoc, ``{py:class}`` roles for cross-references,
# and ``(label)=`` targets with heading anchors for links between pages.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Docstrings use reST field lists (``:param x:``); napoleon is on for any Google/NumPy
# style section that may appear, without rewriting the reST fields.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {
    "show-inheritance": True,
}
autodoc_preserve_defaults = True

# No network at build time: intersphinx stays loaded but has no inventories. To link to
# the Python, anyio, cattrs and attrs docs, download their objects.inv files and map
# them here, e.g. {"python": ("https://docs.python.org/3", "_inv/python.inv")}.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

nitpicky = False

html_theme = "furo"
html_title = f"acall {release}"
html_static_path: list[str] = []

# Fail loudly if the package under documentation does not import.
assert acall.__all__
