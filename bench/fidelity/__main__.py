"""Fidelity in miniature (issue 10): one command reproduces the table.

    python -m bench.fidelity all --run bench/fidelity-run --budget-s 420      # GPU
    python -m bench.fidelity pretrain --run DIR --budget-s 540                # resumable
    python -m bench.fidelity structure --run DIR
    python -m bench.fidelity compare --run DIR
    python -m bench.fidelity export-carry --run DIR --dest $OUT/carry         # bf16 shards
    python -m bench.fidelity import-carry --src DIR --run DIR

Writes bench/results/fidelity-<device>.json (design.md section 7 records), .md (tables) and
fidelity-<device>-attention.png (block attention heat maps); ``--shape micro`` and small
``--frames/--height/--width`` give a CPU dry run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from .toy_model import ROOT, setup_comfy

log = logging.getLogger("salad.fidelity")


def device_tag() -> tuple[str, str]:
    if not torch.cuda.is_available():
        return "cpu", "cpu"
    name = torch.cuda.get_device_name()
    return name, "h100" if "H100" in name else "h200" if "H200" in name else name.split()[-1].lower()


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return os.environ.get("GIT_SHA", "")


class Results:
    """bench/results/fidelity-<tag>.json: records keyed by (case, metric), replaced on rerun."""

    def __init__(self, out_dir, tag: str | None = None):
        self.device, t = device_tag()
        self.tag = tag or t
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"fidelity-{self.tag}.json"
        self.records = json.loads(self.path.read_text()) if self.path.is_file() else []

    def add(self, case, shape, metric, value, baseline_case=None, **extra):
        self.records = [r for r in self.records if (r["case"], r["metric"]) != (case, metric)]
        self.records.append({"bench": "fidelity", "case": case, "shape": shape, "device": self.device, "metric": metric,
                             "value": value, "baseline_case": baseline_case, "speedup": None, "commit": git_sha(),
                             "date": datetime.date.today().isoformat(), **extra})
        self.path.write_text(json.dumps(self.records, indent=1, default=_json_default))

    def by(self, prefix):
        return [r for r in self.records if r["case"].startswith(prefix)]


def _json_default(o):
    return str(o)


def _finite(v):
    return None if v is None or v != v or v in (float("inf"), float("-inf")) else v


def shape_name(args) -> str:
    return f"toy{args.shape}_{args.frames}x{args.height}x{args.width}"


def cmd_pretrain(args):
    from .pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(shape=args.shape, frames=args.frames, height=args.height, width=args.width, batch=args.batch,
                         lr=args.lr, seed=args.seed, max_steps=args.max_steps)
    trainer, losses = pretrain(cfg, args.run, args.budget_s, args.steps)
    res = Results(args.results, args.tag)
    res.add("pretrain", shape_name(args), "fm_loss_train", trainer.state.get("last_loss"), steps=trainer.step,
            seconds=round(trainer.state.get("seconds", 0.0), 1), batch=cfg.batch, lr=cfg.lr)
    return trainer


def cmd_structure(args):
    from .data import ToyVideos
    from .pretrain import load_pretrained
    from .structure import heatmap_png, measure

    dm, _, state = load_pretrained(args.run)
    dm.requires_grad_(False)
    ds = ToyVideos(_spec(args), "test", 10_000)
    rows, maps = measure(dm, ds, clips=range(args.structure_clips), block_size=args.block_size)
    res = Results(args.results, args.tag)
    for r in rows:
        res.add(f"dense_layer{r['layer']}", shape_name(args), "top10_block_share", r["top10_share"],
                head_top10=r["head_top10"], frame_share=r["frame_share"], head_frame=r["head_frame"],
                pretrain_steps=state["step"], block_size=args.block_size)
    png = res.dir / f"fidelity-{res.tag}-attention.png"
    heatmap_png(maps, png, rows, title=f"toy Wan, pretrain step {state['step']}: block attention (layers x heads)")
    write_md(res)
    return rows


def cmd_compare(args):
    from safetensors.torch import load_file

    from .compare import CompareConfig, run_compare

    sd = load_file(str(Path(args.run) / "model.safetensors"))
    cfg = CompareConfig(sparsity=args.sparsity, block_size=args.block_size, query_group=args.query_group,
                        steps=args.ft_steps, batch=args.ft_batch,
                        lr=args.ft_lr, lora_rank=args.lora_rank, eval_clips=args.eval_clips, sample_clips=args.sample_clips,
                        sample_steps=args.sample_steps, backend=args.backend, frames=args.frames, height=args.height,
                        width=args.width, modes=tuple(args.modes), variants=tuple(args.variants),
                        objective=args.objective)
    res = Results(args.results, args.tag)
    pct = round(cfg.sparsity * 100)

    def record(row):
        case = row["variant"] if row["variant"].startswith("dense") else f"{row['variant']}_{row['mode'].replace('_', '')}_{pct}"
        extra = {k: v for k, v in row.items() if k not in ("fm_loss", "rel_l2", "psnr")}
        for metric in ("fm_loss", "rel_l2", "psnr"):
            res.add(case, shape_name(args), metric, _finite(row.get(metric)), None if case == "dense" else "dense", **extra)
        write_md(res)

    return run_compare(sd, cfg, record=record)


def _spec(args):
    from .data import ClipSpec

    return ClipSpec(args.frames, args.height, args.width)


def _case_order(case: str):
    """dense first, then per mode (compare.MODES order) the variants in compare.VARIANTS order,
    the dense_lora control last; case names are "<variant>_<mode without _>_<pct>"."""
    from .compare import MODES, VARIANTS

    if case.startswith("dense"):
        return (case != "dense") * (len(MODES) + 1), 0
    variant, mode = case.rsplit("_", 2)[:2]
    modes = [m.replace("_", "") for m in MODES]
    return 1 + (modes.index(mode) if mode in modes else len(modes)), VARIANTS.index(variant) if variant in VARIANTS else 99


def write_md(res: Results) -> Path:
    lines = [f"# Fidelity in miniature ({res.device})", "",
             "Toy Wan2.1 (ComfyUI's WanModel, small) pretrained here on procedural latent videos; NOT Wan2.1 "
             "weights, no VBench. relL2 / PSNR: final latents of Euler sampling from the same noise and caption, "
             "against the dense model's.", ""]
    pre = res.by("pretrain")
    if pre:
        p = pre[0]
        lines += [f"Pretraining: {p.get('steps')} steps, batch {p.get('batch')}, {p.get('seconds')} s, "
                  f"last train loss {p['value']}.", ""]
    struct = sorted(res.by("dense_layer"), key=lambda r: int(r["case"][11:]))
    if struct:
        lines += ["## Attention structure (dense toy)", "",
                  "| layer | top-10% block share | per head | same-frame share |", "|---|---|---|---|"]
        lines += [f"| {r['case'][11:]} | {r['value']:.3f} | {', '.join(f'{v:.2f}' for v in r['head_top10'])} | "
                  f"{r['frame_share']:.3f} |" for r in struct]
        lines += ["", "Uniform attention gives 0.10 (top-10% share); see the heat map PNG.", ""]
    cases = {}
    for r in res.records:
        if r["metric"] in ("fm_loss", "rel_l2", "psnr"):
            cases.setdefault(r["case"], {})[r["metric"]] = r
    if cases:
        lines += ["## Comparisons (held-out clips)", "",
                  "| case | held-out FM loss | relL2 vs dense | PSNR vs dense (dB) | trainable | LoRA rank | ft steps x batch, lr, objective |",
                  "|---|---|---|---|---|---|---|"]
        for case in sorted(cases, key=_case_order):
            m = cases[case]
            r = m.get("fm_loss") or next(iter(m.values()))

            def f(metric, fmt):
                v = m.get(metric, {}).get("value")
                return "-" if v is None else format(v, fmt)

            ft = (f"{r.get('steps', 0)} x {r.get('batch', '')}, {r.get('lr', '')}, {r.get('objective', 'flow')}"
                  if r.get("steps") else "-")
            lines.append(f"| {case} | {f('fm_loss', '.4f')} | {f('rel_l2', '.4f')} | {f('psnr', '.2f')} | "
                         f"{r.get('trainable', 0):,} | {r.get('lora_rank', '-')} | {ft} |")
        from .plots import compare_chart

        chart = res.dir / f"fidelity-{res.tag}-compare.png"
        rows = [(c, cases[c].get("fm_loss", {}).get("value"), cases[c].get("rel_l2", {}).get("value"))
                for c in sorted(cases, key=_case_order)]
        compare_chart(rows, f"Fidelity in miniature, toy Wan, 90% sparsity ({res.device})").save(chart)
        lines += ["", f"Chart: `{chart.name}`."]
    path = res.dir / f"fidelity-{res.tag}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.fidelity")
    ap.add_argument("command", choices=("pretrain", "structure", "compare", "all", "export-carry", "import-carry"))
    ap.add_argument("--run", default=str(ROOT / "bench" / "fidelity-run"), help="pretraining run folder")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tag", default=None, help="results file tag (default: h100 / h200 / cpu)")
    ap.add_argument("--shape", default="toy", choices=("toy", "micro"))
    ap.add_argument("--frames", type=int, default=13)
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--budget-s", type=float, default=None, help="pretraining wall-clock budget for this call")
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps for this call")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--query-group", type=int, default=2, choices=(1, 2),
                    help="Top-K query blocks per key list (2 = 128-token query blocks, the pack's default)")
    ap.add_argument("--structure-clips", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--ft-batch", type=int, default=4)
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--eval-clips", type=int, default=8)
    ap.add_argument("--sample-clips", type=int, default=4)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--modes", nargs="+", default=["topk", "st_swa"])
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--objective", default="flow", choices=("flow", "distill"),
                    help="finetuning objective of the comparisons: flow matching on the toy videos, or "
                         "data-free distillation from the dense toy (no videos)")
    ap.add_argument("--dest", default=None)
    ap.add_argument("--src", default=None)
    args = ap.parse_args(argv)
    from .compare import VARIANTS

    args.variants = args.variants or list(VARIANTS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    setup_comfy()
    torch.manual_seed(args.seed)
    if args.command == "export-carry":
        from .pretrain import export_carry

        print("\n".join(str(p) for p in export_carry(args.run, args.dest)))
    elif args.command == "import-carry":
        from .pretrain import import_carry

        print(f"run at step {import_carry(args.src, args.run)}")
    if args.command in ("pretrain", "all"):
        cmd_pretrain(args)
    if args.command in ("structure", "all"):
        cmd_structure(args)
    if args.command in ("compare", "all"):
        cmd_compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
