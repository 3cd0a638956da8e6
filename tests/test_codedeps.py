"""Code inputs derived from imports (dfml/codedeps.py) against the modules Python really loads."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from dfml.codedeps import code_digest, module_file, script_code_files, script_modules

RULE_FILES = sorted((REPO_ROOT / "workflow" / "rules").glob("*.smk"))
RULE_SCRIPTS = sorted({s for f in RULE_FILES for s in re.findall(r'script="(scripts/[\w.]+)"', f.read_text())})

PROBE = """
import json, runpy, sys
runpy.run_path(sys.argv[1], run_name="__probe__")
print(json.dumps(sorted(m for m in sys.modules if m == "dfml" or m.startswith("dfml."))))
"""


def loaded_by_import(script: str) -> set[str]:
    """dfml modules that importing ``script`` (not running its main) makes Python load, with a file."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO_ROOT / script)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    return {m for m in json.loads(out.splitlines()[-1]) if module_file(m) is not None}


def test_every_rule_declares_its_script_and_derived_code():
    assert len(RULE_SCRIPTS) >= 7
    for rule_file in RULE_FILES:
        text = rule_file.read_text()
        assert "dfml_code(" not in text
        assert re.findall(r'code=script_code\("(scripts/[\w.]+)"\)', text) == \
            re.findall(r'script="(scripts/[\w.]+)"', text), rule_file.name


@pytest.mark.parametrize("script", RULE_SCRIPTS)
def test_derived_imports_equal_what_python_loads(script):
    eager = set(script_modules(REPO_ROOT / script, lazy=False))
    assert loaded_by_import(script) == eager
    assert eager <= set(script_modules(REPO_ROOT / script))  # lazy imports only add to them


def test_the_old_hand_lists_missed_modules_that_the_derivation_finds():
    assert "dfml/pool.py" in script_code_files(REPO_ROOT / "scripts/report.py")
    # a registry of modules named as strings (imported with importlib) counts
    assert "dfml/data/sources/omniglot.py" in script_code_files(REPO_ROOT / "scripts/prepare_data.py")
    # metatrain reaches each method's file only through the algorithm registry (dfml/methods/base.py)
    assert "dfml/methods/purer.py" in script_code_files(REPO_ROOT / "scripts/metatrain.py")
    assert "dfml.methods.purer" not in script_modules(REPO_ROOT / "scripts/metatrain.py", lazy=False)


@pytest.mark.parametrize("script", RULE_SCRIPTS)
def test_each_file_is_listed_once(script):
    """A string that is no module name (dfml/__init__.py's "dfml." prefix) names no file a second time."""
    files = script_code_files(REPO_ROOT / script)
    assert len(files) == len(set(files)), sorted(f for f in files if files.count(f) > 1)


def make_package(root: Path) -> Path:
    (root / "dfml" / "sub").mkdir(parents=True)
    (root / "dfml" / "__init__.py").write_text("")
    (root / "dfml" / "sub" / "__init__.py").write_text("from dfml.sub import eager\n")
    (root / "dfml" / "sub" / "eager.py").write_text("import os\n")
    (root / "dfml" / "lazy.py").write_text("X = 1\n")
    (root / "dfml" / "named.py").write_text("Y = 2\n")
    (root / "dfml" / "unused.py").write_text("Z = 3\n")
    script = root / "job.py"
    script.write_text("import dfml.sub\nREGISTRY = {'n': 'dfml.named'}\n\ndef main():\n    from dfml import lazy\n")
    return script


def test_lazy_and_registry_imports_and_the_digest(tmp_path):
    script = make_package(tmp_path)
    assert script_modules(script, tmp_path, lazy=False) == ["dfml", "dfml.sub", "dfml.sub.eager"]
    assert script_code_files(script, tmp_path) == ["dfml/__init__.py", "dfml/lazy.py", "dfml/named.py",
                                                   "dfml/sub/__init__.py", "dfml/sub/eager.py"]
    before = code_digest(script, tmp_path)
    (tmp_path / "dfml" / "unused.py").write_text("Z = 4\n")
    assert code_digest(script, tmp_path) == before  # not imported: not part of the code
    (tmp_path / "dfml" / "lazy.py").write_text("X = 2\n")
    assert code_digest(script, tmp_path) != before
