"""Images and the run report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


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
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(grid(images, nrow))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp.png")
    im.save(tmp)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------
# The run report: DIR/report.html with its PNGs beside it.

def _curves(history: list[dict], evals: list[dict], out: Path) -> list[tuple[str, str]]:
    """Plot loss / metric curves; returns [(png name, caption)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = []

    def plot(name, caption, keys_of, source, ylabel, logy=False):
        keys = sorted({k for row in source for k in row if keys_of(k)})
        if not keys:
            return
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
        for k in keys:
            pts = [(row["step"], row[k]) for row in source if k in row]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("student update (global step)")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        figs.append((name, caption))

    plot("curve_losses.png", "Losses per role (means over each logging interval)",
         lambda k: k.startswith("loss/"), history, "loss")
    plot("curve_dm_per_step.png", "DM loss per student step (Flash-DMD: high-noise steps only) and GAN loss per step",
         lambda k: k.startswith("dm_loss/") or k.startswith("gan_g_loss/"), history, "loss")
    plot("curve_disc.png", "Discriminator logits on real and on student images", lambda k: k.startswith("disc/"),
         history, "mean logit")
    plot("curve_rl.png", "Stage 2: DPO loss and LRM score of the candidates", lambda k: k.startswith("rl/"),
         history, "value")
    plot("curve_fd.png", "FD of the K-step student on the evaluation set (lower is better)", lambda k: k == "fd",
         evals, "FD")
    plot("curve_quality.png", "Alignment, diversity and held-out oracle score of the student",
         lambda k: k in ("alignment", "diversity", "oracle"), evals, "value")
    return figs


def _table(rows: list[dict]) -> str:
    cols = [("model", "model"), ("steps", "steps"), ("nfe", "NFE"), ("fd", "FD ↓"), ("alignment", "alignment ↑"),
            ("diversity", "diversity (1 = real)"), ("oracle", "oracle ↑"), ("seconds_per_image", "s / image")]
    head = "".join(f"<th>{c}</th>" for _, c in cols)
    body = []
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k, "")
            if isinstance(v, float):
                v = f"{v:.4f}" if k == "seconds_per_image" else f"{v:.3f}"
            cells.append(f"<td>{v}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_report(run_dir: str | Path, comparison: list[dict] | None = None, grids: list[tuple[str, str]] | None = None,
                 title: str = "flashdmd run report", summary: str = "") -> Path:
    """Render DIR/report.html from DIR/metrics.json (+ ``comparison`` rows and image ``grids``)."""
    import html
    import json
    from flashdmd import FlashDMDError
    run_dir = Path(run_dir)
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise FlashDMDError(f"{run_dir}/metrics.json is not readable JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise FlashDMDError(f"{run_dir}/metrics.json is not a flashdmd metrics record")
    figs = _curves(metrics.get("history", []), metrics.get("evals", []), run_dir)
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    rows = comparison if comparison is not None else metrics.get("comparison", [])
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{summary}</p>" if summary else ""]
    if rows:
        parts += ["<h2>Metrics</h2>", _table(rows),
                  "<p class=note>FD: Fréchet distance of the evaluation classifier's features to the test split; "
                  "alignment: share classified as the prompted class; diversity: within-class feature spread "
                  "relative to real data; oracle: the world's held-out preference score (never a training "
                  "signal of Stage 1; Stage 2 trains on the LRM, which learned from it).</p>"]
    for name, caption in grids or []:
        parts += [f"<h2>{html.escape(caption)}</h2>", f'<img src="{name}" class=grid>']
    if metrics.get("warnings"):
        parts += ["<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in metrics["warnings"]) + "</ul>"]
    if figs:
        parts.append("<h2>Training curves</h2>")
        parts += [f'<figure><img src="{n}"><figcaption>{html.escape(c)}</figcaption></figure>' for n, c in figs]
    wall = metrics.get("wall_seconds")
    parts.append(f"<p>{metrics.get('generator_steps', 0)} distillation generator updates, "
                 f"{metrics.get('rl_steps', 0)} RL updates" + (f", {wall / 60:.1f} min of training." if wall else ".") + "</p>")
    parts += ["<h2>Resolved config</h2>", f"<pre>{html.escape(config)}</pre>"]
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img.grid{image-rendering:pixelated;max-width:100%}"
             "figure{display:inline-block;margin:4px}figure img{width:460px}.note{font-size:0.85em;color:#555}"
             "pre{background:#f6f6f6;padding:8px;font-size:0.8em}")
    page = f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style>" + "\n".join(parts)
    out = run_dir / "report.html"
    tmp = out.with_name("report.html.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out
