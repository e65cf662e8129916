"""editlab eval: score editing methods on a benchmark, sweep their parameters, and report the trade-offs.

    editlab eval --benchmark toy-edits --cases 8 --method p2p-null-text --method ip2p \
        --sweep ip2p.image_guidance=1.0,1.5,2.0 --out results/
    editlab eval --benchmark pie-bench --root PIE-Bench_v1/data --method ddpm-p2p --clip ViT-L-14.safetensors \
        --pie-bench-compat --weights sd14.safetensors --out results/
    editlab eval --report results/

--out holds results.jsonl / results.csv (one row per case, method and setting), run.json (what made them),
images/ (every output, PNG) and rows/ (each process's rows as they finish). Rerunning the same command
skips finished rows; under torchrun each process takes its share and rank 0 merges.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

NAME = "eval"
HELP = "evaluate editing methods on a benchmark (metrics, parameter sweeps, resumable results, reports)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from editing.evaluation.benchmarks import BENCHMARKS, KINDS
    from editing.evaluation.methods import METHODS

    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="write the report of the results in DIR (summary, plots, grids) and stop")
    parser.add_argument("--benchmark", choices=BENCHMARKS, default=None)
    parser.add_argument("--root", type=Path, default=None, help="benchmark folder (pie-bench, folder)")
    parser.add_argument("--cases", type=int, default=None, help="first N cases (toy-edits: default 200)")
    parser.add_argument("--benchmark-seed", type=int, default=0, help="toy-edits: seed of the generated cases")
    parser.add_argument("--kinds", default=",".join(KINDS), help="toy-edits: edit kinds, comma-separated")
    parser.add_argument("--categories", default=None, help="pie-bench: editing_type_id values, comma-separated")
    parser.add_argument("--method", action="append", default=[], help=f"method to run: {', '.join(METHODS)}")
    parser.add_argument("--sweep", action="append", default=[], metavar="METHOD.PARAM=V1,V2",
                        help="sweep a method parameter (repeat: cartesian product)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every row")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--pie-bench-compat", action="store_true",
                        help="PIE-Bench's metric conventions instead of the clean ones (docs/evaluation.md)")
    parser.add_argument("--clip", type=Path, default=None,
                        help="open_clip CLIP weights for the CLIP metrics (toy-edits: the toy CLIP when present)")
    parser.add_argument("--clip-config", type=Path, default=None, help="its JSON open_clip config (default ViT-L/14)")
    parser.add_argument("--dino", type=Path, default=None, help="DINO ViT checkpoint (structure, MagicBrush DINO)")
    parser.add_argument("--lpips", type=Path, default=None, help="torchvision backbone for LPIPS "
                        "(squeezenet1_1-b8a52dc0.pth as PIE-Bench, alexnet-owt-7be5be79.pth, vgg16-397923af.pth)")
    parser.add_argument("--weights", type=Path, default=None, help="editlab SD weights (default: the toy model)")
    parser.add_argument("--ip2p-weights", type=Path, default=None, help="InstructPix2Pix weights (default: toy)")
    parser.add_argument("--controlnet", type=Path, default=None,
                        help="ControlNet weights for 'controlnet' (the toy model has no trained one)")
    parser.add_argument("--ip-adapter", type=Path, default=None,
                        help="IP-Adapter weights (toy model: the bundled toy IP-Adapter)")
    parser.add_argument("--image-encoder", type=Path, default=None,
                        help="the IP-Adapter's CLIP image encoder (toy model: the toy CLIP)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def toy_clip() -> Path:
    import ldm

    return Path(ldm.__file__).parent / "toy" / "weights" / "toy-clip.safetensors"


def run_identity(args) -> dict:
    """What must agree for rows to be resumed in the same folder."""
    from ldm.files import file_sha256

    def file_id(path):
        return None if path is None else {"name": Path(path).name, "sha256": file_sha256(path)}

    return {"benchmark": args.benchmark, "root": str(args.root) if args.root else None,
            "benchmark_seed": args.benchmark_seed, "seed": args.seed, "compat": args.pie_bench_compat,
            "weights": file_id(args.weights), "ip2p_weights": file_id(args.ip2p_weights),
            "clip": file_id(args.clip), "dino": file_id(args.dino), "lpips": file_id(args.lpips),
            "controlnet": file_id(args.controlnet), "ip_adapter": file_id(args.ip_adapter),
            "image_encoder": file_id(args.image_encoder)}


def check_run_file(out: Path, identity: dict, record: dict) -> None:
    from ldm.files import atomic_path

    path = out / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = [k for k in identity if previous.get("identity", {}).get(k) != identity[k]]
        if changed:
            raise ValueError(f"{out} holds results of another run (differs in {', '.join(changed)}); use another "
                             "--out or the same options")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"identity": identity, **record}, indent=1, sort_keys=True) + "\n")


def versions() -> dict:
    import importlib

    found = {}
    for name in ("torch", "torchvision", "torchmetrics", "timm", "open_clip"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:
            found[name] = None
    return found


def run(args):
    from editing.evaluation.benchmarks import load_benchmark
    from editing.evaluation.methods import Resources
    from editing.evaluation.metrics import MetricSuite
    from editing.evaluation.runner import run_plan, world
    from editing.evaluation.sweeps import parse_sweeps, plan

    if args.report is not None:
        from editing.evaluation.report import write_report

        for path in write_report(args.report):
            print(path)
        return 0
    if args.benchmark is None or args.out is None or not args.method:
        raise ValueError("give --benchmark, --out and at least one --method (or --report DIR)")
    for name in ("weights", "ip2p_weights", "controlnet", "ip_adapter", "image_encoder"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such file")
    if args.clip is None and args.benchmark == "toy-edits" and toy_clip().is_file():
        args.clip = toy_clip()
    sweeps = parse_sweeps(args.sweep, args.method)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    categories = tuple(c.strip() for c in args.categories.split(",")) if args.categories else None
    if args.cases is not None and args.cases < 1:
        raise ValueError(f"--cases {args.cases}: give at least 1")
    cases = load_benchmark(args.benchmark, args.root, args.cases, args.benchmark_seed, kinds, categories)
    rows = plan(cases, args.method, sweeps, args.seed)
    suite = MetricSuite(args.clip, args.clip_config, args.dino, args.lpips, args.pie_bench_compat)
    suite.load()
    if args.device == "cuda" and world()[1] > 1:  # torchrun: one GPU per process
        import os

        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    resources = Resources(args.weights, args.ip2p_weights, args.clip, args.clip_config, args.controlnet,
                          args.ip_adapter, args.image_encoder, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    if world()[0] == 0:
        check_run_file(args.out, run_identity(args), {"versions": versions(), "device": args.device,
                                                      "threads": torch.get_num_threads(),
                                                      "not_computed": suite.missing()})
    merged = run_plan(rows, args.seed, suite, resources, args.out)
    if merged is not None:
        print(f"{len(merged)} rows in {args.out / 'results.jsonl'} and {args.out / 'results.csv'}")
    return 0
