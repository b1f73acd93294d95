"""Image grids and the run report (DIR/report.html): the evaluations of any run, whatever its metrics, the
sample grids over training with their prompts, metric and loss curves, the config."""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from flashdmd import FlashDMDError, io


def grid(images: Tensor, nrow: int = 10, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (rows*H', nrow*W', 3) mosaic with a dark gutter."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 40, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = \
            x[i].permute(1, 2, 0).numpy()
    return out


def save_grid(images: Tensor, path: str | Path, nrow: int = 10, scale: int = 2):
    """A PNG grid of ``images`` (B, 3, H, W) in [-1, 1], written atomically (a full disk: one line, nothing left)."""
    path = Path(path)
    with io.writing("a sample grid", path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(grid(images, nrow))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    # at most the raw pixels (PNG compresses): what the message reports as needed
    io.atomic_write(path, lambda f: im.save(f, format="PNG"), f"sample grid {path.name}", im.width * im.height * 3)


# ---------------------------------------------------------------------------------------------------
# The run report: DIR/report.html with its PNGs beside it.
#
# It reads only the run folder: metrics.json ({history, evals, warnings, higher_is_better?, comparison?}),
# config.yaml and samples/ (step_XXXXXX.png grids + prompts.json {"prompts": [...], "nrow": N}, grid order
# row-major). Any metric keys work; which way is better comes from metrics.json's ``higher_is_better`` (what
# the run's evaluator declared) or, for runs without it, from KNOWN_METRICS.

# key -> (higher is better, label, what it measures)
KNOWN_METRICS = {
    "fid": (False, "FID", "Fréchet distance of Inception pool3 features to the reference images"),
    "fd": (False, "FD", "Fréchet distance of the evaluation classifier's features to the test split"),
    "clip_score": (True, "CLIP score", "100 * max(cos, 0) of CLIP image and prompt embeddings"),
    "pickscore": (True, "PickScore", "PickScore_v1 preference score"),
    "hpsv2": (True, "HPSv2", "100 * cos under the HPSv2 CLIP"),
    "imagereward": (True, "ImageReward", "ImageReward preference score"),
    "alignment": (True, "alignment", "share of images classified as the prompted class"),
    "diversity": (True, "diversity (1 = real)",
                  "within-class feature spread relative to real data (1 = as diverse as real)"),
    "oracle": (True, "oracle", "the world's held-out preference score (never a training signal of Stage 1; "
                               "Stage 2 trains on the LRM, which learned from it)"),
}
# evaluation-record keys that are bookkeeping, not metrics
BOOKKEEPING = {"step", "stage", "generator_steps", "rl_steps", "images_seen", "wall_seconds", "seconds_per_image",
               "nfe", "num_images", "hacking_warning", "fd_floor", "steps", "cfg", "guidance_scale", "seed"}
MAX_GRIDS = 12   # sample grids shown: evenly spaced over training, always the first and the last


def metric_keys(rows: list[dict], higher_is_better: dict[str, bool] | None = None) -> list[str]:
    """The metric keys in ``rows`` (numeric, not bookkeeping, not ``<key>_std``): the declared ones first, then
    the known ones, then the rest alphabetically."""
    present = {k for r in rows for k, v in r.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in BOOKKEEPING
               and not k.endswith("_std")}
    order = list(higher_is_better or {}) + list(KNOWN_METRICS) + sorted(present)
    return [k for k in dict.fromkeys(order) if k in present]


def direction(key: str, higher_is_better: dict[str, bool] | None = None) -> bool | None:
    """True: higher is better; False: lower; None: unknown."""
    if higher_is_better and key in higher_is_better:
        return bool(higher_is_better[key])
    return KNOWN_METRICS[key][0] if key in KNOWN_METRICS else None


def _label(key: str, hib: dict | None = None, arrow: bool = True) -> str:
    name = KNOWN_METRICS[key][1] if key in KNOWN_METRICS else key
    d = direction(key, hib)
    return name + ("" if not arrow or d is None else (" ↑" if d else " ↓"))


def _fmt(v, key: str = "") -> str:
    if isinstance(v, bool) or not isinstance(v, float):
        return "" if v is None else str(v)
    return f"{v:.4f}" if key == "seconds_per_image" else f"{v:.3f}"


def stage2_start(metrics: dict) -> int | None:
    """The global step at which Stage 2 began (metrics.json ``stage2_start_step``, else the first logged or
    evaluated row of stage 2), or None."""
    if metrics.get("stage2_start_step") is not None:
        return int(metrics["stage2_start_step"])
    steps = [r["step"] for r in metrics.get("history", []) + metrics.get("evals", [])
             if r.get("stage") == 2 and "step" in r]
    return min(steps) if steps else None


def _plt():
    # lazy: matplotlib only where a report draws its curves, and its Agg backend is chosen then, not at import
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _images_axis(ax, evals: list[dict]):
    """A top axis in images seen by the generator, when that is a strictly increasing function of the step."""
    pts = sorted({(r["step"], r["images_seen"]) for r in evals if "step" in r and "images_seen" in r})
    if len(pts) < 2 or any(b[0] <= a[0] or b[1] <= a[1] for a, b in zip(pts, pts[1:])):
        return
    xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)

    def lerp(v, a, b):   # piecewise linear, extended linearly beyond the ends (the axis margins)
        v = np.asarray(v, float)
        lo = b[0] + (v - a[0]) * (b[1] - b[0]) / (a[1] - a[0])
        hi = b[-1] + (v - a[-1]) * (b[-1] - b[-2]) / (a[-1] - a[-2])
        return np.where(v < a[0], lo, np.where(v > a[-1], hi, np.interp(v, a, b)))

    sec = ax.secondary_xaxis("top", functions=(lambda x: lerp(x, xs, ys), lambda y: lerp(y, ys, xs)))
    sec.set_xlabel("images seen by the generator", fontsize=7)
    sec.tick_params(labelsize=7)


def _metric_curves(metrics: dict, hib: dict | None, out: Path) -> list[tuple[str, str]]:
    """One PNG per evaluation metric over training steps (+ the comparison rows as horizontal references)."""
    evals = [r for r in metrics.get("evals", []) if "step" in r]
    comparison = [r for r in metrics.get("comparison", []) if isinstance(r, dict)]
    s2 = stage2_start(metrics)
    plt = _plt()
    figs = []
    for key in metric_keys(evals, hib):
        pts = sorted((r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float)))
        fig, ax = plt.subplots(figsize=(4.6, 3.0), dpi=110)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 40 else None, ms=3,
                label="student")
        for j, row in enumerate(r for r in comparison if isinstance(r.get(key), (int, float))):
            ax.axhline(row[key], ls=":", lw=1, color=f"C{j + 1}",
                       label=f"{row.get('model', '?')}" + (f", {row['steps']} steps" if row.get("steps") else ""))
        if s2 is not None:
            ax.axvline(s2, ls="--", lw=1, color="grey", label="Stage 2 starts")
        ax.set_xlabel("student update (global step)")
        ax.set_ylabel(_label(key, hib, arrow=False))
        ax.set_title(_label(key, hib, arrow=False) + ("" if direction(key, hib) is None else
                                        " (higher is better)" if direction(key, hib) else " (lower is better)"),
                     fontsize=9)
        _images_axis(ax, evals)
        ax.grid(alpha=0.3)
        if len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend(fontsize=6, loc="best")
        fig.tight_layout()
        name = f"curve_eval_{''.join(c if c.isalnum() or c in '-_' else '_' for c in key)}.png"
        fig.savefig(out / name)
        plt.close(fig)
        figs.append((name, f"{_label(key, hib, arrow=False)} of the student over training"))
    return figs


