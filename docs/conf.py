"""Sphinx configuration for the kerasdist docs (built with `make docs`).

The guide is Markdown (myst-parser); the API reference is generated from the
Google-style docstrings by autodoc + napoleon. Docstrings follow the Keras
convention of Markdown code fences (```python ... ```) and single-backtick
code; `_markdown_docstrings` turns the fences into reST code blocks before
napoleon reads them, and `default_role = "literal"` renders `x` as code.
"""

import os
import re
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

project = "kerasdist"
author = "kerasdist developers"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "README.md"]
html_theme = "sphinx_rtd_theme"
default_role = "literal"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
nitpicky = False

_FENCE_OPEN = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_SINGLE_TICKS = re.compile(r"(?<![`\w])`([^`\n]+)`(?![`\w])")
_BULLET = re.compile(r"^(\s*)[-*] ")


def _indent(line):
    return len(line) - len(line.lstrip())


def _separate_lists(lines, in_block):
    """Blank lines around bullet lists, as reST needs and Markdown not."""
    out = []
    list_indent = None
    for line, code in zip(lines, in_block, strict=True):
        bullet = None if code else _BULLET.match(line)
        if bullet and list_indent is None:
            if out and out[-1].strip():
                out.append("")
            list_indent = len(bullet.group(1))
        elif (
            list_indent is not None
            and line.strip()
            and not bullet
            and _indent(line) <= list_indent
        ):
            if out and out[-1].strip():
                out.append("")
            list_indent = None
        out.append(line)
    return out


def _code_lines(lines):
    """For each line, whether it is inside a `.. code-block::`."""
    flags = []
    block_indent = None
    for line in lines:
        if block_indent is not None and line.strip() and (
            _indent(line) <= block_indent
        ):
            block_indent = None
        flags.append(block_indent is not None)
        if line.lstrip().startswith(".. code-block::"):
            block_indent = _indent(line)
    return flags


def _fences_to_code_blocks(lines):
    out = []
    i = 0
    while i < len(lines):
        match = _FENCE_OPEN.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, language = match.group(1), match.group(2) or "text"
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else
                        line.lstrip())
            i += 1
        i += 1  # The closing fence.
        if out and out[-1].strip():
            out.append("")
        out.append(f"{indent}.. code-block:: {language}")
        out.append("")
        out.extend(f"{indent}   {b}" if b.strip() else "" for b in body)
        out.append("")
    return out


def _markdown_docstrings(app, what, name, obj, options, lines):
    """Makes a Markdown-flavoured Google docstring valid reST for napoleon.

    Code fences become code blocks, single-backtick code becomes ``literal``
    (which napoleon also keeps whole when splitting `name: description`),
    and bullet lists get the blank lines around them that reST requires.
    """
    out = _fences_to_code_blocks(lines)
    code = _code_lines(out)
    out = [
        line if is_code else _SINGLE_TICKS.sub(r"``\1``", line)
        for line, is_code in zip(out, code, strict=True)
    ]
    lines[:] = _separate_lists(out, code)


def setup(app):
    # Before napoleon (priority 500) parses the Google-style sections.
    app.connect("autodoc-process-docstring", _markdown_docstrings, priority=400)
