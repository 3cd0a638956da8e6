"""Which code a job can run, and a digest of it that changes when, and only when, that code does.

Snakemake does not track imported library code, DVC compares files byte for byte, and a checkpoint must
not outlive the code that wrote it. All three take their answer from here, read from the source (``ast``)
without importing anything, so the workflow can call it at parse time:

* **What a script runs**: the script plus every ``dfml`` module it imports, at any depth (imports inside
  functions included, absolute or relative), plus the package ``__init__.py`` files Python executes on the
  way. Imports under ``if TYPE_CHECKING:`` never run and do not count.
* **Registries** name modules that are imported on demand: a module-level dict whose values are ``dfml``
  module names, or tuples that start with one (``ALGORITHMS`` of dfml/methods/base.py, ``FUSIONS`` of
  dfml/baselines.py, ``SOURCES`` of dfml/data/sources). A job that says which keys it uses (``choices``:
  registry id -> keys, the id being ``<module>.<NAME>``) depends on those entries only; without a choice it
  depends on every entry. :func:`metatrain_choices`, :func:`metatest_choices` and :func:`dataset_choices`
  say what the workflow's jobs use; a checkpoint uses the same.
* **Lazy exports** (PEP 562): a package whose module-level ``__getattr__`` resolves names through such a dict
  (dfml/inversion) gives ``from package import Name`` the module of ``Name`` only.
* Other string constants that name a dfml module (an ``importlib`` call's argument) count as imports.
* **The digest** of a file is sha256 over its syntax tree with every string statement (docstrings) removed;
  comments and layout never reach the tree. A comment, a docstring or a reformatting changes no digest, any
  change of code does. A job's digest covers the paths and digests of its script and modules.
  (Docstrings reach run time only as ``__doc__``, which the code uses for ``--help`` texts.)

``tests/test_codedeps.py`` checks the derivation against the modules Python really loads, and
``tests/test_reruns.py`` what the real workflow reruns after an edit (docs/reruns.md).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "dfml"
REPO_ROOT = Path(__file__).resolve().parent.parent
DIGESTS_FILE = "workflow/code_digests.yaml"  # DVC's view of the digests (a params file; see sync_dvc_deps)

# The registries the workflow's jobs choose from (tests/test_codedeps.py checks that they exist).
ALGORITHMS = "dfml.methods.base.ALGORITHMS"
FUSIONS = "dfml.baselines.FUSIONS"
SOURCES = "dfml.data.sources.SOURCES"

Choices = Mapping[str, Iterable[str]]


def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The file of a dfml module (``dfml.meta`` -> dfml/meta/__init__.py), None if it is not one."""
    if not _is_dfml_name(module):
        return None
    base = Path(root).joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: str | Path, root: Path = REPO_ROOT) -> str | None:
    """The dotted name of a file under ``root`` (dfml/meta/__init__.py -> dfml.meta), None outside a package."""
    try:
        parts = list(Path(path).resolve().relative_to(Path(root).resolve()).with_suffix("").parts)
    except ValueError:
        return None
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) if parts and parts[0] == PACKAGE else None


def _is_dfml_name(value: object) -> bool:
    return isinstance(value, str) and value.split(".")[0] == PACKAGE and \
        all(part.isidentifier() for part in value.split("."))  # not the prefix "dfml." nor a sentence


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


# -- reading one file ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Import:
    module: str  # absolute (relative imports resolved)
    names: tuple[str, ...]  # `from module import a, b`; () for `import module`
    eager: bool  # runs when the file is imported (not inside a function)


@dataclass(frozen=True)
class _Source:
    imports: tuple[_Import, ...]
    strings: tuple[str, ...]  # dfml module names in string constants outside registries
    registries: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # (NAME, ((key, module), ...))
    exports: str | None  # the registry the module's __getattr__ resolves names through
    dynamic: bool  # imports by name (importlib.import_module or __import__): its registries' entries can run
    digest: str


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, eager: bool = True, skip: frozenset[int] = frozenset()):
    """(node, eager) for every node that can run: not the body of ``if TYPE_CHECKING:``, and not the nodes in
    ``skip`` (registries); inside a function body, eager is False."""
    for child in ast.iter_child_nodes(node):
        if id(child) in skip:
            continue
        if _type_checking(child):
            for sub in child.orelse:
                yield sub, eager
                yield from _walk(sub, eager, skip)
            continue
        yield child, eager
        yield from _walk(child, eager and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.Lambda)), skip)