def _training_curves(history: list[dict], s2: int | None, out: Path) -> list[tuple[str, str]]:
    """Loss / logit / RL curves from the logged scalars; returns [(png name, caption)]."""
    plt = _plt()
    figs = []

    def plot(name, caption, keys_of, ylabel):
        keys = sorted({k for row in history for k in row if keys_of(k)})
        if not keys:
            return
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
        for k in keys:
            pts = [(row["step"], row[k]) for row in history if k in row]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
        if s2 is not None:
            ax.axvline(s2, ls="--", lw=1, color="grey", label="Stage 2 starts")
        ax.set_xlabel("student update (global step)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        figs.append((name, caption))

    plot("curve_losses.png", "Losses per role (means over each logging interval)", lambda k: k.startswith("loss/"),
         "loss")
    plot("curve_dm_per_step.png", "DM loss per student step (Flash-DMD: high-noise steps only) and GAN loss per step",
         lambda k: k.startswith("dm_loss/") or k.startswith("gan_g_loss/"), "loss")
    plot("curve_disc.png", "Discriminator logits on real and on student images", lambda k: k.startswith("disc/"),
         "mean logit")
    plot("curve_rl.png", "Stage 2: DPO loss and LRM score of the candidates", lambda k: k.startswith("rl/"), "value")
    return figs


def _comparison_table(rows: list[dict], hib: dict | None) -> str:
    keys = metric_keys(rows, hib)
    cols = [("model", "model"), ("steps", "steps"), ("nfe", "NFE")] + [(k, _label(k, hib)) for k in keys] + \
        [("seconds_per_image", "s / image")]
    cols = [c for c in cols if c[0] == "model" or any(c[0] in r for r in rows)]
    head = "".join(f"<th>{html.escape(c)}</th>" for _, c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k), k))}</td>" for k, _ in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _evaluation_table(evals: list[dict], hib: dict | None) -> str:
    """Metric | better | first | best | final evaluation of the student (``± std`` where the run recorded one)."""
    evals = [r for r in evals if isinstance(r, dict)]
    keys = metric_keys(evals, hib)
    if not keys:
        return ""

    def when(r):
        bits = [f"step {r['step']}"] if "step" in r else []
        if r.get("images_seen"):
            bits.append(f"{r['images_seen']:,} images")
        if r.get("stage") == 2:
            bits.append("Stage 2")
        return ", ".join(bits)

    def cell(r, k):
        if not isinstance(r.get(k), (int, float)):
            return ""
        std = r.get(f"{k}_std")
        return _fmt(float(r[k]), k) + (f" ± {std:.3f}" if isinstance(std, (int, float)) else "")

    first, final = evals[0], evals[-1]
    cols = ([("first", first)] if len(evals) > 1 else []) + [("final", final)]
    head = "<th>metric</th><th>better</th>" + "".join(f"<th>{n}<br><small>{html.escape(when(r))}</small></th>"
                                                      for n, r in cols)
    if len(evals) > 1:
        head += "<th>best over training</th>"
    body = []
    for k in keys:
        d = direction(k, hib)
        better = "?" if d is None else ("higher" if d else "lower")
        cells = [f"<td>{html.escape(_label(k, hib, arrow=False))}</td><td>{better}</td>"]
        cells += [f"<td>{html.escape(cell(r, k))}</td>" for _, r in cols]
        if len(evals) > 1:
            pts = [r for r in evals if isinstance(r.get(k), (int, float))]
            best = "" if d is None or not pts else (max if d else min)(pts, key=lambda r: r[k])
            cells.append(f"<td>{html.escape(_fmt(float(best[k]), k) + ' (' + when(best) + ')') if best else ''}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    book = [f"{k.replace('_', ' ')} {_fmt(final[k], k)}" for k in ("num_images", "nfe", "seconds_per_image")
            if k in final]
    note = f"<p class=note>Final evaluation: {html.escape(', '.join(book))}.</p>" if book else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{note}"


