"""BENCHMARKS.md section 3a's pre-registered rules as code: the Welch two-standard-error verdict of the tables, the
DMD2 sweep's winner, and the equal-compute budget (every row spends the budget's seconds within half an evaluation
interval)."""
import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import tables  # noqa: E402

A = runpy.run_path(str(ROOT / "benchmarks" / "attribution.py"), run_name="attribution")


def test_verdict_is_welch_two_standard_errors():
    assert tables.verdict([9.0, 9.2, 9.1], [11.0, 11.3, 11.1]) == "better"
    assert tables.verdict([11.0, 11.3, 11.1], [9.0, 9.2, 9.1]) == "worse"
    # means 1 apart, but each side spreads by ~1.5: the standard error of the difference is ~1.2 -> level
    assert tables.verdict([8.0, 10.0, 11.0], [9.0, 12.0, 11.0]) == "level"
    assert tables.verdict([9.0], [11.0, 11.2]) == "–"  # fewer than two seeds a side: no verdict


def test_the_sweep_winner_is_the_lowest_best_val_fd_once_every_row_is_in():
    names = ["dmd2", *A["SWEEP"]]
    recs = [{"row": n, "teacher": "world-sdxl", "seed": 100,
             "val_curve": [[0, 5.0, 0.9], [19, 20.0 - i, 0.9], [38, 21.0 - i, 0.9]]} for i, n in enumerate(names)]
    assert A["sweep_winner"](recs[:-1]) is None  # one sweep row missing
    assert A["sweep_winner"](recs) == names[-1]  # step 0 (the teacher's weights) never counts
    other_seed = [dict(r, seed=0) for r in recs]
    assert A["sweep_winner"](other_seed) is None  # only the tuning seed's records decide


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("row", ["preset", "dmd2", "dmd2_head", "preset_routing_off", "preset_pull_off",
                                 "preset_ttur5", "sweep_b09", "dmd2_best", "dmd2_best_head"])
def test_every_row_spends_the_budget(row, family):
    cost = json.loads((ROOT / "benchmarks" / "results" / f"attribution_cost_{family}.json").read_text())["rows"]
    per = cost[{"dmd2_best": "dmd2", "sweep_b09": "dmd2", "dmd2_best_head": "dmd2_head"}.get(row, row)][
        "seconds_per_generator_update"]
    budget = A["BUDGET"][family] * cost["dmd2"]["seconds_per_generator_update"]
    steps, every = A["row_steps"](row, family)
    # rounded to a multiple of the 16 evaluations: at most 8 updates from the budget's seconds / the row's
    assert steps == every * A["EVALS"] and abs(steps - budget / per) <= A["EVALS"] / 2


def test_the_document_states_the_harness_budgets():
    """BENCHMARKS.md section 3a's B per teacher (and each table's heading) is the harness's BUDGET."""
    doc = (ROOT / "BENCHMARKS.md").read_text()
    sdxl, sd3 = A["BUDGET"]["sdxl"], A["BUDGET"]["sd3"]
    assert f"world-sdxl {sdxl} (DMD2's best" in doc and f"world-sd3 {sd3} (" in doc
    assert f"World-sdxl (B = {sdxl} DMD2 updates):" in doc and f"World-sd3 (B = {sd3} DMD2 updates):" in doc