def _registry_entry(value: ast.AST) -> str | None:
    if isinstance(value, (ast.Tuple, ast.List)) and value.elts:
        value = value.elts[0]
    return value.value if isinstance(value, ast.Constant) and _is_dfml_name(value.value) else None


def _registries(tree: ast.Module) -> list[tuple[str, ast.Dict, dict[str, str]]]:
    found = []
    for statement in tree.body:
        target = statement.targets[0] if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
            else statement.target if isinstance(statement, ast.AnnAssign) else None
        value = getattr(statement, "value", None)
        if not isinstance(target, ast.Name) or not isinstance(value, ast.Dict) or not value.keys:
            continue
        keys = [k.value if isinstance(k, ast.Constant) and isinstance(k.value, str) else None for k in value.keys]
        modules = [_registry_entry(v) for v in value.values]
        if None not in keys and None not in modules:
            found.append((target.id, value, dict(zip(keys, modules))))
    return found


def _strip_strings(tree: ast.AST) -> ast.AST:
    """The tree without string statements (docstrings and other strings that do nothing)."""
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if isinstance(body, list):
                body[:] = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                   and isinstance(s.value.value, str))]
    return tree


def _canonical(node: object) -> str:
    """A dump of a tree that the same code gives on every Python version that parses it alike: node types and
    fields, without positions, empty fields (newer versions add some, e.g. type_params) or string prefixes."""
    if isinstance(node, ast.AST):
        fields = [f"{name}={_canonical(value)}" for name, value in ast.iter_fields(node)
                  if value is not None and value != [] and name not in ("kind", "type_comment")]
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_canonical(item) for item in node) + "]"
    return f"{type(node).__name__}:{node!r}"


def tree_digest(source: str, filename: str = "<source>") -> str:
    """sha256 of ``source``'s syntax tree without docstrings: equal for sources that differ only in comments,
    docstrings and layout."""
    return hashlib.sha256(_canonical(_strip_strings(ast.parse(source, filename=filename))).encode()).hexdigest()


def _resolve_relative(node: ast.ImportFrom, package: str | None) -> str | None:
    if node.level == 0:
        return node.module
    if package is None:
        return None
    parts = package.split(".")
    if node.level - 1 > len(parts) - 1:
        return None
    base = parts[:len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.lru_cache(maxsize=4096)
def _read_cached(path: str, root: str, _mtime_ns: int, _size: int) -> _Source:
    text = Path(path).read_text()
    tree = ast.parse(text, filename=path)
    name = module_name(path, Path(root))
    package = None if name is None else name if Path(path).name == "__init__.py" else name.rpartition(".")[0]
    registries = _registries(tree)
    skip = frozenset(id(node) for _, node, _ in registries)
    imports, strings = [], []
    for node, eager in _walk(tree, skip=skip):
        if isinstance(node, ast.Import):
            imports += [_Import(alias.name, (), eager) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve_relative(node, package)
            if module:
                imports.append(_Import(module, tuple(alias.name for alias in node.names), eager))
        elif isinstance(node, ast.Constant) and _is_dfml_name(node.value):
            strings.append(node.value)
    getattr_names = {n.id for statement in tree.body
                     if isinstance(statement, ast.FunctionDef) and statement.name == "__getattr__"
                     for n in ast.walk(statement) if isinstance(n, ast.Name)}
    exports = next((reg for reg, _, _ in registries if reg in getattr_names), None)
    dynamic = any(isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
        or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))
        for node, _ in _walk(tree))
    return _Source(tuple(imports), tuple(strings),
                   tuple((reg, tuple(sorted(entries.items()))) for reg, _, entries in registries), exports,
                   dynamic, hashlib.sha256(_canonical(_strip_strings(tree)).encode()).hexdigest())


def _read(path: Path, root: Path) -> _Source:
    stat = os.stat(path)
    return _read_cached(str(Path(path).resolve()), str(Path(root).resolve()), stat.st_mtime_ns, stat.st_size)


def source_digest(path: str | Path, root: Path = REPO_ROOT) -> str:
    """The digest of one file's code (:func:`tree_digest`)."""
    return _read(Path(path), Path(root)).digest


# -- what a script can run ----------------------------------------------------------------------------------


def _exports(module: str, root: Path) -> dict[str, str]:
    path = module_file(module, root)
    if path is None:
        return {}
    source = _read(path, root)
    return dict(dict(source.registries).get(source.exports, ())) if source.exports else {}


def _modules_with_parents(module: str, root: Path) -> set[str]:
    # parents without a file are namespace packages (no code runs for them)
    return {m for m in _with_parents(module) if module_file(m, root) is not None} \
        if module_file(module, root) is not None else set()


