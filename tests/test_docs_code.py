"""Every Python block in README.md and docs/**/*.md runs (or compiles).

Each ```python fenced block is executed in a fresh Python process, with a
temporary directory as its working directory and the repository root on
`PYTHONPATH`, bounded by a timeout (its process group is killed on
timeout). A block whose fence is directly preceded by the line
`<!-- docs: compile-only -->` (it needs a cluster, a scheduler, a download
or a long run) is only compiled, and its top-level `import`/`from` lines
are executed, so a renamed module or name still fails the test. A block
preceded by `<!-- docs: syntax-only -->` is only compiled: for code of
another library that cannot be installed here (Horovod, for comparison).
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_ONLY = "<!-- docs: compile-only -->"
SYNTAX_ONLY = "<!-- docs: syntax-only -->"
TIMEOUT = 120


@dataclasses.dataclass(frozen=True)
class Block:
    path: str  # relative to ROOT
    line: int  # 1-based line of the opening fence
    code: str
    compile_only: bool
    syntax_only: bool = False

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line}"


def markdown_files() -> list[str]:
    files = [os.path.join(ROOT, "README.md")]
    files += glob.glob(os.path.join(ROOT, "docs", "**", "*.md"),
                       recursive=True)
    build = os.path.join(ROOT, "docs", "_build")
    return sorted(f for f in files if not f.startswith(build))


def python_blocks(path: str) -> list[Block]:
    """The ```python blocks of one markdown file."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    rel = os.path.relpath(path, ROOT)
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        start = i
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent)
                        else line)
            i += 1
        if i == len(lines):
            raise AssertionError(f"{rel}:{start + 1}: unclosed ```python")
        marker = lines[start - 1].strip() if start > 0 else ""
        blocks.append(Block(
            rel, start + 1, "\n".join(body) + "\n",
            compile_only=marker in (COMPILE_ONLY, SYNTAX_ONLY),
            syntax_only=marker == SYNTAX_ONLY,
        ))
        i += 1
    return blocks


BLOCKS = [b for f in markdown_files() for b in python_blocks(f)]


def import_lines(code: str, filename: str) -> str:
    """The block's top-level import statements, as source."""
    tree = ast.parse(code, filename)
    imports = [n for n in tree.body
               if isinstance(n, (ast.Import, ast.ImportFrom))]
    return "\n".join(ast.unparse(n) for n in imports) + "\n"


def run_python(code: str, cwd: str) -> tuple[int, str]:
    """Runs `code` in a fresh interpreter; kills its group on timeout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                  if p]
    )
    env.pop("TF_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {TIMEOUT}s:\n{out[-4000:]}")
    return proc.returncode, out


def test_blocks_are_found():
    # The docs have Python blocks; a parser that finds none would make
    # every other test here vacuous.
    assert len(BLOCKS) >= 20
    assert any(b.compile_only for b in BLOCKS)
    assert any(not b.compile_only for b in BLOCKS)


def test_parser_reads_markers_and_indented_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n"
        f"{COMPILE_ONLY}\n```python\nimport os\ncluster()\n```\n"
        "- item\n\n  ```python\n  y = 2\n  ```\n"
        f"{SYNTAX_ONLY}\n```python\nimport horovod\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(str(page))
    assert [(b.line, b.compile_only, b.syntax_only) for b in blocks] == [
        (2, False, False), (6, True, False), (12, False, False),
        (16, True, True),
    ]
    assert blocks[2].code == "y = 2\n"
    assert import_lines(blocks[1].code, "page.md") == "import os\n"


_RESULT = "KERASDIST_DOCS_IMPORTS="
_IMPORT_ALL = """
import json, traceback
failures = {}
for name, source in json.loads(BLOCKS):
    try:
        exec(compile(source, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        failures[name] = traceback.format_exc()
print(RESULT + json.dumps(failures))
"""


@pytest.fixture(scope="module")
def import_failures(tmp_path_factory):
    """{block name: traceback} for compile-only blocks whose imports fail.

    One fresh process imports them all (one TensorFlow start-up instead of
    one per block); each block's imports run in their own namespace.
    """
    blocks = [
        (b.name, import_lines(b.code, b.name))
        for b in BLOCKS if b.compile_only and not b.syntax_only
    ]
    code = (
        f"BLOCKS = {json.dumps(json.dumps(blocks))}\n"
        f"RESULT = {_RESULT!r}\n" + _IMPORT_ALL
    )
    returncode, out = run_python(code, str(tmp_path_factory.mktemp("imp")))
    lines = [x for x in out.splitlines() if x.startswith(_RESULT)]
    assert returncode == 0 and lines, out[-4000:]
    return json.loads(lines[-1][len(_RESULT):])


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_block(block, tmp_path, request):
    compile(block.code, block.name, "exec")  # a SyntaxError names the block
    if block.syntax_only:
        return
    if block.compile_only:
        failures = request.getfixturevalue("import_failures")
        assert block.name not in failures, (
            f"the imports of {block.name} (compile-only) fail:\n"
            f"{failures[block.name]}"
        )
        return
    returncode, out = run_python(f"# {block.name}\n{block.code}",
                                 str(tmp_path))
    assert returncode == 0, (
        f"{block.name} failed with exit code {returncode}:\n{out[-4000:]}"
    )
