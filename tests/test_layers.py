"""The package's shape: its layering and no import cycle (pyproject.toml [tool.importlinter]: import-linter's
contracts, checked on every import in the package, including imports inside functions -- a module that imports
from a layer above its own, or one that imports itself back through others, fails), imports at module top but for
a few named exceptions, and no file over 600 lines or function over 60.
"""
import ast
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
    assert "Contracts: 3 kept, 0 broken" in res.stdout, res.stdout[-2000:]


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


def test_the_cycle_contract_catches_a_cycle_through_a_function_level_import(tmp_path):
    """The same contracts on a copy of the package where the optimiser module imports the Stage-1 loop inside a
    function (the loop imports the optimiser): import-linter reports the cycle in flashdmd.training."""
    import shutil
    shutil.copytree(ROOT / "flashdmd", tmp_path / "flashdmd", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    optim = tmp_path / "flashdmd" / "training" / "optim.py"
    optim.write_text(optim.read_text() + textwrap.dedent("""

        def _back():
            from flashdmd.training.stage1 import distill_iteration
            return distill_iteration
    """))
    res = lint(tmp_path)
    assert res.returncode != 0
    assert "No cycles are allowed in flashdmd.training" in res.stdout and ".optim -> .stage1" in res.stdout, \
        res.stdout[-2000:]


# Imports inside functions, besides the CLI's (each subcommand imports its module when it is chosen): each one here
# for its reason. A cycle would hide behind any other (DESIGN.md: imports at module top).
LAZY_IMPORTS = {
    ("flashdmd/evaluation/report.py", "matplotlib"): "the report's curves pick matplotlib's Agg backend when drawn",
    ("flashdmd/evaluation/report.py", "matplotlib.pyplot"): "(the same)",
    ("flashdmd/training/run.py", "wandb"): "run_report_to wandb: wandb is an optional package",
    ("flashdmd/training/run.py", "accelerate.tracking"): "its WandBTracker imports wandb (the same)",
    ("flashdmd/data/sources.py", "datasets"): "a second of imports (pandas, pyarrow) only a datasets folder needs",
    ("flashdmd/networks/quant.py", "torchao.quantization"): "a second of imports, and warnings of each CUDA kernel it "
                                                            "cannot load, that only a quantised run needs",
    ("flashdmd/world/pretrain.py", "diffusers"): "the pipeline classes warn once per class without torchvision",
    ("flashdmd/world/pretrain_stages.py", "diffusers"): "(the same)",
    ("flashdmd/world/plugin.py", "flashdmd.world.data"): "the world registers (a command line's first step) without "
                                                         "torch or diffusers: each provider imports its own machinery",
    ("flashdmd/world/plugin.py", "flashdmd.world.judge"): "(the same)",
    ("flashdmd/world/plugin.py", "flashdmd.world.metrics"): "(the same)",
    ("flashdmd/world/plugin.py", "flashdmd.world.encoder"): "(the same)",
    ("flashdmd/world/data.py", "torch"): "(the same: the class names and the prompts come without torch)",
}


def _python_files():
    return sorted(p for p in (ROOT / "flashdmd").rglob("*.py") if "assets" not in p.parts)


def test_imports_sit_at_module_top():
    found = []
    for path in _python_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "flashdmd/cli.py":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found += [(rel, a.name, node.lineno) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((rel, node.module, node.lineno))
    unexplained = sorted({f"{rel}:{line} imports {mod}" for rel, mod, line in found if (rel, mod) not in LAZY_IMPORTS})
    assert not unexplained, "\n".join(unexplained)
    assert {(rel, mod) for rel, mod, _ in found} == set(LAZY_IMPORTS)  # no stale entry


FILE_LINES, FUNCTION_LINES = 600, 60


def test_no_file_over_600_lines_and_no_function_over_60():
    """Lines as the file has them; a function from its ``def`` line to its last, docstring included."""
    over = set()
    for path in _python_files():
        rel, text = path.relative_to(ROOT).as_posix(), path.read_text()
        if len(text.splitlines()) > FILE_LINES:
            over.add(rel)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    node.end_lineno - node.lineno + 1 > FUNCTION_LINES:
                over.add(f"{rel}:{node.name}")
    assert not over, sorted(over)