def test_figure_series_means_over_seeds_on_cpu_hours(tmp_path):
    """The figure's numbers: val FD mean / min / max over the reported seeds at each shared evaluation, x in CPU hours
    from the record's measured seconds per update; test FD mean and sd at the points; the tuning seed kept apart."""
    def rec(seed, fds, tests, row="preset"):
        return {"row": row, "teacher": "world-sdxl", "seed": seed, "compute": {"seconds_per_update": 1800.0},
                "val_curve": [[i * 10, fd, 0.9] for i, fd in enumerate(fds)],
                "points": [{"generator_steps": 10 * (k + 1), "test_fd_mean": t} for k, t in enumerate(tests)]}
    recs = [rec(0, [20.0, 12.0, 10.0], [11.0, 9.0]), rec(1, [20.0, 14.0, 8.0], [13.0, 9.0]),
            rec(100, [20.0, 1.0, 1.0], [1.0, 1.0], row="dmd2")]
    s = A["figure_series"](recs, "world-sdxl")
    assert list(s) == ["preset"] and s["preset"]["seeds"] == [0, 1]
    assert s["preset"]["val"] == [(0.0, 20.0, 20.0, 20.0), (5.0, 13.0, 12.0, 14.0), (10.0, 9.0, 8.0, 10.0)]
    assert s["preset"]["test"][0] == pytest.approx((5.0, 12.0, 2 ** 0.5)) and s["preset"]["test"][1][2] == 0.0
    sweep = A["figure_series"](recs, "world-sdxl", sweep=True)
    assert list(sweep) == ["dmd2"] and sweep["dmd2"]["seeds"] == [100]
    A["draw_figure"](s, "world-sdxl", tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_better_dmd2_is_the_lower_mean_at_that_point_among_rows_with_enough_seeds():
    def recs(row, fds):
        return [{"row": row, "points": [{"test_fd_mean": fd}] * 3} for fd in fds]
    both = {"dmd2": recs("dmd2", [11.0, 12.0]), "dmd2_best": recs("dmd2_best", [9.0, 10.0])}
    assert tables.better_dmd2(both, 2) == "dmd2_best"
    one_best = {"dmd2": recs("dmd2", [11.0, 12.0]), "dmd2_best": recs("dmd2_best", [9.0])}
    assert tables.better_dmd2(one_best, 2) == "dmd2"  # a single seed does not count for a verdict
    assert tables.better_dmd2(one_best, 2, min_seeds=1) == "dmd2_best"
    assert tables.better_dmd2({}, 0) is None


def test_difference_states_the_gap_twice_its_welch_standard_error_and_the_verdict():
    a, b = [9.0, 9.2, 9.1], [11.0, 11.3, 11.1]
    se = (tables.statistics.variance(a) / 3 + tables.statistics.variance(b) / 3) ** 0.5
    assert tables.difference(a, b) == f"{9.1 - 11.1333333:+.2f} ± {2 * se:.2f}: better"
    assert tables.difference(a, [11.0]) == "–"


def test_images_to_reach_are_the_first_val_crossing_as_a_share_of_dmd2s_images_and_seconds():
    """A row reaches the target at its first evaluation after step 0 at or below it; the shares divide the mean
    images (and seconds) over the seeds that reach it by the DMD2 row's at B; a seed that never does is counted."""
    def rec(curve, per=2.0):
        return {"val_curve": [[s, fd, 0.9] for s, fd in curve],
                "compute": {"images_per_update": 32, "seconds_per_update": per}}
    assert tables.steps_to_reach(rec([(0, 5.0), (10, 12.0), (20, 9.0), (30, 8.0)]), 9.0) == 20  # step 0 never
    assert tables.steps_to_reach(rec([(0, 5.0), (10, 12.0)]), 9.0) is None
    rs = [rec([(0, 26.0), (10, 9.5), (20, 8.5)]), rec([(0, 26.0), (10, 8.9)]), rec([(0, 26.0), (10, 9.5)])]
    cells = tables.reach_cells(rs, 9.0, images_b=3200.0, seconds_b=400.0)
    # reaching seeds: 20 and 10 steps -> 640 and 320 images (mean 480, sd 226), 40 and 20 s (mean 30)
    assert cells == ["2 of 3", "480 ± 226", "15 %", "8 %"]
    assert tables.reach_cells(rs[2:], 9.0, 3200.0, 400.0)[:2] == ["0 of 1", "not reached (best val FD 9.50)"]
    # the headline's cell says the same in words: shares and seeds reaching, or the best val FD seen
    recs = {"dmd2": [{"points": [{}, {}, {"val_fd": 9.0}], "compute": {"images": 3200.0, "seconds": 400.0}}]}
    assert tables.reach_text(rs, recs, "dmd2") == "15 % of its images, 8 % of its CPU time (2 of 3 seeds reached it)"
    assert tables.reach_text(rs[2:], recs, "dmd2") == "not reached (0 of 1 seeds; best val FD 9.50)"


def test_every_row_the_harness_runs_has_one_name_in_the_tables_and_figures():
    """One list of the rows' names (attribution.LABELS), which the tables read: a new row must be named there."""
    runnable = [r for r in A["ROWS"] if r not in A["SWEEP"]] + list(A["FROM_SWEEP"])
    assert sorted(A["LABELS"]) == sorted(runnable)
    assert tables.ATTR_ROWS == A["LABELS"] and len(set(A["LABELS"].values())) == len(A["LABELS"])


def test_the_readme_headline_states_the_verdicts_and_the_papers_unit(monkeypatch):
    """README's headline rows come from the records alone: the better DMD2 by the rule, the two verdicts (the claim,
    and whether the head explains it), and the paper's unit for the preset and DMD2 + the head."""
    def rec(row, seed, tests, val_b, curve):
        return {"row": row, "teacher": "world-sdxl", "seed": seed,
                "points": [{"test_fd_mean": t, "val_fd": val_b} for t in tests],
                "val_curve": [[s, fd, 0.9] for s, fd in curve],
                "compute": {"images_per_update": 32, "seconds_per_update": 1.0, "images": 3200, "seconds": 100.0}}
    records = {"world-sdxl": {
        "preset": [rec("preset", 0, [8.0, 7.8, 7.7], 7.5, [(0, 20), (25, 8.9), (50, 8.0)]),
                   rec("preset", 1, [8.2, 7.9, 7.8], 7.6, [(0, 20), (50, 9.5)])],
        "dmd2": [rec("dmd2", s, [14.0, 12.0, 9.5 + s], 9.0, [(0, 20)]) for s in (0, 1)],
        "dmd2_best": [rec("dmd2_best", s, [13.0, 10.0, 9.0 + s / 10], 9.0, [(0, 20)]) for s in (0, 1)],
        "dmd2_head": [rec("dmd2_head", 0, [13.6, 13.6, 9.3], 9.1, [(0, 20), (100, 9.2)])],
        "dmd2_best_head": [rec("dmd2_best_head", s, [7.9, 7.9, 7.9 + s / 10], 7.6, [(0, 20), (25, 8.5)])
                           for s in (0, 1)]}}
    monkeypatch.setattr(tables, "attr_records", lambda teacher: records.get(teacher, {}))
    header, rows, _, _ = tables.attribution_headline()
    sdxl = {r[1]: r for r in rows if r[0] == "world-sdxl"}
    assert sdxl["the better DMD2: DMD2, best of its sweep"][2] == "2"
    assert sdxl["preset against the better DMD2 (verdict)"][3].endswith("better")
    # the preset reaches val FD 9.0 at step 25 in seed 0 only: 800 images of DMD2's 3 200
    assert sdxl["Flash-DMD preset"][6] == "25 % of its images, 25 % of its CPU time (1 of 2 seeds reached it)"
    assert sdxl["DMD2 + the preset's head"][6] == "not reached (0 of 1 seeds; best val FD 9.20)"
    assert sdxl["DMD2 + the head against the preset (verdict)"][3:6] == ["–", "–", "–"]  # one seed: no verdict
    # DMD2 tuned and given the head (added after fixing): its row, reach, and its verdict against the preset
    assert sdxl["DMD2, best of its sweep + the head (added)"][2:4] == ["2", "7.90 ± 0.00 (2)"]
    assert sdxl["DMD2, best of its sweep + the head (added)"][6].endswith("(2 of 2 seeds reached it)")
    assert sdxl["DMD2 tuned + the head against the preset (verdict, added)"][3:5] == ["-0.20 ± 0.20: level", "+0.05 ± 0.10: level"]
    assert [r[1] for r in rows if r[0] == "world-sd3"] == ["no record of the preset and DMD2 yet"]
    assert all(len(r) == len(header) for r in rows)
    assert "verdicts better / better / better" in tables.attribution_claim("world-sdxl")
    # the at-a-glance cell of the head question: one seed of dmd2_head gives no verdict; the tuned row is level at
    # B/4 and B/2, worse at B (+0.20 against twice its standard error, 0.14)
    head = tables.attribution_head_claim("world-sdxl")
    assert "DMD2 + the head against the preset at B/4, B/2, B: – / – / – (1 / 2 seeds)" in head
    assert "DMD2 tuned + the head (added) against the preset at B/4, B/2, B: level / level / worse (2 / 2 seeds)" in head
    assert tables.attribution_head_claim("world-sd3") == "no run landed yet"


def test_readme_headline_is_a_generated_block_checked_with_the_others(tmp_path, capsys):
    """The README's block is remade and checked like BENCHMARKS.md's: a changed number in it fails --check."""
    text = (ROOT / "README.md").read_text()
    assert "<!-- table: attribution_headline -->" in text
    doc = tmp_path / "README.md"
    row = next(line for line in text.splitlines() if line.startswith("| world-sdxl | Flash-DMD preset |"))
    doc.write_text(text.replace(row, row.replace("|", "| 0", 1)))
    assert tables.main(["--check", "--doc", str(doc)]) == 1
    assert "attribution_headline" in capsys.readouterr().err
    assert tables.main(["--write", "--doc", str(doc)]) == 0 and doc.read_text() == text


def test_a_run_refuses_a_flashdmd_from_another_checkout(monkeypatch, tmp_path):
    """A record names its checkout's commit, so the harness checks before any work that the flashdmd it imports is
    that checkout's (a shared .venv's editable install of another checkout would otherwise run unseen)."""
    import common
    common.check_own_flashdmd()  # this checkout: passes
    monkeypatch.setattr(common, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="PYTHONPATH"):
        common.check_own_flashdmd()


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_the_tuned_dmd2_with_the_head_is_the_sweep_winner_plus_the_whole_head(family):
    """dmd2_best_head (added after fixing): the sweep winner's optimiser settings with the preset's head whole, on the
    shipped DMD2 (TTUR 5); it differs from dmd2_head only in the winner's keys, and its config is valid."""
    from flashdmd.training.config import DistillConfig
    results = A["load_results"](ROOT / "benchmarks" / "results" / "attribution.json")
    winner = A["sweep_winner"](results)
    preset, overrides = A["row_spec"]("dmd2_best_head", results, family)
    assert preset == "dmd2" and overrides == {**A["ROWS"][winner][1], **A["HEAD"]}
    head_preset, head = A["row_spec"]("dmd2_head", results, family)
    assert head_preset == preset and {k: v for k, v in overrides.items() if k not in head} == A["ROWS"][winner][1]
    cfg = DistillConfig.from_sources(str(ROOT / "configs" / f"world_{family}_{preset}.yaml"),
                                     [f"{k}={v}" for k, v in overrides.items()])
    assert cfg.disc_condition == "text" and cfg.fake_score_ttur == 5 and list(cfg.optim_betas) == [0.9, 0.999]
