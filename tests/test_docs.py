"""Every reference the docs, docstrings and imports make resolves inside the repo: file paths
(`kv/static.py`, `docs/findings.md`) and dotted names (`kvpareto.kv.pruning`,
`kvpareto.engine.prefill`)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "kvpareto"
SOURCES = [*PACKAGE.rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
# a path to a file of the repo: kvpareto/kv/static.py, docs/findings.md, kv/static.py
PATH = re.compile(r"(?<![\w/.])((?:[\w.-]+/)+[\w.-]+\.(?:py|md|yaml|cpp))\b")
DOTTED = re.compile(r"(?<![\w.\"])kvpareto(?:\.\w+)+")  # not a quoted string


def _resolves_as_path(ref: str, source: Path) -> bool:
    bases = [ROOT, PACKAGE, source.parent, ROOT / "tests"]
    return any((base / ref).exists() for base in bases)


def _resolves_as_name(ref: str) -> bool:
    parts = ref.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        module = (
            base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        )
        if not module.is_file():
            continue
        rest = parts[cut:]
        if not rest:
            return True
        # one attribute of the module: defined there, or imported into it
        return len(rest) == 1 and re.search(rf"\b{rest[0]}\b", module.read_text()) is not None
    return False


def test_the_shipped_config_files_are_valid_configs():
    import yaml

    from kvpareto.config import Config

    for path in (ROOT / "configs").glob("*.yaml"):
        Config.from_dict(yaml.safe_load(path.read_text()))


def test_every_path_and_dotted_name_in_docs_and_docstrings_resolves():
    broken = []
    for source in SOURCES:
        text = source.read_text()
        for ref in set(PATH.findall(text)):
            if not _resolves_as_path(ref, source):
                broken.append(f"{source.relative_to(ROOT)}: {ref}")
        for ref in set(DOTTED.findall(text)):
            if not _resolves_as_name(ref):
                broken.append(f"{source.relative_to(ROOT)}: {ref}")
    assert not broken, "references that do not resolve:\n" + "\n".join(sorted(broken))


def test_every_import_of_kvpareto_resolves_including_those_inside_functions():
    # Imports inside functions (kept lazy so the CLI starts without torch) fail only when their
    # command runs; import-linter sees the module but not whether the name exists in it.
    import ast
    import importlib

    broken = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvpareto")
            ):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    broken.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{alias.name}"
                    )
    assert not broken, "imports that do not resolve:\n" + "\n".join(broken)
