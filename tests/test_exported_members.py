"""The house rules that imports must keep: triggers use only processor's public face, the core
knows no trigger, and provision stands alone (../shared/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import processor
from tests.paths import REPO


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in ``path``, nested ones included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


def test_every_public_name_is_exported() -> None:
    exported = processor.__all__
    assert exported == sorted(set(exported), key=exported.index), "duplicates in __all__"
    missing = [name for name in exported if not hasattr(processor, name)]
    assert missing == [], f"in __all__ but not in processor: {missing}"
    public = {
        name
        for name, value in vars(processor).items()
        if not name.startswith("_") and not isinstance(value, type(processor))
    }
    assert public == set(exported), f"public but not in __all__: {public - set(exported)}"


@pytest.mark.parametrize("path", modules("triggers"), ids=lambda p: str(p.relative_to(REPO)))
def test_triggers_import_only_the_public_face(path: Path) -> None:
    private = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for line, module, _ in imports(path)
        if module.startswith("processor.")
    ]
    assert private == [], "import these from `processor` (its __all__) instead"
    for line, module, names in imports(path):
        if module == "processor":
            unknown = sorted(set(names) - set(processor.__all__))
            assert unknown == [], f"{path.relative_to(REPO)}:{line}: not public: {unknown}"


@pytest.mark.parametrize("path", modules("processor"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_core_knows_no_trigger(path: Path) -> None:
    upward = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for line, module, _ in imports(path)
        if module.split(".")[0] in ("triggers", "runpod", "provision")
    ]
    assert upward == []


@pytest.mark.parametrize("path", modules("provision"), ids=lambda p: str(p.relative_to(REPO)))
def test_provision_stands_alone(path: Path) -> None:
    reaching = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for line, module, _ in imports(path)
        if module.split(".")[0] in ("processor", "triggers")
    ]
    assert reaching == []


def test_a_private_import_in_a_trigger_is_caught(tmp_path: Path) -> None:
    """The guard itself can fail: a trigger that reaches into a room is reported."""
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    from processor.job.runner import JobRunner\n")
    assert [module for _, module, _ in imports(sneaky)] == ["processor.job.runner"]


def test_every_error_shares_the_one_base() -> None:
    """Every exception class the product defines derives from Comfys3Error, whose str() is
    the sentence a person reads (provision, a build-time tool that stands alone, has its own)."""
    strays = []
    for package in ("processor", "triggers"):
        for path in modules(package):
            if path.name == "__main__.py":
                continue  # running it is what it does
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            module = importlib.import_module(name)
            for value in vars(module).values():
                if (
                    isinstance(value, type)
                    and issubclass(value, BaseException)
                    and value.__module__ == name
                    and not issubclass(value, processor.Comfys3Error)
                ):
                    strays.append(f"{name}.{value.__name__}")
    assert strays == []