def _metric_notes(keys) -> str:
    known = [k for k in keys if k in KNOWN_METRICS]
    if not known:
        return ""
    return ("<p class=note>" + "; ".join(f"{html.escape(KNOWN_METRICS[k][1])}: {html.escape(KNOWN_METRICS[k][2])}"
                                          for k in known) + ".</p>")


def _sample_grids(run_dir: Path) -> str:
    """The grids of samples/step_XXXXXX.png (at most MAX_GRIDS, evenly spaced) and the prompts they show."""
    files = sorted((run_dir / "samples").glob("step_*.png"))
    if not files:
        return ""
    if len(files) > MAX_GRIDS:
        idx = np.unique(np.linspace(0, len(files) - 1, MAX_GRIDS).round().astype(int))
        shown = [files[i] for i in idx]
        note = f" ({len(shown)} of {len(files)}, evenly spaced)"
    else:
        shown, note = files, ""
    parts = [f"<h2>Samples over training{note}</h2>",
             "<p class=note>The same prompts and noise at every step; the prompts of each grid row are listed "
             "below the grids.</p>"]
    for f in shown:
        step = f.stem.split("_", 1)[1].lstrip("0") or "0"
        parts.append(f'<figure class=sample><img src="samples/{html.escape(f.name)}" class=grid>'
                     f"<figcaption>step {step}</figcaption></figure>")
    parts.append(_prompt_list(run_dir / "samples" / "prompts.json"))
    return "\n".join(parts)


