"""`flashdmd reward make-pairs` for real models: a judge from local weights and a prompt file.

* on a tiny random SDXL folder judged by a tiny random CLIP folder (``--judge clip``): N records, prompt i is
  line i mod the number of lines, ``preferred`` agrees with the judge's own scores of the decoded latents,
  no ``label``; the summary names the judge;
* the judges: ``prefer`` equals the rule on the scores (ties -> a), Bradley-Terry draws at temperature > 0;
* one-line errors, raised before any model is loaded or sampled: no judge for a model of no plug-in (even
  with the world registered), ``--judge`` without ``--judge-model`` and vice versa, a wrong ``--judge-model``
  folder, an empty prompt file, no ``--prompts`` for a model of no plug-in, an unknown judge name;
* the embedded world through its plug-in (``judge``, ``pair_prompts``): ``--model world-sdxl`` still gets
  the world's prompts, labels and oracle scores (the records the code before judges wrote, byte for byte:
  checked by hand on --num 6, two settings); a run folder whose teacher is the world gets the oracle.
"""
from __future__ import annotations

import json

import pytest
import torch

import tiny_models as tm  # tests/ is on sys.path (pytest prepend import mode)
from flashdmd import FlashDMDError, plugins, runfolder
from flashdmd.cli import main
from flashdmd.families import load_family
from flashdmd.rewards import pairs
from flashdmd.evaluation.judges import JUDGES, Judge, ScorerJudge, choose, load_judge
from flashdmd.rewards.pairs import companion_path, load_pairs, read_records
from tolerances import k_se

