"""The code a job runs, derived from imports (dfml/codedeps.py), against the modules Python really loads; its
digest (blind to comments, docstrings and layout); per-job registry entries; no import circle; module docstrings."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from dfml.codedeps import (
    ALGORITHMS,
    FUSIONS,
    SOURCES,
    code_digest,
    dataset_choices,
    find_cycle,
    import_graph,
    metatest_choices,
    metatrain_choices,
    module_file,
    registries,
    script_code_files,
    script_modules,
    source_digest,
    tree_digest,
)

RULE_FILES = sorted((REPO_ROOT / "workflow" / "rules").glob("*.smk"))
RULE_SCRIPTS = sorted({s for f in RULE_FILES for s in re.findall(r'job_code\("(scripts/[\w.]+)"', f.read_text())})

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


def files_of(*modules: str) -> set[str]:
    return {str(module_file(m).relative_to(REPO_ROOT)) for m in modules}


def test_every_rule_that_runs_a_script_has_its_code_digest_as_a_param():
    assert len(RULE_SCRIPTS) >= 7
    for rule_file in RULE_FILES:
        text = rule_file.read_text()
        assert "script_code(" not in text and 'script="scripts/' not in text, rule_file.name  # no file inputs
        for rule in re.split(r"^(?=rule |use rule )", text, flags=re.M)[1:]:
            ran = re.findall(r'"python (scripts/[\w.]+)', rule)
            declared = re.findall(r'code=job_code\("(scripts/[\w.]+)"', rule)
            if not rule.startswith("use rule"):
                assert ran == declared, (rule_file.name, rule.split(":")[0])


@pytest.mark.parametrize("script", RULE_SCRIPTS)
def test_derived_imports_equal_what_python_loads(script):
    eager = set(script_modules(REPO_ROOT / script, lazy=False))
    assert loaded_by_import(script) == eager
    assert eager <= set(script_modules(REPO_ROOT / script))  # lazy imports only add to them


def test_registry_entries_count_where_a_module_imports_by_name():
    # metatrain reaches each method only through the algorithm registry (dfml/methods/base.py)
    assert files_of("dfml.methods.purer") <= set(script_code_files(REPO_ROOT / "scripts/metatrain.py"))
    assert "dfml.methods.purer" not in script_modules(REPO_ROOT / "scripts/metatrain.py", lazy=False)
    # the data sources' registry (dfml/data/sources), each imported with importlib
    assert files_of("dfml.data.sources.omniglot") <= set(script_code_files(REPO_ROOT / "scripts/prepare_data.py"))
    assert "dfml/pool.py" in script_code_files(REPO_ROOT / "scripts/report.py")


def test_the_registries_the_workflow_chooses_from_are_the_ones_the_code_uses():
    from dfml.baselines import FUSIONS as fusions
    from dfml.data.sources import SOURCES as sources
    from dfml.methods.base import ALGORITHMS as algorithms

    found = registries()
    assert found[ALGORITHMS] == {name: module for name, (module, _) in algorithms.items()}
    assert found[FUSIONS] == {name: module for name, (module, _) in fusions.items()}
    assert found[SOURCES] == sources


def metatrain_files(algorithm: str, init: str = "auto") -> set[str]:
    settings = {"method": {"algorithm": algorithm}, "metatrain": {"init": init}}
    return set(script_code_files(REPO_ROOT / "scripts/metatrain.py", choices=metatrain_choices(settings)))


def test_a_metatraining_job_runs_its_own_method_and_the_shared_machinery_only():
    from dfml.methods.base import ALGORITHMS as algorithms

    everything = set(script_code_files(REPO_ROOT / "scripts/metatrain.py"))
    own = {name: files_of(module) for name, (module, _) in algorithms.items()}
    for name in algorithms:
        files = metatrain_files(name)
        assert own[name] <= files, name
        for other in set(algorithms) - {name}:
            assert not own[other] & files, (name, other)
        assert files_of("dfml.methods.base", "dfml.methods.loop", "dfml.metatrain") <= files
        assert files < everything
    # a method's own helpers (in its package, or wherever it imports them from) come with it only
    taco_only = metatrain_files("taco") - set().union(*(metatrain_files(n) for n in algorithms if n != "taco"))
    assert own["taco"] <= taco_only
    assert "dfml/models/ota.py" not in metatrain_files("purer")  # auto fuses the average, never OTA
    assert "dfml/models/ota.py" in metatrain_files("purer", init="ota")


def test_a_metatest_job_runs_its_fusion_only_and_never_the_cpu_inversion_kernels():
    params = {"methods": {"purer": {"algorithm": "purer"}, "taco": {"algorithm": "taco"}}}
    script = REPO_ROOT / "scripts/metatest.py"
    kernels = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "dfml" / "inversion").glob("fused*.py")}
    assert kernels
    for method in ("purer", "taco", "random", "average", "average_protonet", "ota", "ota_protonet"):
        files = set(script_code_files(script, choices=metatest_choices(params, method)))
        assert ("dfml/models/ota.py" in files) == method.startswith("ota"), method
        assert not kernels & files, method
    assert not kernels & set(script_code_files(script))  # whatever the method


def test_data_preparation_runs_its_source_and_no_model_code():
    script = REPO_ROOT / "scripts/prepare_data.py"
    files = set(script_code_files(script, choices=dataset_choices({"source": "omniglot"})))
    assert files_of("dfml.data.sources.omniglot") <= files
    assert not files_of("dfml.data.sources.glyphs") & files
    assert not [f for f in script_code_files(script) if f.startswith("dfml/models/")]


def test_a_choice_of_an_unknown_registry_or_entry_is_refused():
    with pytest.raises(ValueError, match="no registry 'dfml.methods.base.METHODS'"):
        script_code_files(REPO_ROOT / "scripts/metatrain.py", choices={"dfml.methods.base.METHODS": ["purer"]})
    with pytest.raises(ValueError, match="has no entry 'puer'"):
        script_code_files(REPO_ROOT / "scripts/metatrain.py", choices={ALGORITHMS: ["puer"]})


@pytest.mark.parametrize("script", RULE_SCRIPTS)
def test_each_file_is_listed_once(script):
    """A string that is no module name (dfml/__init__.py's "dfml." prefix) names no file a second time."""
    files = script_code_files(REPO_ROOT / script)
    assert len(files) == len(set(files)), sorted(f for f in files if files.count(f) > 1)


def make_package(root: Path) -> Path:
    files = {
        "dfml/__init__.py": "",
        "dfml/sub/__init__.py": "from dfml.sub import eager\n",
        "dfml/sub/eager.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import dfml.typing_only\n",
        "dfml/typing_only.py": "T = 0\n",
        "dfml/lazy.py": "from .rel import R\nX = 1\n",
        "dfml/rel.py": "R = 1\n",
        "dfml/named.py": "Y = 2\n",
        "dfml/unused.py": "Z = 3\n",
        "dfml/plugins/__init__.py": ("import importlib\n"
                                     "PLUGINS = {'a': ('dfml.plugins.a', 'run'), 'b': ('dfml.plugins.b', 'run')}\n"
                                     "def get(name):\n    return importlib.import_module(PLUGINS[name][0]).run\n"),
        "dfml/plugins/a.py": "def run():\n    return 1\n",
        "dfml/plugins/b.py": "def run():\n    return 2\n",
        "dfml/names.py": "KINDS = {'a': 'dfml.plugins.a'}\n",  # a registry nobody imports by name: no code runs
        "dfml/pkg/__init__.py": ("import importlib\nEXPORTS = {'Heavy': 'dfml.pkg.heavy', 'Light': 'dfml.pkg.light'}\n"
                                 "def __getattr__(name):\n    return getattr(importlib.import_module(EXPORTS[name]), name)\n"),
        "dfml/pkg/heavy.py": "class Heavy:\n    pass\n",
        "dfml/pkg/light.py": "class Light:\n    pass\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    script = root / "job.py"
    script.write_text("import importlib\nimport dfml.sub\nimport dfml.names\nfrom dfml.pkg import Light\n"
                      "from dfml import plugins\n\ndef main():\n    from dfml import lazy\n"
                      "    importlib.import_module('dfml.named')\n")
    return script


def test_lazy_relative_registry_and_export_imports_and_the_digest(tmp_path):
    script = make_package(tmp_path)
    assert script_modules(script, tmp_path, lazy=False) == [
        "dfml", "dfml.names", "dfml.pkg", "dfml.pkg.light", "dfml.plugins", "dfml.sub", "dfml.sub.eager"]
    assert script_code_files(script, tmp_path) == [
        "dfml/__init__.py", "dfml/lazy.py", "dfml/named.py", "dfml/names.py", "dfml/pkg/__init__.py",
        "dfml/pkg/light.py", "dfml/plugins/__init__.py", "dfml/plugins/a.py", "dfml/plugins/b.py", "dfml/rel.py",
        "dfml/sub/__init__.py", "dfml/sub/eager.py"]
    chosen = script_code_files(script, tmp_path, choices={"dfml.plugins.PLUGINS": ["b"]})
    assert "dfml/plugins/b.py" in chosen and "dfml/plugins/a.py" not in chosen
    before = code_digest(script, tmp_path)
    (tmp_path / "dfml" / "unused.py").write_text("Z = 4\n")
    assert code_digest(script, tmp_path) == before  # not imported: not part of the code
    (tmp_path / "dfml" / "rel.py").write_text("R = 2\n")
    assert code_digest(script, tmp_path) != before
    before = code_digest(script, tmp_path, choices={"dfml.plugins.PLUGINS": ["b"]})
    (tmp_path / "dfml" / "plugins" / "a.py").write_text("def run():\n    return 3\n")
    assert code_digest(script, tmp_path, choices={"dfml.plugins.PLUGINS": ["b"]}) == before  # not this job's plugin


CODE = '''"""Module docstring."""
import os


class Thing:
    """A class."""

    size: int = 3

    def grow(self, by):
        """Grow it."""
        # a comment
        return self.size + by  # trailing


def f(x, y=(1, 2)):
    "short docstring"
    return x ** 2
'''

SAME = '''"""Another module docstring, longer,
on two lines."""
import os  # why


class Thing:

    size: int = 3
    """Attribute doc."""

    def grow(self,
             by):
        # another comment
        return (self.size +
                by)


def f(x, y=(1,
            2)):
    return x**2
'''


def test_the_digest_ignores_comments_docstrings_and_layout_but_not_code():
    assert tree_digest(CODE) == tree_digest(SAME)
    for changed in (CODE.replace("x ** 2", "x ** 3"), CODE.replace("y=(1, 2)", "y=(1, 3)"),
                    CODE.replace("size: int = 3", "size: int = 4"), CODE.replace("import os", "import sys"),
                    CODE.replace("def f(x", "def g(x"), CODE + "\nprint('hello')\n", CODE.replace("'", '"') + "X = 'a'\n"):
        assert tree_digest(changed) != tree_digest(CODE), changed
    assert tree_digest("x = 'a'\n") != tree_digest("x = 'b'\n")  # strings that are values are code


def test_every_module_and_script_has_a_code_digest_equal_to_its_tree_digest():
    for path in sorted((REPO_ROOT / "dfml").rglob("*.py")) + [REPO_ROOT / s for s in RULE_SCRIPTS]:
        assert source_digest(path) == tree_digest(path.read_text()), path


def test_no_import_circle():
    """Every dfml module imports without a circle: the graph of what each module's import statements name
    (inside functions too; not its own parent packages, not the modules registries name) has none."""
    graph = import_graph()
    assert len(graph) > 50 and "dfml.pool" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    (tmp_path / "dfml").mkdir()
    (tmp_path / "dfml" / "__init__.py").write_text("")
    (tmp_path / "dfml" / "a.py").write_text("from dfml.b import B\nA = 1\n")
    (tmp_path / "dfml" / "b.py").write_text("B = 2\n\ndef f():\n    from dfml.a import A\n    return A\n")
    assert find_cycle(import_graph(tmp_path)) == ["dfml.a", "dfml.b", "dfml.a"]
    (tmp_path / "dfml" / "b.py").write_text("B = 2\n")
    assert find_cycle(import_graph(tmp_path)) is None


def test_every_module_opens_with_a_docstring_that_says_what_it_holds():
    missing = [str(p.relative_to(REPO_ROOT)) for p in sorted((REPO_ROOT / "dfml").rglob("*.py"))
               if len((ast.get_docstring(ast.parse(p.read_text())) or "").split()) < 4]
    assert not missing, f"modules without an opening docstring (at least a sentence): {missing}"
