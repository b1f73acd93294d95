"""benchmarks/rl_prereg.py, the harness of BENCHMARKS.md section 4's pre-registered Stage-2 comparison: the verdict
and the tuning rule on hand-made records, the seeded preference flipping of the shuffled-LRM control, the global steps
the students at RL updates 100 ... 400 sit at, and one end-to-end smoke (bases, tune, report, verdict at tiny sizes on
the world teacher) through the same code as the campaign."""
import importlib.util
import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch

from flashdmd.rewards.pairs import load_pairs, read_records, write_pairs

ROOT = Path(__file__).resolve().parent.parent
P = runpy.run_path(str(ROOT / "benchmarks" / "rl_prereg.py"), run_name="rl_prereg")
METRICS = P["METRICS"]


def rec(phase, row, base, lr, ckpts):
    """A record whose checkpoints {update: metrics mean} are given (update 0 = the base)."""
    return {"phase": phase, "row": row, "base_seed": base, "rl_lr": lr, "rl_steps": max(ckpts),
            "checkpoints": {str(u): {"mean": {k: m.get(k, 0.0) for k in METRICS}} for u, m in ckpts.items()}}


BASE = {"fd": 10.0, "oracle": -0.50, "confidence": -0.30}


def report(joint, distill, rl_alone, shuffled, bases=(3, 4, 5)):
    """Report records from per-base final metrics (lists over the bases)."""
    out = []
    for i, b in enumerate(bases):
        for row, vals in (("joint_5", joint), ("distill_5", distill), ("rl_alone", rl_alone),
                          ("rl_alone_shuffled", shuffled)):
            out.append(rec("report", row, b, 1e-7, {0: BASE, 400: vals[i]}))
    return out


def m(fd, oracle, confidence=-0.30):
    return {"fd": fd, "oracle": oracle, "confidence": confidence}


def test_verdict_shown_when_joint_costs_less_fd_per_gain_and_rl_beats_shuffled():
    # rl_alone: +1.0 FD per +0.1 oracle (10 per unit); joint_5 against distill_5: +0.2 FD per +0.1 (2 per unit)
    v = P["verdict"](report(joint=[m(10.5, -0.35, -0.29), m(10.6, -0.34, -0.28), m(10.4, -0.36, -0.29)],
                            distill=[m(10.3, -0.45), m(10.4, -0.44), m(10.2, -0.46)],
                            rl_alone=[m(11.0, -0.40), m(11.2, -0.38), m(10.9, -0.41)],
                            shuffled=[m(10.1, -0.50), m(10.0, -0.49), m(10.05, -0.51)]))
    reg, learn = v["regularises"], v["learns_preference"]
    assert reg["shown"] and reg["statement"].startswith("Joint RL regularises: shown")
    assert reg["per_base"]["3"]["joint_5"]["fd_per_oracle"] == pytest.approx(2.0)
    assert reg["per_base"]["3"]["rl_alone"]["fd_per_oracle"] == pytest.approx(10.0)
    assert learn["shown"] and learn["statement"].startswith("RL learns the preference: shown")
    # per base changes against the row's own control: joint_5 against distill_5, the others against the base
    assert v["per_base"]["joint_5"]["3"]["400"]["fd"] == pytest.approx(0.2)
    assert v["per_base"]["rl_alone"]["4"]["400"]["oracle"] == pytest.approx(0.12)
    assert v["rl_steps"] == 400 and "paper" in v


def test_verdict_not_shown_within_two_standard_errors():
    # joint_5 lower on average, but the per-base differences scatter: mean -4, SE > 2
    v = P["verdict"](report(joint=[m(10.5, -0.35), m(12.0, -0.34), m(10.0, -0.36)],
                            distill=[m(10.3, -0.45), m(10.4, -0.44), m(10.2, -0.46)],
                            rl_alone=[m(11.0, -0.40), m(11.2, -0.38), m(10.9, -0.41)],
                            shuffled=[m(10.1, -0.43), m(10.0, -0.36), m(10.05, -0.47)]))
    reg = v["regularises"]
    assert reg["difference"] < 0 and not reg["lower_by_margin"] and not reg["shown"]
    assert reg["statement"].startswith("Joint RL regularises: not shown")
    # rl_alone's gain over the shuffled LRM's: +0.03, -0.02, +0.06 -> mean > 0 but within 2 SE
    learn = v["learns_preference"]
    assert learn["difference"] > 0 and not learn["shown"] and "not shown" in learn["statement"]