PROMPT_LINES = ["a red apple on a table", "a small dog", "a watercolour of a lighthouse"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs_sdxl")
    return tm.save_pipeline(tm.sdxl_pipeline(root / "tok"), root / "sdxl")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tm.clip_model_folder(tmp_path_factory.mktemp("pairs_clip"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("pairs_prompts") / "prompts.txt"
    f.write_text("\n".join(PROMPT_LINES) + "\n\n")
    return f


@pytest.fixture
def world(monkeypatch):
    """The world plug-in with this change's judge and pair prompts (on a copy of the registry)."""
    from flashdmd.world.judge import WorldJudge, world_pair_prompts
    from flashdmd.world.plugin import MODELS
    monkeypatch.setattr(plugins, "_PLUGINS", dict(plugins._PLUGINS))
    return plugins.register(plugins.Plugin(name="world", models=dict(MODELS), judge=WorldJudge,
                                           pair_prompts=world_pair_prompts))


@pytest.fixture
def no_sampling(monkeypatch):
    """Any model load or sampling fails the test: the errors must come first."""
    def boom(*a, **k):
        raise AssertionError("make-pairs loaded or sampled a model before its judge and prompts were checked")
    monkeypatch.setattr(pairs, "load_model", boom)
    monkeypatch.setattr(pairs, "sample_model_latents", boom)


def _cli_error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def _rescore(out, judge, family, batch_size: int) -> tuple[list[float], list[float]]:
    """The judge's scores of the decoded latents in the companion file (rows 2i = a, 2i+1 = b), decoded in
    make-pairs' batches (so the floats match exactly)."""
    from safetensors.torch import load_file
    lat = load_file(str(companion_path(out)))["latents"]
    prompts = [r["prompt"] for r in read_records(out)]
    s_a, s_b = [], []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            s_a += judge.score(family.decode_latents(lat[2 * i:2 * i + 2 * len(chunk):2]).clamp(-1, 1), chunk).tolist()
            s_b += judge.score(family.decode_latents(lat[2 * i + 1:2 * i + 2 * len(chunk):2]).clamp(-1, 1), chunk).tolist()
    return s_a, s_b


# ---------------------------------------------------------------------------------------------------
# a real model judged by local weights


@pytest.mark.parametrize("name", ["clip", "pickscore"])
def test_make_pairs_with_a_local_judge(sdxl_dir, clip_dir, prompt_file, tmp_path, capsys, name):
    out = tmp_path / "pairs.jsonl"
    rc = main(["reward", "make-pairs", "--model", str(sdxl_dir), "--prompts", str(prompt_file), "--judge", name,
               "--judge-model", str(clip_dir), "--num", "5", "--out", str(out), "--steps-a", "2", "--steps-b", "1",
               "--cfg-b", "1", "--batch-size", "2"] + (["--no-progress"] if name == "clip" else []))
    err = capsys.readouterr().err
    assert rc == 0, err
    # the bars (sampling both sides, then judging), each with the time left; none with --no-progress
    bars = ("sampling: 100%", "10/10 [", "judging: 100%", "5/5 [")
    assert all(b in err for b in bars) if name == "pickscore" else not any(b in err for b in bars), err[-2000:]
    records = read_records(out)
    assert [r["prompt"] for r in records] == [PROMPT_LINES[i % 3] for i in range(5)]
    assert all("label" not in r for r in records)
    s_a, s_b = _rescore(out, load_judge(name, clip_dir), load_family(sdxl_dir), batch_size=2)
    for r, a, b in zip(records, s_a, s_b):   # the judge's own scores and choice
        assert r["meta"] == {"score_a": round(a, 5), "score_b": round(b, 5)}
        assert r["preferred"] == ("a" if a >= b else "b")
    assert len(load_pairs(out)) == 5
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["judge"] == {"name": name, "path": str(clip_dir)} and meta["prompts"] == str(prompt_file)
    assert meta["pairs"] == 5 and meta["a"]["model"] == str(sdxl_dir)


def test_judge_protocol_and_choice(clip_dir):
    judge = load_judge("clip", clip_dir)
    assert isinstance(judge, Judge) and isinstance(judge, ScorerJudge) and judge.name == "clip"
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    prompts = PROMPT_LINES + PROMPT_LINES[:1]
    s_a, s_b = judge.score(a, prompts), judge.score(b, prompts)
    assert s_a.shape == (4,) and s_a.dtype == torch.float32
    assert torch.equal(judge.prefer(a, b, prompts), s_a >= s_b)
    assert judge.prefer(a, a, prompts).all()                      # ties go to a
    # Bradley-Terry at temperature 1: P(a) = sigmoid(log 3) = 0.75; reproducible from the generator
    d = torch.full((4000,), float(torch.log(torch.tensor(3.0))))
    draw = choose(d, torch.zeros(4000), 1.0, torch.Generator().manual_seed(1))
    assert abs(draw.float().mean().item() - 0.75) < k_se((0.75 * 0.25) ** 0.5, len(draw))  # 5 standard errors
    assert torch.equal(draw, choose(d, torch.zeros(4000), 1.0, torch.Generator().manual_seed(1)))
    assert choose(torch.tensor([1.0, -1.0]), torch.zeros(2), 1e-6).tolist() == [True, False]


# ---------------------------------------------------------------------------------------------------
# errors before any sampling


def test_no_judge_for_a_model_of_no_plugin(sdxl_dir, prompt_file, tmp_path, capsys, world, no_sampling):
    # the world is registered, yet its oracle does not judge another model
    err = _cli_error(capsys, ["reward", "make-pairs", "--model", str(sdxl_dir), "--prompts", str(prompt_file),
                              "--num", "2", "--out", str(tmp_path / "p.jsonl")])
    assert f"make-pairs needs a judge for {sdxl_dir}: --judge pickscore|hpsv2|imagereward|clip --judge-model PATH" \
        in err
    assert not (tmp_path / "p.jsonl").exists()


def test_judge_and_judge_model_go_together(sdxl_dir, clip_dir, prompt_file, tmp_path, capsys, no_sampling):
    base = ["reward", "make-pairs", "--model", str(sdxl_dir), "--prompts", str(prompt_file), "--num", "2",
            "--out", str(tmp_path / "p.jsonl")]
    assert "--judge clip needs --judge-model PATH" in _cli_error(capsys, base + ["--judge", "clip"])
    assert "--judge-model needs --judge" in _cli_error(capsys, base + ["--judge-model", str(clip_dir)])


def test_wrong_judge_model_fails_before_sampling(sdxl_dir, prompt_file, tmp_path, capsys, no_sampling):
    base = ["reward", "make-pairs", "--model", str(sdxl_dir), "--prompts", str(prompt_file), "--num", "2",
            "--out", str(tmp_path / "p.jsonl"), "--judge", "pickscore", "--judge-model"]
    err = _cli_error(capsys, base + [str(tmp_path / "nowhere")])
    assert "--judge-model" in err and "not found" in err and "PickScore" in err
    (tmp_path / "empty").mkdir()
    err = _cli_error(capsys, base + [str(tmp_path / "empty")])
    assert "has no config.json" in err and "CLIP" in err   # says what the folder must hold


def test_prompt_errors_come_before_sampling(sdxl_dir, clip_dir, tmp_path, capsys, no_sampling):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    base = ["reward", "make-pairs", "--model", str(sdxl_dir), "--judge", "clip", "--judge-model", str(clip_dir),
            "--num", "2", "--out", str(tmp_path / "p.jsonl")]
    assert "has no prompts" in _cli_error(capsys, base + ["--prompts", str(empty)])
    assert "not found" in _cli_error(capsys, base + ["--prompts", str(tmp_path / "missing.txt")])
    assert "give --prompts FILE" in _cli_error(capsys, base)


def test_unknown_judge_name(clip_dir, capsys):
    with pytest.raises(FlashDMDError) as e:
        load_judge("aesthetic", clip_dir)
    assert str(e.value) == f"unknown judge 'aesthetic'; choose one of {', '.join(JUDGES)}"
    with pytest.raises(SystemExit):   # the CLI offers the choices
        main(["reward", "make-pairs", "--model", "x", "--judge", "aesthetic", "--num", "1", "--out", "p.jsonl"])
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# the embedded world through its plug-in


def test_world_make_pairs_through_the_plugin(world, tmp_path, capsys):
    from flashdmd.world.judge import WorldJudge, world_pair_prompts
    from flashdmd.world.prompts import class_of_prompt
    out = tmp_path / "world.jsonl"
    rc = main(["reward", "make-pairs", "--model", "world-sdxl", "--num", "5", "--out", str(out), "--seed", "3",
               "--steps-a", "3", "--steps-b", "1", "--cfg-b", "1", "--batch-size", "4", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    records = read_records(out)
    assert [r["prompt"] for r in records] == world_pair_prompts(5, 3)
    assert [list(r) for r in records] == [["prompt", "a", "b", "preferred", "label", "meta"]] * 5
    assert [r["label"] for r in records] == [class_of_prompt(r["prompt"]) for r in records]
    judge = WorldJudge()
    s_a, s_b = _rescore(out, judge, load_family("world-sdxl"), batch_size=4)
    for r, a, b in zip(records, s_a, s_b):   # the oracle's own scores and choice
        assert r["meta"] == {"score_a": round(a, 5), "score_b": round(b, 5)}
        assert r["preferred"] == ("a" if a >= b else "b")
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["judge"] == {"name": "world-oracle", "path": judge.path} and meta["prompts"] == "plug-in world"


def test_world_judge_resolution(world, sdxl_dir, clip_dir, prompt_file, tmp_path):
    from flashdmd.world.judge import WorldJudge, world_pair_prompts
    run = tmp_path / "run"
    run.mkdir()
    runfolder.write_record(run, teacher="world-sdxl", family="sdxl", student_timesteps=[999, 499])
    judge, prompts, source = pairs.judge_and_prompts(str(run), None, None, None, 4, 0)
    assert isinstance(judge, WorldJudge) and prompts == world_pair_prompts(4, 0) and source == "plug-in world"
    # a local judge for a world model keeps the world's prompts; a prompt file replaces them
    judge, prompts, _ = pairs.judge_and_prompts("world-sdxl", "clip", str(clip_dir), None, 4, 0)
    assert isinstance(judge, ScorerJudge) and prompts == world_pair_prompts(4, 0)
    _, prompts, source = pairs.judge_and_prompts("world-sdxl", None, None, str(prompt_file), 4, 0)
    assert prompts == PROMPT_LINES and source == str(prompt_file)
    # the oracle refuses prompts naming none of its classes, before sampling
    with pytest.raises(FlashDMDError, match="names none of the world's"):
        WorldJudge().check_prompts(PROMPT_LINES)


# ---------------------------------------------------------------------------------------------------
# pairs from people: PNG paths, encoded once into a row-based file (the recipe in docs/PAIRS.md)


def test_png_pairs_cache_to_latents(sdxl_dir, tmp_path):
    import numpy as np
    from PIL import Image
    from flashdmd.rewards.pairs import write_pairs
    family = load_family(sdxl_dir)
    res = family.default_resolution
    g = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for k in range(4):
        Image.fromarray(g.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{k}.png")
    human = tmp_path / "pairs.jsonl"
    human.write_text("".join(json.dumps({"prompt": p, "a": f"img/{2 * i}.png", "b": f"img/{2 * i + 1}.png",
                                         "preferred": c}) + "\n" for i, (p, c) in enumerate(zip(PROMPT_LINES, "ba"))))
    ps = load_pairs(human, family)
    records = [{"prompt": p, "a": 2 * i, "b": 2 * i + 1, "preferred": "a"} for i, p in enumerate(ps.prompts)]
    cached = write_pairs(tmp_path / "latents.jsonl", records, torch.stack([ps.winners, ps.losers], dim=1).flatten(0, 1))
    again = load_pairs(cached)                                   # no VAE needed any more
    assert again.prompts == ps.prompts == PROMPT_LINES[:2]
    assert torch.equal(again.winners, ps.winners) and torch.equal(again.losers, ps.losers)
    direct = load_pairs(human, family)                           # "b" won pair 0: its image is the winner
    assert torch.equal(direct.winners[0], family.encode_images(
        torch.from_numpy(np.asarray(Image.open(tmp_path / "img" / "1.png"), dtype=np.float32)).permute(2, 0, 1)[None]
        / 127.5 - 1.0)[0])