def _prompt_list(path: Path) -> str:
    if not path.is_file():
        return ""
    try:   # a broken prompt list costs the page its captions, not the report
        info = io.read_json(path)
        prompts, nrow = [str(p) for p in info["prompts"]], int(info.get("nrow") or len(info["prompts"]) or 1)
    except (FlashDMDError, KeyError, TypeError) as e:
        return f"<p class=note>{html.escape(str(path))} is unreadable ({html.escape(str(e))}): no prompt list.</p>"
    items = []
    for start in range(0, len(prompts), max(nrow, 1)):
        row, runs = prompts[start:start + nrow], []
        for p in row:   # consecutive repeats (several seeds of one prompt) collapse to "prompt ×n"
            if runs and runs[-1][0] == p:
                runs[-1][1] += 1
            else:
                runs.append([p, 1])
        items.append("<li>" + " <span class=sep>|</span> ".join(
            html.escape(p) + (f" <small>×{n}</small>" if n > 1 else "") for p, n in runs) + "</li>")
    return "<p>Prompts, one line per grid row (left to right):</p><ol class=prompts>" + "".join(items) + "</ol>"


def write_report(run_dir: str | Path, comparison: list[dict] | None = None, grids: list[tuple[str, str]] | None = None,
                 title: str = "flashdmd run report", summary: str = "") -> Path:
    """Render DIR/report.html from DIR/metrics.json, DIR/samples/ and DIR/config.yaml (+ ``comparison`` rows,
    e.g. teacher vs student, and extra image ``grids`` [(png name in DIR, caption)]). Works on any run: the
    metrics shown are whatever keys its evaluations hold."""
    run_dir = Path(run_dir)
    metrics = io.read_json(run_dir / "metrics.json", want=None)
    if not isinstance(metrics, dict):
        raise FlashDMDError(f"{run_dir}/metrics.json is not a flashdmd metrics record")
    hib = metrics.get("higher_is_better") if isinstance(metrics.get("higher_is_better"), dict) else None
    rows = comparison if comparison is not None else metrics.get("comparison", [])
    evals = [r for r in metrics.get("evals", []) if isinstance(r, dict)]
    history = [r for r in metrics.get("history", []) if isinstance(r, dict) and "step" in r]
    figs = _metric_curves({**metrics, "evals": evals, "comparison": rows or []}, hib, run_dir)
    figs += _training_curves(history, stage2_start({**metrics, "history": history, "evals": evals}), run_dir)
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{summary}</p>" if summary else ""]
    if rows:
        parts += ["<h2>Metrics</h2>", _comparison_table(rows, hib)]
    table = _evaluation_table(evals, hib)
    if table:
        parts += ["<h2>Student evaluation during training</h2>", table]
    parts.append(_metric_notes(metric_keys(list(rows or []) + evals, hib)))
    for name, caption in grids or []:
        parts += [f"<h2>{html.escape(caption)}</h2>", f'<img src="{html.escape(name)}" class=grid>']
    parts.append(_sample_grids(run_dir))
    if metrics.get("warnings"):
        parts += ["<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in metrics["warnings"])
                  + "</ul>"]
    if figs:
        parts.append("<h2>Training curves</h2>")
        parts += [f'<figure><img src="{n}"><figcaption>{html.escape(c)}</figcaption></figure>' for n, c in figs]
    wall = metrics.get("wall_seconds")
    parts.append(f"<p>{metrics.get('generator_steps', 0)} distillation generator updates, "
                 f"{metrics.get('rl_steps', 0)} RL updates"
                 + (f", {wall / 60:.1f} min of training." if wall else ".") + "</p>")
    parts += ["<h2>Resolved config</h2>", f"<pre>{html.escape(config)}</pre>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img.grid{image-rendering:pixelated;max-width:100%}"
             "figure{display:inline-block;margin:4px}figure img{width:460px}"
             "figure.sample{vertical-align:top;max-width:100%}figure.sample img{width:auto}"
             ".note{font-size:0.85em;color:#555}ol.prompts{font-size:0.85em}.sep{color:#aaa}"
             "pre{background:#f6f6f6;padding:8px;font-size:0.8em}")
    page = f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>" + \
        "\n".join(p for p in parts if p)
    out = run_dir / "report.html"
    io.atomic_write_text(out, page)
    return out