def test_verdict_not_shown_when_confidence_falls_or_oracle_does_not_rise():
    good_joint = [m(10.5, -0.35, -0.40), m(10.6, -0.34, -0.41), m(10.4, -0.36, -0.40)]   # confidence -0.1
    args = dict(distill=[m(10.3, -0.45), m(10.4, -0.44), m(10.2, -0.46)],
                rl_alone=[m(11.0, -0.40), m(11.2, -0.38), m(10.9, -0.41)], shuffled=[m(10, -0.5)] * 3)
    v = P["verdict"](report(joint=good_joint, **args))
    assert v["regularises"]["lower_by_margin"] and not v["regularises"]["confidence_not_falling"]
    assert not v["regularises"]["shown"] and "falling" in v["regularises"]["statement"]
    # joint_5 no better than its distillation on base 4's oracle: no FD cost per unit of gain there
    v = P["verdict"](report(joint=[m(10.5, -0.35), m(10.6, -0.44), m(10.4, -0.36)], **args))
    assert not v["regularises"]["shown"] and "no positive oracle gain" in v["regularises"]["statement"]
    assert "joint_5 on base 4" in v["regularises"]["statement"]


def test_verdict_incomplete_says_not_shown():
    recs = [r for r in report(joint=[m(10, -0.4)] * 3, distill=[m(10, -0.45)] * 3, rl_alone=[m(10, -0.4)] * 3,
                              shuffled=[m(10, -0.5)] * 3) if not (r["row"] == "distill_5" and r["base_seed"] == 5)]
    v = P["verdict"](recs)
    assert v["incomplete"] == ["distill_5 on base 5"]
    assert v["regularises"]["statement"].startswith("Joint RL regularises: not shown (incomplete")
    assert not v["learns_preference"]["shown"]


def test_tuning_rule_largest_within_five_percent_on_both_bases_else_smallest():
    recs = []
    fd = {("rl_alone", "1e-7"): (10.1, 9.6), ("rl_alone", "2.5e-7"): (10.4, 9.9), ("rl_alone", "5e-7"): (10.6, 9.9),
          ("joint_5", "1e-7"): (10.6, 9.6), ("joint_5", "2.5e-7"): (10.8, 9.9), ("joint_5", "5e-7"): (11.0, 10.2)}
    for (row, lr), fds in fd.items():
        for b, (base_fd, f) in zip((0, 1), zip((10.0, 9.5), fds)):
            recs.append(rec("tune", row, b, float(lr), {0: {"fd": base_fd}, 400: {"fd": f}}))
    c = P["choose_lrs"](recs)
    assert c["rl_alone"]["rl_lr"] == "2.5e-7"           # 5e-7: +6 % on base 0
    assert c["rl_alone"]["lrs"]["5e-7"]["bases"]["0"]["fd_change"] == pytest.approx(0.06)
    assert c["joint_5"]["rl_lr"] == "1e-7" and c["joint_5"]["rule"].startswith("none within")
    assert c["rl_alone_shuffled"]["rl_lr"] == "2.5e-7"
    with pytest.raises(ValueError, match="lacks joint_5 on base 1"):
        P["choose_lrs"]([r for r in recs if not (r["row"] == "joint_5" and r["base_seed"] == 1)])


def test_students_global_steps():
    gs = P["global_step"]
    # RL alone from the 300-step base: one global step per RL update
    assert [gs(300, 0, u) for u in (100, 200, 300, 400)] == [400, 500, 600, 700]
    # joint 5:1: a generator update after every 5th RL update, counted in the student at that update
    assert [gs(300, 5, u) for u in (100, 200, 300, 400)] == [420, 540, 660, 780]
    assert P["eval_every"]([400, 500, 600, 700]) == 100 and P["eval_every"]([420, 540, 660, 780]) == 60


