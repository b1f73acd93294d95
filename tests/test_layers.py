"""The package's layering (pyproject.toml [tool.importlinter]) holds: import-linter's contracts, checked on
every import in the package, including imports inside functions. A module that imports from a layer above
its own -- training/ importing flashdmd.world, evaluation/ importing flashdmd.training -- fails this test.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` with the contracts in its pyproject.toml."""
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache"],
                          cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": ""})


def test_package_keeps_its_layers():
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in res.stdout, res.stdout[-2000:]


def test_contracts_catch_a_world_import_below_the_face(tmp_path):
    """The same contracts on a copy of the package where training/ imports the world: import-linter reports it."""
    import shutil
    shutil.copytree(ROOT / "flashdmd", tmp_path / "flashdmd", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bad = tmp_path / "flashdmd" / "training" / "leak.py"
    bad.write_text(textwrap.dedent("""
        def f():
            from flashdmd.world.prompts import prompt_for
            return prompt_for
    """))
    res = lint(tmp_path)
    assert res.returncode != 0
    assert "flashdmd.training.leak -> flashdmd.world.prompts" in res.stdout, res.stdout[-2000:]