def _targets(path: Path, root: Path, lazy: bool, choices: Mapping[str, frozenset[str]]) -> set[str]:
    """The dfml modules that running (``lazy``) or importing the file at ``path`` makes Python execute."""
    source = _read(path, root)
    found: set[str] = set()
    for record in source.imports:
        if not (lazy or record.eager):
            continue
        found |= _modules_with_parents(record.module, root)
        exports = _exports(record.module, root)
        whole = not record.names or "*" in record.names  # the package object itself: any export can be asked
        for name in record.names:
            submodule = f"{record.module}.{name}"
            if module_file(submodule, root) is not None:
                found |= _modules_with_parents(submodule, root)
                if lazy and _exports(submodule, root):
                    found |= {m for e in _exports(submodule, root).values() for m in _modules_with_parents(e, root)}
            elif name in exports:
                found |= _modules_with_parents(exports[name], root)
        if whole and lazy:
            found |= {m for e in exports.values() for m in _modules_with_parents(e, root)}
    if lazy:
        for string in source.strings:
            found |= _modules_with_parents(string, root)
        if source.dynamic:
            for registry, entries in _registries_in_reach(path, root):
                chosen = choices.get(registry)
                for key, module in entries:
                    if chosen is None or key in chosen:
                        found |= _modules_with_parents(module, root)
    return found


def _registry_id(module: str, name: str, root: Path, depth: int = 0) -> tuple[str, tuple] | None:
    """(id, entries) of the registry ``module.name``: defined there, or imported there from another module."""
    path = module_file(module, root)
    if path is None or depth > 8:
        return None
    source = _read(path, root)
    own = dict(source.registries)
    if name in own and name != source.exports:
        return f"{module}.{name}", own[name]
    for record in source.imports:
        if name in record.names:
            return _registry_id(record.module, name, root, depth + 1)
    return None


def _registries_in_reach(path: Path, root: Path) -> list[tuple[str, tuple]]:
    """The registries a module that imports by name can resolve: its own and those it imports by name."""
    source = _read(path, root)
    name = module_name(path, root)
    found = {f"{name}.{reg}": entries for reg, entries in source.registries if reg != source.exports}
    for record in source.imports:
        for imported in record.names:
            registry = _registry_id(record.module, imported, root)
            if registry is not None:
                found[registry[0]] = registry[1]
    return sorted(found.items())


def registries(root: Path = REPO_ROOT) -> dict[str, dict[str, str]]:
    """Every registry of the package: id (``<module>.<NAME>``) -> {key: module name}."""
    root = Path(root).resolve()
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        source = _read(path, root)
        for registry, entries in source.registries:
            if registry != source.exports:
                found[f"{module_name(path, root)}.{registry}"] = dict(entries)
    return found


def _frozen(choices: Choices | None, root: Path) -> tuple[tuple[str, frozenset[str]], ...]:
    if not choices:
        return ()
    known = registries(root)
    frozen = []
    for registry, keys in sorted(choices.items()):
        keys = frozenset(keys)
        if registry not in known:
            raise ValueError(f"no registry {registry!r} in {PACKAGE}/ (registries: {', '.join(sorted(known))})")
        unknown = sorted(keys - set(known[registry]))
        if unknown:
            raise ValueError(f"{registry} has no entry {', '.join(map(repr, unknown))} "
                             f"(entries: {', '.join(sorted(known[registry]))})")
        frozen.append((registry, keys))
    return tuple(frozen)


@functools.lru_cache(maxsize=1024)
def _closure(script: str, root: str, lazy: bool, choices: tuple[tuple[str, frozenset[str]], ...],
             _stamp: tuple) -> tuple[str, ...]:
    root_path, chosen = Path(root), dict(choices)
    seen: set[str] = set()
    pending = list(_targets(Path(script), root_path, lazy, chosen))
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        pending.extend(_targets(module_file(module, root_path), root_path, lazy, chosen) - seen)
    return tuple(sorted(seen))


def _stamp(root: Path) -> tuple:
    """Changes whenever a file of the package does (so a cached closure is never stale)."""
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in sorted((root / PACKAGE).rglob("*.py")))


def script_modules(script: str | Path, root: Path = REPO_ROOT, lazy: bool = True,
                   choices: Choices | None = None) -> list[str]:
    """Every dfml module that running ``script`` can import, sorted; of each registry in ``choices`` only the
    chosen entries (``lazy=False``: only the modules that importing it loads, which is what the tests compare
    with Python's own ``sys.modules``)."""
    root = Path(root).resolve()
    return list(_closure(str(Path(script).resolve()), str(root), lazy, _frozen(choices, root), _stamp(root)))


