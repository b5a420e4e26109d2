"""The import rule (DESIGN.md): routing/ is plain Python, models/ never imports Ray, and nothing that
serves (deployments/, models/) imports training/, so the serving image need not ship it. Read from
the source, every import statement, top-level or not."""

import ast

import pytest

from tests.support import ROOT


def imports(folder: str) -> dict[str, set[str]]:
    """file -> the top-level packages its import statements name."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("folder, banned", [
    ("routing", {"ray", "torch", "fastapi", "starlette", "transformers", "deployments", "models", "training"}),
    ("models", {"ray", "fastapi", "starlette", "deployments", "training"}),
    ("deployments", {"training"}),
])
def test_the_import_rule(folder, banned):
    broken = {f: sorted(names & banned) for f, names in imports(folder).items() if names & banned}
    assert not broken, broken
