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
copyright = "acall developers"
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

# Docstrings use reST field lists (``:param x:``, ``:ivar x:``), which Sphinx reads
# natively; napoleon stays loaded for docstrings that adopt Google or NumPy sections,
# but both parsers are off for now: the Google parser reads a property docstring such
# as "The wire key: ``module.func_name``." as "<type>: <description>" and renders
# "Type: The wire key" (no package docstring uses Google/NumPy sections today).
napoleon_google_docstring = False
napoleon_numpy_docstring = False
napoleon_use_ivar = True

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {
    "show-inheritance": True,
}

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


# -- the re-export table of api.md ---------------------------------------------------

_EXPORTS_MARKER = "<!-- acall-exports -->"


def _home_module(name: str, obj: object) -> str:
    """The module under which *name* is documented in api.md."""
    import acall.brokers
    import acall.stores

    for package in (acall.stores, acall.brokers):
        if name in package.__all__:
            return package.__name__
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or not module.startswith("acall."):
        raise RuntimeError(f"cannot tell where acall.{name} is documented ({module!r})")
    return module


def _summary(obj: object) -> str:
    import inspect

    doc = inspect.getdoc(obj) or ""
    first = doc.strip().split("\n\n", 1)[0].replace("\n", " ")
    # Table cells are MyST: keep reST markup out and escape the column separator.
    for role in (":class:", ":func:", ":meth:", ":attr:", ":data:", ":exc:", ":mod:"):
        first = first.replace(role, "")
    return first.replace("``", "`").replace("|", "\\|")


def _exports_table() -> str:
    rows = ["| name | summary |", "| --- | --- |"]
    for name in acall.__all__:
        obj = getattr(acall, name)
        target = f"{_home_module(name, obj)}.{name}"
        rows.append(f"| {{py:obj}}`{name} <{target}>` | {_summary(obj)} |")
    return "\n".join(rows) + "\n"


def _fill_exports(app: object, docname: str, source: list[str]) -> None:
    if docname == "api" and _EXPORTS_MARKER in source[0]:
        source[0] = source[0].replace(_EXPORTS_MARKER, _exports_table())


def setup(app: object) -> dict[str, object]:
    app.connect("source-read", _fill_exports)  # type: ignore[attr-defined]
    return {"parallel_read_safe": True}
