"""The structure as a test: the import contracts hold, and the packages below the runtime load without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """`lint-imports` as the README runs it: every contract in pyproject.toml kept."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "BROKEN" not in result.stdout


def test_engines_and_calibration_load_without_torch():
    code = ("import json, sys; import engines.build, engines.check, calibration, aot_export.manifest; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def test_public_api_still_reaches_the_reducer():
    import aot_export

    assert aot_export.AOTReducer.__name__ == "AOTReducer"
    assert "AOTReducer" in aot_export.__all__
