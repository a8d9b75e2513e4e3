"""The API reference covers every public name, each with an example.

`docs/api.rst` is built by Sphinx autodoc (`make docs`, warnings as
errors). This checks, without building, that every name in
`kerasdist.__all__` has an autodoc entry there, that every public submodule
in it is documented with `automodule` (which documents the names in the
submodule's `__all__`), and that every public function and class, at top
level and in those submodules, has a docstring with an `Example`.
"""

import inspect
import os
import re
import types

import pytest

import kerasdist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_RST = os.path.join(ROOT, "docs", "api.rst")


def api_text():
    with open(API_RST, encoding="utf-8") as f:
        return f.read()


def documented_targets():
    """Objects named by autodoc directives, e.g. 'kerasdist.get_strategy'."""
    return set(
        re.findall(r"^\.\. auto\w+::\s*(\S+)", api_text(), re.MULTILINE)
    )


def public_names():
    return [n for n in kerasdist.__all__ if not n.startswith("__")]


def public_submodules():
    return {
        name: getattr(kerasdist, name)
        for name in public_names()
        if isinstance(getattr(kerasdist, name), types.ModuleType)
    }


def automodule_members():
    """{module: None (`:members:`, all) or the set of members it lists}."""
    found = {}
    pattern = r"^\.\. automodule::\s*(\S+)[ \t]*\n((?:[ \t]+:.*\n?)*)"
    for match in re.finditer(pattern, api_text(), re.MULTILINE):
        option = re.search(r":members:(.*)", match.group(2))
        if option is None:
            found[match.group(1)] = set()
        elif option.group(1).strip():
            found[match.group(1)] = {
                m.strip() for m in option.group(1).split(",")
            }
        else:
            found[match.group(1)] = None
    return found


def undocumented_members(module, targets):
    """Names of the module's `__all__` that api.rst does not document."""
    listed = automodule_members().get(module.__name__, set())
    return [
        m for m in getattr(module, "__all__", [])
        if f"{module.__name__}.{m}" not in targets
        and listed is not None and m not in listed
    ]


def module_documented(module, targets):
    """Every name of the module's `__all__` is documented (or, without
    `__all__`, the module has an automodule)."""
    if undocumented_members(module, targets):
        return False
    return bool(getattr(module, "__all__", [])) or (
        module.__name__ in automodule_members()
    )


def test_every_top_level_name_is_in_the_reference():
    targets = documented_targets()
    missing = []
    for name in public_names():
        full = f"kerasdist.{name}"
        obj = getattr(kerasdist, name)
        if isinstance(obj, types.ModuleType):
            if not module_documented(obj, targets):
                missing.append(full)
            continue
        if full in targets:
            continue
        # Also fine: documented under the submodule that defines it.
        module = getattr(obj, "__module__", None)
        if module and f"{module}.{name}" in targets:
            continue
        if module in targets and name in getattr(
            __import__(module, fromlist=["_"]), "__all__", ()
        ):
            continue
        missing.append(full)
    assert not missing, f"not in docs/api.rst: {missing}"


def test_every_public_submodule_is_documented():
    targets = documented_targets()
    missing = []
    for module in public_submodules().values():
        missing.extend(
            f"{module.__name__}.{m}"
            for m in undocumented_members(module, targets)
        )
        if not getattr(module, "__all__", []) and (
            module.__name__ not in automodule_members()
        ):
            missing.append(module.__name__)
    assert not missing, f"not documented in docs/api.rst: {missing}"


def public_objects():
    """(qualified name, object) of every public function and class."""
    seen = {}
    for name in public_names():
        obj = getattr(kerasdist, name)
        if isinstance(obj, types.ModuleType):
            for member in getattr(obj, "__all__", []):
                sub = getattr(obj, member)
                seen.setdefault(id(sub), (f"{obj.__name__}.{member}", sub))
        else:
            seen.setdefault(id(obj), (f"kerasdist.{name}", obj))
    return [
        (qual, obj)
        for qual, obj in sorted(seen.values(), key=lambda x: x[0])
        if inspect.isclass(obj) or inspect.isfunction(obj)
    ]


def test_there_are_public_objects():
    names = [q for q, _ in public_objects()]
    assert "kerasdist.get_strategy" in names
    assert "kerasdist.flags.define_flags" in names


@pytest.mark.parametrize(
    "qualname, obj", public_objects(), ids=[q for q, _ in public_objects()]
)
def test_public_object_has_docstring_with_example(qualname, obj):
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        # Exceptions: a docstring saying when they are raised is enough.
        assert doc.strip(), f"{qualname} has no docstring"
        return
    assert doc.strip(), f"{qualname} has no docstring"
    assert re.search(r"^\s*Examples?:", doc, re.MULTILINE), (
        f"{qualname}'s docstring has no 'Example:' section"
    )
