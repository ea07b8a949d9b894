"""Sphinx configuration of the documentation site: the Markdown pages under docs/ (MyST) and a generated API
reference (autodoc) whose equations MathJax renders from a local copy.

Build it strictly, as CI does: ``python -m sphinx -W --keep-going -n -b html docs build/docs``.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import distribution
from pathlib import Path
from typing import Any, List, Optional

from sphinx.pycode import ModuleAnalyzer

DOCS = Path(__file__).resolve().parent
# The checkout's package, also where it is not installed.
sys.path.insert(0, str(DOCS.parent))

import unroll  # noqa: E402

project = "unroll"
author = "the unroll authors"
release = version = unroll.__version__
REPOSITORY = "https://github.com/unroll-dev/unroll"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# Sources are the Markdown pages only, every one of them (nothing is excluded). docs/ also holds the figures (PNG:
# the build copies each one a page shows) and the numbers behind the tables (JSON: copied as a download where a
# page links it); neither kind is a page.
source_suffix = {".md": "markdown"}
# The landing page is the documentation index the repository already has (docs/README.md); the build gets an
# index.html that sends the browser there (see `redirect_index` below).
root_doc = "README"

# Anchors like GitHub's for headings (`results/mixture.md#the-main-job`), down to ###.
myst_heading_anchors = 3

autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# The site is built and read offline (CI reaches package registries only): MathJax 3 comes from the PyPI package
# sphinx-mathjax-offline (its files, not its extension, so that the path below is the one used), copied into
# _static/mathjax. Sphinx's default is a CDN.
html_static_path = [str(distribution("sphinx-mathjax-offline").locate_file("sphinx-mathjax-offline/static"))]
mathjax_path = "mathjax/tex-chtml.js"

# torch's names in signatures and docstrings: torch's documentation inventory is not reachable offline (no
# intersphinx), so they cannot link anywhere (Sphinx reports no built-in or typing name). Every name of unroll's
# must resolve.
nitpick_ignore_regex = [("py:class", r"torch\..+"), ("py:class", "Tensor")]

html_theme = "furo"
html_title = f"unroll {release}"
html_theme_options = {"source_repository": REPOSITORY, "source_branch": "main", "source_directory": "docs/"}

PAGE_LINK = r"\]\((?![a-z][a-z0-9+.-]*:|#)([^)#\s]+)\.md(?:#[^)\s]*)?\)"  # a relative link to a page
ROW_LINK = re.compile(r"^\|\s*\[[^\]]*" + PAGE_LINK, re.M)  # ... first in a table row
LINK = re.compile(PAGE_LINK)


def pages_linked_from(text: str) -> List[str]:
    """The docs pages a Markdown text links to, as docnames: first the pages that begin a table row (the index's
    entries, in its order), then any other page linked."""
    return list(dict.fromkeys(ROW_LINK.findall(text) + LINK.findall(text)))


def add_toctree(app: Any, docname: str, source: List[str]) -> None:
    """Give the index page a hidden toctree of the pages it links to, in the order its tables list them.

    The index is the table of every page, so its links are the site's navigation; a page it does not link to is
    in no toctree, which the strict build refuses ("document isn't included in any toctree").
    """
    if docname != app.config.root_doc:
        return
    entries = "\n".join(pages_linked_from(source[0]))
    source[0] += f"\n\n```{{toctree}}\n:hidden:\n\n{entries}\n```\n"


def redirect_index(app: Any, exception: Optional[Exception]) -> None:
    """Write index.html, the page a web server shows for the site's folder, sending the browser to the index."""
    if exception is None and app.builder.format == "html":
        target = f"{app.config.root_doc}.html"
        (Path(app.outdir) / "index.html").write_text(
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{project}</title>'
            f'<meta http-equiv="refresh" content="0; url={target}"></head>'
            f'<body><a href="{target}">{project} documentation</a></body></html>\n',
            encoding="utf-8",
        )


def alias_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: List[str]) -> None:
    """The docstring of a type alias re-exported by ``unroll`` (``unroll.Params``): autodoc reads attribute
    docstrings from the module that documents them, and these live in unroll/_types.py."""
    if what == "data" and not lines and name.startswith("unroll."):
        docs = ModuleAnalyzer.for_module("unroll._types").find_attr_docs()
        lines.extend(docs.get(("", name.rpartition(".")[2]), []))


def resolve_unique_name(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve a short name in a docstring (``:class:`TensorOptimizer``` in ``unroll.Optimizer``, whose
    module is ``unroll``) to the one documented object of the package that it names; anything else stays
    unresolved and fails the strict build."""
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or "." in target:
        return None
    python = env.get_domain("py")
    matches = [full for full in python.objects if full.startswith("unroll.") and full.endswith("." + target)]
    if len(matches) != 1:
        return None
    return python.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], matches[0], node, contnode)


def setup(app: Any) -> None:
    app.connect("source-read", add_toctree)
    app.connect("autodoc-process-docstring", alias_docstring)
    app.connect("missing-reference", resolve_unique_name)
    app.connect("build-finished", redirect_index)
