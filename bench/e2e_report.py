"""Markdown table and PNG (stacked attention / rest per configuration) from e2e-<device>.json."""

from __future__ import annotations

import json
from pathlib import Path

from bench.provenance import short_commit


def _by_case(records):
    shapes: dict[str, dict[str, dict]] = {}
    for r in records:
        case = shapes.setdefault(r["shape"], {}).setdefault(r["case"], {"case": r["case"]})
        case[r["metric"]] = r["value"]
        if r["metric"] == "step_s":
            case["speedup"] = r.get("speedup")
            case["note"] = r.get("note", "")
        if r["metric"] == "attn_ms_per_step":
            case["share"] = r.get("share")
        if r["metric"] == "peak_gib":
            case["model_gib"] = r.get("model_gib")
            case["peak_note"] = r.get("note", "")
            case["resident_gib"], case["transient_gib"] = r.get("resident_gib"), r.get("transient_gib")
        if r["metric"] in ("not_run", "failed"):
            case["note"] = r.get("note", "")
    return shapes


def _extra_gib(case: dict, dense: dict) -> float:
    """The case's memory above dense: what it keeps allocated over the base model (resident)
    plus its transient peak less dense's (records with both parts; dense runs first, so its
    resident part is the first run's one-off allocations that every later case shares); else
    the plain difference of the peaks."""
    if all(d.get(k) is not None for d, k in ((case, "resident_gib"), (case, "transient_gib"), (dense, "transient_gib"))):
        return case["resident_gib"] + case["transient_gib"] - dense["transient_gib"]
    return case["peak_gib"] - dense["peak_gib"]


def write_report(json_path: Path) -> None:
    json_path = Path(json_path)
    records = json.loads(json_path.read_text())
    if not records:
        return
    shapes = _by_case(records)
    r0 = records[0]
    lines = [
        f"# e2e benchmark — {r0['device']} — commit {short_commit(r0['commit'])} — {r0['date']}",
        "",
        "ComfyUI 0.3.75 WanModel, random weights (real key names), bf16, batch 1, comfy.sample.sample "
        "(euler/simple, cfg 1: one forward per step). step s = mean per sampling step after a warm-up "
        "sample (CUDA events around every model call); speedup = dense_comfy / case, same run; "
        "attention = SALAD runtime stats (selection + both branches + Proj) or events around the dense "
        "self-attention call; extra = memory the case keeps allocated over the released base model "
        "(SALAD: weights, caches) + its peak above the timed run's start, less dense's peak above its "
        "start; rel L2 = "
        "final latent vs dense, same seed and inputs (random weights: a code-path check, not a quality measure).",
        "",
        "| shape | case | step s | speedup | attention ms/step | attention share | peak GiB | extra GiB vs dense (% of model) | rel L2 vs dense | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for shape, cases in shapes.items():
        for c in cases.values():
            extra = ""
            # Each case against dense run the same way (compiled rows against compiled dense).
            dense = cases.get("dense_comfy" + ("_compiled" if c["case"].endswith("_compiled") else ""), {})
            if "peak_gib" in c and dense.get("peak_gib") is not None and not c["case"].startswith("dense_comfy"):
                d = _extra_gib(c, dense)
                model = c.get("model_gib") or 0
                extra = f"{d:+.3f}" + (f" ({100 * d / model:+.2f}%)" if model else "") + (" *" if c.get("peak_note") else "")
            fmt = lambda k, f: (f.format(c[k]) if c.get(k) is not None else "")  # noqa: E731
            step = fmt("step_s", "{:.3f}") or ("not run" if "not_run" in c else "failed" if "failed" in c else "")
            lines.append(
                f"| {shape} | {c['case']} | {step} | {fmt('speedup', '{:.2f}×')} | {fmt('attn_ms_per_step', '{:.1f}')} | "
                f"{fmt('share', '{:.1%}')} | {fmt('peak_gib', '{:.2f}')} | {extra} | {fmt('rel_l2', '{:.3g}')} | {c.get('note', '')} |"
            )
    if any(c.get("peak_note") for cases in shapes.values() for c in cases.values()):
        notes = {c["peak_note"] for cases in shapes.values() for c in cases.values() if c.get("peak_note")}
        lines += ["", "\\* " + "; ".join(sorted(notes))]
    json_path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(shapes, json_path.with_suffix(".png"), r0["device"])


def _plot(shapes, path: Path, device: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table is the result; say that the plot was not drawn
        print(f"# matplotlib is not installed: {path.name} not drawn (pip install matplotlib)", flush=True)
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.5), squeeze=False)
    for ax, (shape, cases) in zip(axes[0], shapes.items()):
        rows = [c for c in cases.values() if c.get("step_s")]
        names = [c["case"] for c in rows]
        attn = [c.get("attn_ms_per_step", 0.0) / 1000 for c in rows]
        rest = [c["step_s"] - a for c, a in zip(rows, attn)]
        ys = range(len(rows))
        ax.barh(ys, attn, color="#d62728", label="attention (self-attn core)")
        ax.barh(ys, rest, left=attn, color="#7f7f7f", label="rest of the step")
        for y, c in zip(ys, rows):
            label = f" {c['step_s']:.3f} s" + (f"  {c['speedup']:.2f}×" if c.get("speedup") else "")
            ax.text(c["step_s"], y, label, va="center", fontsize=8)
        ax.set_yticks(list(ys), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds per sampling step")
        ax.set_title(f"{shape} — {device}", fontsize=10)
        ax.set_xlim(0, max(c["step_s"] for c in rows) * 1.35)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
