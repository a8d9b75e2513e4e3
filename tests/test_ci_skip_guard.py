"""The CI guard: a skipped real-component test fails the run under CI=true."""

import pathlib
import subprocess
import sys
import textwrap


def _run(tmp_path, ci: str) -> subprocess.CompletedProcess:
    here = pathlib.Path(__file__).parent
    (tmp_path / "conftest.py").write_text((here / "conftest.py").read_text())
    (tmp_path / "test_x.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.real_component
        def test_engine():
            pytest.skip("no engine here")
    """))
    env = {"CI": ci, "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-o", "markers=real_component: x", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
        cwd=tmp_path,
    )


def test_skip_is_a_failure_under_ci(tmp_path):
    result = _run(tmp_path, "true")
    assert result.returncode == 1, result.stdout
    assert "real-component test skipped under CI=true: " in result.stdout
    assert "no engine here" in result.stdout
    assert "1 failed" in result.stdout


def test_skip_is_a_skip_outside_ci(tmp_path):
    result = _run(tmp_path, "")
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
