"""A Python toolchain for the project's virtualenv (TensorFlow, Keras, pytest).

Bazel runs py_binary/py_test with the interpreter of the registered Python
toolchain. This repository rule finds the virtualenv interpreter, by default
`<workspace>/.venv/bin/python` (created by `make install`), or the absolute
path in the environment variable KERASDIST_PYTHON, and declares a py_runtime
and toolchain for it.
"""

_BUILD = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
    stub_shebang = "#!{python}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
"""

def _venv_python_impl(rctx):
    python = rctx.os.environ.get("KERASDIST_PYTHON", "")
    if not python:
        root = rctx.path(Label("//:WORKSPACE")).dirname
        python = "%s/.venv/bin/python" % root
    if not python.startswith("/"):
        fail("KERASDIST_PYTHON must be an absolute path. Received: %s" % python)
    if not rctx.path(python).exists:
        fail(("No Python interpreter at %s. Run `make install` to create " +
              ".venv, or set KERASDIST_PYTHON to a Python with kerasdist's " +
              "dependencies installed.") % python)
    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD", _BUILD.format(python = python))

venv_python = repository_rule(
    implementation = _venv_python_impl,
    environ = ["KERASDIST_PYTHON"],
    local = True,
)
