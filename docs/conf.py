"""Sphinx configuration for the leapmail documentation.

Built by ``make docs``:
``.venv/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html``.
Only Sphinx built-ins are used (the alabaster theme and ``sphinx.ext.autodoc``).
"""

import os
import sys

# Building the docs must not leave bytecode caches in the source tree.
sys.dont_write_bytecode = True

# The package is installed (editable) in .venv; the source tree on sys.path makes the
# build work from any interpreter that has leapmail's dependencies.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import leapmail  # noqa: E402

project = "leapmail"
author = "the leapmail contributors"
release = leapmail.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc"]

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Docstrings are written for the code reader; keep the order in which they appear.
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
# Show default values as written in the source (``driver=sqlcipher3``), not their repr.
autodoc_preserve_defaults = True

html_theme = "alabaster"
html_theme_options = {
    "description": "Local IMAP/SMTP over an end-to-end encrypted store",
    "fixed_sidebar": True,
}
html_title = f"leapmail {release}"
