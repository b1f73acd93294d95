"""BENCHMARKS.md's tables are what benchmarks/tables.py makes from benchmarks/results/ (so a number cannot drift from
its file), every Markdown table in the user-facing documents is well-formed, their relative links resolve, and they
say when a figure was made by date and commit only. Pure file reading: well under a second."""
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "BENCHMARKS.md", REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def load_tables():
    spec = importlib.util.spec_from_file_location("benchmark_tables", REPO / "benchmarks" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_tables_match_the_result_files(capsys):
    tables = load_tables()
    assert tables.main(["--check"]) == 0, capsys.readouterr()


def test_check_fails_on_a_changed_number_and_write_restores_it(tmp_path, capsys):
    """--check is not vacuous: one digit changed inside a generated table fails it; --write puts it back."""
    tables = load_tables()
    text = (REPO / "BENCHMARKS.md").read_text()
    row = "| world-sdxl | 50 | 100 | 10.80 |"          # the 50-step teacher's FD, from teachers.json
    assert row in text
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(text.replace(row, "| world-sdxl | 50 | 100 | 10.81 |"))
    assert tables.main(["--check", "--doc", str(doc)]) == 1
    assert "teachers" in capsys.readouterr().err
    assert tables.main(["--write", "--doc", str(doc)]) == 0
    assert doc.read_text() == text


def test_check_fails_on_a_table_block_without_its_end(tmp_path, capsys):
    tables = load_tables()
    doc = tmp_path / "BENCHMARKS.md"
    text = (REPO / "BENCHMARKS.md").read_text()
    assert "\n<!-- end table -->\n" in text
    doc.write_text(text.replace("\n<!-- end table -->\n", "\n", 1))
    assert tables.main(["--check", "--doc", str(doc)]) == 1
    assert "without its" in capsys.readouterr().err


def markdown_tables(text: str):
    """(first line number, rows) of each pipe table outside code fences."""
    out, rows, start, fence = [], [], 0, False
    for i, line in enumerate(text.splitlines() + [""], 1):
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("|"):
            if not rows:
                start = i
            rows.append(line)
        elif rows:
            out.append((start, rows))
            rows = []
    return out


def cells(row: str) -> int:
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_table_row_has_its_headers_columns(doc):
    for start, rows in markdown_tables(doc.read_text()):
        assert len(rows) >= 2 and set(rows[1].replace("|", "").strip()) <= set("-: "), (doc.name, start, rows[:2])
        n = cells(rows[0])
        for k, row in enumerate(rows):
            assert cells(row) == n, f"{doc.name}:{start + k}: {cells(row)} cells, the header has {n}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = doc.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)\)", text)
    targets += re.findall(r"`((?:docs/figures|benchmarks/results)/[\w.\-]+\.(?:png|json))`", text)
    missing = [t for t in targets if "://" not in t and not (doc.parent / t).exists() and not (REPO / t).exists()]
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_figures_are_dated_not_attributed_to_sittings(doc):
    hits = [line for line in doc.read_text().splitlines() if re.search(r"\b(session|sitting)s?\b", line, re.I)]
    assert not hits, f"{doc.name}: say when a figure was made by date and commit: {hits}"