def _pairs_file(path: Path, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    recs = [{"prompt": f"a photo of a shirt {i}", "a": 2 * i, "b": 2 * i + 1,
             "preferred": "a" if torch.rand(1, generator=g).item() < 0.6 else "b", "label": 0,
             "meta": {"score_a": 0.1 * i, "score_b": -0.1 * i}} for i in range(n)]
    write_pairs(path, recs, torch.randn(2 * n, 4, 8, 8, generator=g))


def test_flipping_is_a_seeded_real_swap(tmp_path):
    _pairs_file(tmp_path / "same16.jsonl", 30, 1)
    _pairs_file(tmp_path / "steps16v4.jsonl", 20, 2)
    info = P["write_flipped"](tmp_path)
    expected = (torch.rand(50, generator=torch.Generator().manual_seed(0)) < 0.5).tolist()
    assert info["flipped"] == sum(expected) and info["flipped_fraction"] == pytest.approx(sum(expected) / 50)
    assert info["files"]["same16"]["flipped"] == sum(expected[:30])
    flags = []
    for name, offset in (("same16", 0), ("steps16v4", 30)):
        orig, new = tmp_path / f"{name}.jsonl", tmp_path / f"{name}_shuffled.jsonl"
        o, f = load_pairs(orig), load_pairs(new)
        ro, rf = read_records(orig), read_records(new)
        for i in range(len(ro)):
            flip = expected[offset + i]
            flags.append(rf[i]["meta"]["flipped"])
            assert (rf[i]["preferred"] != ro[i]["preferred"]) == flip
            assert {k: v for k, v in rf[i].items() if k not in ("preferred", "meta")} == \
                   {k: v for k, v in ro[i].items() if k not in ("preferred", "meta")}
            # the loader's winner and loser: swapped where flipped, the same latents elsewhere
            w, l_ = (f.losers[i], f.winners[i]) if flip else (f.winners[i], f.losers[i])
            assert torch.equal(w, o.winners[i]) and torch.equal(l_, o.losers[i])
    assert flags == expected
    # deterministic: a second call flips the same pairs
    assert P["write_flipped"](tmp_path)["flipped"] == info["flipped"]


def run(argv):
    threads = torch.get_num_threads()
    try:
        return P["main"](argv)
    finally:
        torch.set_num_threads(threads)   # the script pins its own


def test_smoke_end_to_end(tmp_path, capsys, monkeypatch):
    """bases -> (report refused without tuning.json) -> tune -> report -> verdict, at tiny sizes: 1 Stage-1 generator
    update at batch 2, 5 RL updates with students at updates 1 and 5 (joint_5's 5th followed by its first
    distillation cycle), N = 20, one noise seed. The report runs its shuffled-LRM row only (rl_alone and joint_5 are
    the tune step's code; distill_5 is joint_5's row at rl.py's vanishing step, checked below without a run)."""
    out = tmp_path / "R"
    small = ["--smoke", "--rl-steps", "5", "--checkpoints", "1", "5", "--out", str(out), "--no-progress"]
    assert run(["bases", "--seeds", "0"] + small) == 0
    assert (out / "bases" / "seed0" / "checkpoints" / "step_00000001" / "state.json").is_file()
    assert run(["report", "--bases", "0"] + small) == 2
    assert "tuning.json is missing" in capsys.readouterr().err
    assert run(["tune", "--bases", "0", "--lrs", "1e-7"] + small) == 0
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning["rl_alone"]["rl_lr"] == "1e-7" and "bases" in tuning["deviations"]
    # the shuffled LRM's place taken by a copy of the shipped one (the shuffled-lrm step takes minutes)
    shutil.copytree(ROOT / "flashdmd" / "world" / "assets" / "lrm-sdxl", out / "lrm-sdxl-shuffled")
    report = ["report", "--bases", "0", "--rows", "rl_alone_shuffled"] + small
    assert run(report) == 0
    recs = json.loads((out / "stage2_prereg.json").read_text())
    assert [(r["phase"], r["row"]) for r in recs] == [("tune", "rl_alone"), ("tune", "joint_5"),
                                                       ("report", "rl_alone_shuffled")]
    by = {(r["phase"], r["row"]): r for r in recs}
    joint = by[("tune", "joint_5")]
    assert [(c["rl_steps"], c["generator_steps"], c["global_step"]) for c in joint["checkpoints"].values()] == \
        [(0, 1, 1), (1, 1, 2), (5, 2, 7)]
    assert [c["global_step"] for c in by[("tune", "rl_alone")]["checkpoints"].values()] == [1, 2, 6]
    assert P["rl"].ROWS["distill_5"] == {**P["rl"].ROWS["joint_5"], "rl_lr": 1e-12}  # joint 5:1, RL vanishing
    shuffled = by[("report", "rl_alone_shuffled")]
    assert shuffled["lrm"].endswith("lrm-sdxl-shuffled") and shuffled["rl_lr"] == 1e-7
    assert "lrm-sdxl-shuffled" in (Path(shuffled["folder"]) / "config.yaml").read_text()
    for r in recs:
        assert r["deviations"] and r["noise_seeds"] == [1] and r["num_images"] == 20
        for c in r["checkpoints"].values():
            assert set(c["seeds"]) == {"1"} and set(c["mean"]) == set(METRICS)
            assert c["mean"]["confidence"] < 0 and c["seeds"]["1"]["num_images"] == 20
    # update 0 is the base's student: the same numbers as the row's own copy of the student it started from
    assert joint["checkpoints"]["0"]["folder"] == str(out / "bases" / "seed0")
    base0 = joint["checkpoints"]["0"]["seeds"]["1"]
    kept = P["score_student"](Path(joint["folder"]) / "students" / "step_00000001", 20, [1])["1"]
    assert {k: base0[k] for k in METRICS} == pytest.approx({k: kept[k] for k in METRICS}, abs=1e-6)
    # resumable: a second call reads every row and score back
    capsys.readouterr()
    assert run(report) == 0
    assert "scored" not in capsys.readouterr().out
    assert run(["verdict", "--out", str(out)]) == 2          # smoke records deviate from the pre-registration
    assert run(["verdict", "--out", str(out), "--allow-deviations"]) == 0
    v = json.loads((out / "verdict.json").read_text())
    assert v["incomplete"] and v["regularises"]["statement"].startswith("Joint RL regularises: not shown")
    # the summary the tables read: every record, paths relative to OUT, the verdict over what has landed
    summary = tmp_path / "results" / "stage2_prereg.json"
    assert run(["summary", "--out", str(out), "--to", str(summary)]) == 0
    s = json.loads(summary.read_text())
    assert len(s["records"]) == 3 and s["tuning"]["rl_alone"]["rl_lr"] == "1e-7" and s["shuffled_lrm"] is None
    assert str(out) not in summary.read_text() and s["verdict"]["incomplete"]
    assert s["records"][0]["checkpoints"]["0"]["folder"] == "bases/seed0"
    spec = importlib.util.spec_from_file_location("benchmark_tables", ROOT / "benchmarks" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    monkeypatch.setattr(tables, "RESULTS", summary.parent)
    try:
        _, rows, files, notes = tables.TABLES["stage2_prereg"]()
        shuffled = [r for r in rows if r[0] == "rl_alone_shuffled"]
        assert files == ["stage2_prereg.json"] and shuffled[0][3:5] == ["1", "0"]   # update 1 on base 0
        assert any(n.startswith("Joint RL regularises: not shown") for n in notes)
        _, rows, _, _ = tables.TABLES["stage2_tuning"]()
        assert rows[0][:2] == ["rl_alone", "1e-7"] and rows[0][4] == "**chosen**" and "->" in rows[0][2]
        assert rows[0][3] == "not run yet"   # base 1 never tuned in the smoke
        # the shuffled-LRM step's summary (as cmd_shuffled_lrm writes it) shows in the notes
        acc = {"shared_noise": {"low": 0.49, "mid": 0.5, "high": 0.47}, "independent_noise": {}, "num_heldout": 200}
        s["shuffled_lrm"] = {"flips": {"flipped": 1009, "pairs": 2000}, "shuffled_lrm": "lrm-sdxl-shuffled",
                             "shuffled_heldout_accuracy_on_original_pairs": acc,
                             "shipped_lrm_heldout_accuracy_on_regenerated_pairs": acc}
        summary.write_text(json.dumps(s))
        tables.load.cache_clear()
        notes = tables.TABLES["stage2_prereg"]()[3]
        assert any("1009 of 2000 preferences flipped" in n and "0.49 / 0.50 / 0.47" in n for n in notes)
    finally:
        tables.load.cache_clear()