def script_code_files(script: str | Path, root: Path = REPO_ROOT, choices: Choices | None = None) -> list[str]:
    """The dfml files behind ``script``, as paths relative to ``root``, sorted."""
    root = Path(root).resolve()
    return sorted(str(module_file(m, root).relative_to(root)) for m in script_modules(script, root, choices=choices))


def imported_modules(source_file: Path, root: Path = REPO_ROOT, lazy: bool = True) -> set[str]:
    """dfml modules one file imports directly (with their parent packages). ``lazy``: also those imported inside
    functions or named as strings (registries: every entry); otherwise only what importing the file runs."""
    return _targets(Path(source_file), Path(root).resolve(), lazy, {})


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def code_digest(script: str | Path, root: Path = REPO_ROOT, choices: Choices | None = None) -> str:
    """sha256 over the paths and code digests of ``script`` and the dfml files it can run (with ``choices``: a
    job's own entries of the registries): what Snakemake reruns a job on and a checkpoint is valid for."""
    root = Path(root).resolve()
    script = Path(script).resolve()
    digest = hashlib.sha256()
    for path in [script] + [root / p for p in script_code_files(script, root, choices)]:
        digest.update(f"{_relative(path, root)}\0{source_digest(path, root)}\n".encode())
    return digest.hexdigest()


def import_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    """Module -> the dfml modules its own import statements name (inside functions too), without registries,
    strings, lazy exports' tables or its own parent packages: the graph that must have no circle."""
    root = Path(root).resolve()
    graph = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        name = module_name(path, root)
        source = _read(path, root)
        edges = set()
        for record in source.imports:
            for target in [record.module] + [f"{record.module}.{n}" for n in record.names]:
                if module_file(target, root) is not None:
                    edges.add(target)
            exports = _exports(record.module, root)
            edges |= {exports[n] for n in record.names if n in exports}
        graph[name] = {e for e in edges if e != name and not name.startswith(e + ".")}
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A circle of ``graph`` (its nodes in order, the first repeated at the end), None if it has none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# -- what the workflow's jobs choose ------------------------------------------------------------------------


def init_fusions(init: str) -> list[str]:
    """The fusions a meta-model initialisation can run (``auto``: the one it picks when the pool fuses)."""
    from dfml.baselines import AUTO_FUSION, FUSIONS as FUSION_REGISTRY

    init = AUTO_FUSION if init == "auto" else init
    return [init] if init in FUSION_REGISTRY else []


def metatrain_choices(settings: Mapping) -> dict[str, list[str]]:
    """A meta-training job's registry entries, from its settings (what the workflow passes the job): its method's
    algorithm and the fusion its initialisation can use."""
    return {ALGORITHMS: [settings["method"]["algorithm"]], FUSIONS: init_fusions(settings["metatrain"]["init"])}


def metatest_choices(params: Mapping, method: str) -> dict[str, list[str]]:
    """A meta-test job's registry entries: a configured method's algorithm (its model comes from its meta-training
    job), or a baseline's fusion."""
    from dfml.baselines import FUSIONS as FUSION_REGISTRY, baseline_parts

    configured = params.get("methods", {}).get(method)
    if configured is not None:
        return {ALGORITHMS: [configured["algorithm"]], FUSIONS: []}
    init = baseline_parts(method)[0]
    return {ALGORITHMS: [], FUSIONS: [init] if init in FUSION_REGISTRY else []}


def dataset_choices(dataset: Mapping) -> dict[str, list[str]]:
    """A data-preparation job's registry entries: its dataset's source."""
    return {SOURCES: [dataset["source"]]}


# -- DVC ------------------------------------------------------------------------------------------------------


def digest_key(path: str) -> str:
    """The key of a file in DIGESTS_FILE, as DVC names params: dfml/meta/__init__.py -> dfml.meta.__init__."""
    return str(Path(path).with_suffix("")).replace(os.sep, ".")


def key_path(key: str) -> str:
    return key.replace(".", "/") + ".py"


def digest_table(keys: Iterable[str], root: Path = REPO_ROOT) -> dict:
    """{part: {...: digest}} nested by the keys' dotted parts (what DVC reads as params)."""
    table: dict = {}
    for key in sorted(set(keys)):
        *parents, leaf = key.split(".")
        node = table
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = source_digest(Path(root) / key_path(key), root)
    return table


