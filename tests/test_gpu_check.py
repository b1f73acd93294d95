"""benchmarks/gpu_check.py --smoke: the prepared GPU check runs every part through its own code on the CPU with tiny
models (about a minute on 2 cores), and its JSON has the structure the GPU run will fill."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_smoke_runs_every_part_and_writes_the_json(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # the suite shares the cores with other tests: every part gets 4x its smoke time limit (the limits are the GPU
    # run's safety net; this test checks what the parts do, not how fast a loaded CI machine does it)
    budgets = [f"--part-budget={p}={4 * s}" for p, s in gpu_check.MODES["smoke"]["part_budget_s"].items()]
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--smoke", "--json", str(out),
                        "--work", str(tmp_path / "work"), "--budget-s", "900", *budgets], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert out.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    parts = data["parts"]
    status = {p: v["status"] for p, v in parts.items()}
    assert list(parts) == list(gpu_check.PARTS)
    expected = {p: "passed" for p in gpu_check.PARTS}
    assert gpu_check.compile_offered()  # model_compile exists: the compile part runs (aot_eager on the CPU)
    assert status == expected, (status, r.stdout[-4000:])
    assert r.returncode == 0 and data["finished"] and data["mode"] == "smoke"
    assert [line.split(":")[0] for line in data["summary"]] == list(gpu_check.PARTS)
    assert data["machine"]["cuda_available"] in (True, False) and data["machine"]["packages"]["torch"]

    for part, config in gpu_check.PEAK_PARTS.items():
        v = parts[part]
        assert v["config"] == data["configs"][config]
        assert v["frozen_dtype"] == "bfloat16" and v["resolution"] > 0 and len(v["cycles"]) == 2
        m = v["measured"]  # on the CPU: no CUDA peak, said so, the process's RSS instead
        assert m["peak_allocated_bytes"] is None and "no CUDA" in m["reason"] and m["ru_maxrss_bytes"] > 0
        plan = v["plan"]  # the plan of the same config is still made (for the CPU) and set beside it
        assert plan["plan_peak_bytes"] > 0 and plan["within_tolerance"] is None
        assert plan["plan_over_rss"] == plan["plan_peak_bytes"] / m["ru_maxrss_bytes"]
    assert "model_text_cache=true" in parts["peak_sd3"]["config"]["sets"]

    for part, ttur in (("step_flashdmd", 1), ("step_dmd2", 5)):  # the presets' TTUR: an update is a whole cycle
        v = parts[part]
        assert v["ttur"] == ttur and v["batch_size"] == 1
        assert v["updates_seconds"] and v["seconds_per_generator_update"] == statistics.median(v["updates_seconds"])
    # the text-conditioned pooled head on both presets (section 3a's head at full size), the shipped TTURs
    heads = parts["step_heads"]["rows"]
    for row, ttur in (("flashdmd_text_head", 1), ("dmd2_text_head", 5)):
        v = heads[row]
        assert v["ttur"] == ttur and "disc_condition=text" in v["config"]["sets"]
        assert v["seconds_per_generator_update"] == statistics.median(v["updates_seconds"])
        assert v["relative_to_step_dmd2"] == v["seconds_per_generator_update"] / parts["step_dmd2"][
            "seconds_per_generator_update"]

    # the offload / quantisation rows: each a set-up of its own config, one field changed against none/none
    rows = {**parts["offload_sd3"]["rows"], **parts["quant_sd3"]["rows"]}
    assert list(rows) == ["none", "frozen", "base", "zero_t5_counted", "int8", "fp8", "base_int8"]
    ref = rows["none"]
    for name, r in rows.items():
        sets = data["configs"][gpu_check.row_config(r["model_offload"], r["model_frozen_quant"],
                                                    r["model_zero_t5"])]["sets"]
        assert {f"model_offload={r['model_offload']}", f"model_frozen_quant={r['model_frozen_quant']}",
                f"model_zero_t5={r['model_zero_t5']}"} <= set(sets)
        named = {"int8": ("none", "int8", "auto"), "fp8": ("none", "fp8", "auto"),
                 "base_int8": ("base", "int8", "auto"), "zero_t5_counted": ("none", "none", "counted")}
        got = (r["model_offload"], r["model_frozen_quant"], r["model_zero_t5"])
        assert got == named.get(name, (name, "none", "auto"))
        if name == "fp8":  # no CUDA device here: not run, and why
            assert r["status"] == "not run" and "compute capability 8.9" in r["reason"], r
            continue
        assert r["status"] == "passed" and r["ttur"] == 2 and r["pid"] == ref["pid"]
        assert r["seconds_per_iteration"] == statistics.median(r["cycles_seconds"]) / r["ttur"]
        assert r["measured"]["peak_allocated_bytes"] is None and "no CUDA" in r["measured"]["reason"]
        assert r["plan"]["plan_peak_bytes"] > 0
        vs = r["vs_none"]
        assert vs["seconds_per_iteration"] == r["seconds_per_iteration"] / ref["seconds_per_iteration"]
        assert vs["plan_peak"] == r["plan"]["plan_peak_bytes"] / ref["plan"]["plan_peak_bytes"]
        assert f" {name} {r['seconds_per_iteration']:.3f} s/it" in " " + data["summary"][list(parts).index(
            "offload_sd3" if name in ("none", "frozen", "base", "zero_t5_counted") else "quant_sd3")].split(": ", 2)[2]
    # the override reached the run: int8 holds the teacher's linears in a byte, and the plan counts fewer bytes
    teacher = {k: sum(rows[k]["device_bytes_after_setup"]["teacher"].values()) for k in ("none", "int8")}
    assert teacher["int8"] < teacher["none"]
    assert rows["int8"]["vs_none"]["plan_tensors"] < 1
    assert "fp8 not run: no CUDA device" in data["summary"][list(parts).index("quant_sd3")]

    c = parts["compile"]  # model_compile=student timed as step_flashdmd, set beside it
    assert "model_compile=student" in c["config"]["sets"] and c["backend"] == "aot_eager"
    assert c["dynamo"]["frames_compiled"] > 0 and c["dynamo"]["unique_graphs"] > 0
    eager = parts["step_flashdmd"]["seconds_per_generator_update"]
    assert c["vs_eager"]["speedup"] == eager / c["seconds_per_generator_update"]
    assert c["vs_eager"]["compile_seconds"] == c["warmup_cycle_seconds"] - eager
    assert "aot_eager" in data["summary"][list(parts).index("compile")]

    ips = parts["images_per_second"]
    assert ips["teacher"]["steps"] == gpu_check.TEACHER_STEPS and ips["student"]["steps"] == 4
    assert ips["speedup"] == ips["student"]["images_per_second"] / ips["teacher"]["images_per_second"]

    f = parts["fsdp2_resume"]  # one process through accelerate's launcher, two updates, a checkpoint, a resume
    assert all(f["checks"].values()) and f["accelerate"]["num_processes"] == 1
    assert f["resume"]["generator_steps"] == 3 and "at step 2" in f["resume"]["resumed_line"]
    assert f["fsdp2_enabled"] is (f["accelerate"]["distributed_type"] == "FSDP")
