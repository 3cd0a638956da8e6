"""Which ``dfml`` source files a script runs: derived from its imports, transitively.

Snakemake does not track imported library code, and a checkpoint must not outlive the code that
wrote it. Both need the same answer: the script plus every ``dfml`` module it imports (at any depth,
function-level imports included), plus the package ``__init__.py`` files Python executes on the way.
The answer is read from the source (``ast``), without importing anything, so the workflow can call it
at parse time. ``tests/test_codedeps.py`` checks it against the modules Python really loads.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "dfml"
REPO_ROOT = Path(__file__).resolve().parent.parent


def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The file of a dfml module (``dfml.meta`` -> dfml/meta/__init__.py), None if it is not one."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _eager_nodes(tree: ast.AST):
    """The nodes Python executes on import: everything but the bodies of functions."""
    for child in ast.iter_child_nodes(tree):
        yield child
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _eager_nodes(child)


def _named_modules(node: ast.AST, lazy: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        # `from dfml.meta import learners` imports the submodule dfml.meta.learners too
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    if lazy and isinstance(node, ast.Constant) and isinstance(node.value, str) \
            and all(part.isidentifier() for part in node.value.split(".")):
        return [node.value]  # a registry entry such as "dfml.data.sources.glyphs" (importlib); not "dfml."
    return []


def imported_modules(source_file: Path, root: Path = REPO_ROOT, lazy: bool = True) -> set[str]:
    """dfml modules one file imports (with their parent packages). ``lazy``: also those imported inside
    functions or named as strings for ``importlib``; otherwise only what importing the file runs."""
    tree = ast.parse(Path(source_file).read_text(), filename=str(source_file))
    found: set[str] = set()
    for node in (ast.walk(tree) if lazy else _eager_nodes(tree)):
        for name in _named_modules(node, lazy):
            if name.split(".")[0] == PACKAGE and module_file(name, root) is not None:
                # parents without a file are namespace packages (no code runs for them)
                found.update(m for m in _with_parents(name) if module_file(m, root) is not None)
    return found


def _closure(script: str, root: str, lazy: bool) -> tuple[str, ...]:
    root_path = Path(root)
    seen: set[str] = set()
    pending = list(imported_modules(Path(script), root_path, lazy))
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        pending.extend(imported_modules(module_file(module, root_path), root_path, lazy) - seen)
    return tuple(sorted(seen))


def script_modules(script: str | Path, root: Path = REPO_ROOT, lazy: bool = True) -> list[str]:
    """Every dfml module that running ``script`` can import, sorted (``lazy=False``: only those that
    importing it loads, which is what the tests compare with Python's own ``sys.modules``)."""
    return list(_closure(str(Path(script).resolve()), str(Path(root).resolve()), lazy))


def script_code_files(script: str | Path, root: Path = REPO_ROOT) -> list[str]:
    """The dfml files behind ``script``, as paths relative to ``root``, sorted (the rule's code inputs)."""
    root = Path(root).resolve()
    return sorted(str(module_file(m, root).relative_to(root)) for m in script_modules(script, root))


def code_digest(script: str | Path, root: Path = REPO_ROOT) -> str:
    """sha256 over the script and its dfml files (path and content): changes whenever any of them does."""
    root = Path(root).resolve()
    digest = hashlib.sha256()
    script = Path(script).resolve()
    for path in [script] + [root / p for p in script_code_files(script, root)]:
        name = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def sync_dvc_deps(dvc_yaml: str, root: Path = REPO_ROOT) -> str:
    """``dvc.yaml``'s text with each stage's ``dfml/`` deps replaced by the files its scripts import
    (the stage's ``scripts/*.py`` deps), so that DVC and Snakemake rerun on the same edits."""
    lines, out, stage_lines = dvc_yaml.splitlines(keepends=True), [], []

    def flush() -> None:
        scripts = [line.split("- ", 1)[1].strip() for line in stage_lines
                   if line.strip().startswith("- scripts/") and line.strip().endswith(".py")]
        code = sorted({f for s in scripts for f in script_code_files(Path(root) / s, root)})
        kept = [line for line in stage_lines if not line.strip().startswith("- dfml/")]
        if code:
            last_script = max(i for i, line in enumerate(kept) if line.strip().startswith("- scripts/"))
            indent = kept[last_script][: len(kept[last_script]) - len(kept[last_script].lstrip())]
            kept[last_script + 1:last_script + 1] = [f"{indent}- {path}\n" for path in code]
        out.extend(kept)
        stage_lines.clear()

    for line in lines:
        starts_stage = line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":")
        if starts_stage or (line.strip() and not line.startswith(" ")):
            flush()
        stage_lines.append(line)
    flush()
    return "".join(out)