def _flatten(table: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for name, value in table.items():
        keys += _flatten(value, f"{prefix}{name}.") if isinstance(value, Mapping) else [f"{prefix}{name}"]
    return keys


DIGESTS_HEADER = """\
# Generated by tools/sync_dvc_deps.py (and kept current by every Snakemake run): the code digest of each
# script and dfml module that a stage of dvc.yaml runs (dfml/codedeps.py; a comment, a docstring or a
# reformatting leaves it unchanged). dvc.yaml's stages list these as params, so that `dvc status` and
# `dvc repro` follow code changes, not text changes. `git diff` of this file names the modules whose code changed.
"""


def digests_text(keys: Iterable[str], root: Path = REPO_ROOT) -> str:
    import yaml

    return DIGESTS_HEADER + yaml.safe_dump(digest_table(keys, root), sort_keys=True, default_flow_style=False)


def refresh_digests(root: Path = REPO_ROOT) -> bool:
    """Rewrite DIGESTS_FILE's values for its own keys when a file's code changed (files that are gone drop out):
    Snakemake calls it at parse time, so DVC sees code changes after any Snakemake run. True if it wrote."""
    import yaml

    path = Path(root) / DIGESTS_FILE
    if not path.is_file():
        return False
    current = path.read_text()
    keys = [k for k in _flatten(yaml.safe_load(current) or {}) if (Path(root) / key_path(k)).is_file()]
    wanted = digests_text(keys, root)
    if wanted == current:
        return False
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(wanted)
    os.replace(temporary, path)
    return True


def _stage_keys(scripts: Iterable[str], root: Path) -> list[str]:
    files = {f for s in scripts for f in [s] + script_code_files(Path(root) / s, root)}
    return sorted(digest_key(f) for f in files)


def stage_scripts(stage_lines: list[str]) -> list[str]:
    """The scripts of a stage: its ``scripts/*.py`` deps (the old form) or its ``scripts.*`` digest keys."""
    found = []
    for line in stage_lines:
        item = line.strip().removeprefix("- ").strip()
        if item.startswith("scripts/") and item.endswith(".py"):
            found.append(item)
        elif item.startswith("scripts.") and not item.endswith(":"):
            found.append(key_path(item))
    return sorted(set(found))


def sync_dvc_deps(dvc_yaml: str, root: Path = REPO_ROOT) -> str:
    """``dvc.yaml``'s text with each stage's code as params of DIGESTS_FILE: the digest keys of its scripts and
    the dfml files they import (no ``scripts/`` or ``dfml/`` file deps, which would rerun on comments)."""
    lines, out, stage_lines = dvc_yaml.splitlines(keepends=True), [], []

    def flush() -> None:
        scripts = stage_scripts(stage_lines)
        kept, skipping = [], None
        for line in stage_lines:
            stripped = line.strip()
            indent = len(line) - len(line.lstrip())
            if skipping is not None:
                if stripped and indent > skipping:
                    continue
                skipping = None
            if stripped.startswith("- dfml/") or (stripped.startswith("- scripts/") and stripped.endswith(".py")):
                continue
            if stripped.startswith(f"- {DIGESTS_FILE}:"):
                skipping = indent
                continue
            kept.append(line)
        if scripts:
            params = max(i for i, line in enumerate(kept) if line.strip() == "params:")
            item = next(line for line in kept[params + 1:] if line.strip().startswith("- "))
            indent = item[: len(item) - len(item.lstrip())]
            end = params + 1
            while end < len(kept) and (kept[end].startswith(indent + "- ") or kept[end].startswith(indent + "  ")):
                end += 1
            block = [f"{indent}- {DIGESTS_FILE}:\n"] + [f"{indent}    - {k}\n" for k in _stage_keys(scripts, root)]
            kept[end:end] = block
        out.extend(kept)
        stage_lines.clear()

    for line in lines:
        starts_stage = line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":")
        if starts_stage or (line.strip() and not line.startswith(" ")):
            flush()
        stage_lines.append(line)
    flush()
    return "".join(out)


def dvc_code_keys(dvc_yaml: str) -> list[str]:
    """Every DIGESTS_FILE key that a stage of ``dvc_yaml`` lists."""
    import yaml

    keys = set()
    for stage in (yaml.safe_load(dvc_yaml).get("stages") or {}).values():
        for entry in stage.get("params", []):
            if isinstance(entry, dict):
                keys.update(entry.get(DIGESTS_FILE, []))
    return sorted(keys)
