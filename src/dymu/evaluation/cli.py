"""``dymu eval`` and ``dymu report`` (registered by ``dymu.cli``; nothing heavy imported until a command runs)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DymuError

#: marker file of an output folder of dymu eval (the model it belongs to)
MARKER = "dymu-eval.json"
MARKER_FORMAT = "dymu-eval-folder"
DEFAULT_METHODS = "full,dymu-low,dymu-mid,dymu-high"


def _need_lmms_eval() -> None:
    import importlib.util

    if importlib.util.find_spec("lmms_eval") is None:
        raise DymuError("dymu eval needs lmms-eval: pip install -e '.[eval]' (see README, Evaluation; `make eval-setup`)")


def check_out(out: Path, model: str) -> None:
    """``out`` is new, empty, or an earlier ``dymu eval`` folder of the same model (then the run resumes)."""
    marker = out / MARKER
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except ValueError:
            found = {}
        if found.get("format") != MARKER_FORMAT:
            raise DymuError(f"--out {out}: {MARKER} is not dymu's; choose another folder")
        if found.get("model") != str(Path(model).resolve() if Path(model).exists() else model):
            raise DymuError(f"--out {out} holds an evaluation of {found.get('model')}, not of {model}; choose another folder")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DymuError(f"--out {out}: exists and is not a dymu eval folder; choose a new or empty folder")


def cmd_eval(args) -> None:
    from ..files import Lock, atomic_write_json
    from . import report

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    methods = split_methods(args.methods)
    if not tasks:
        raise DymuError("--tasks: give at least one task")
    from .settings import parse_method

    for method in methods:  # before lmms-eval is even imported
        parse_method(method, args.model, args.vtu)
    _need_lmms_eval()
    from .runner import run

    out = Path(args.out)
    check_out(out, args.model)
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    with Lock(out / MARKER, f"--out {out}"):
        atomic_write_json(out / MARKER, {"format": MARKER_FORMAT, "model": model})
        files = run(args.model, tasks, methods, out, limit=args.limit, batch_size=args.batch_size, vtu=args.vtu,
                    toy_data=args.toy_data)
        data = report.table(report.load_results([out]), tasks, methods)
        written = report.write(data, out)
    print(report.markdown(data), end="")
    print(f"{len(files)} results; table and plots: {', '.join(str(p) for p in written)}")


def split_methods(text: str) -> list[str]:
    """Methods separated by commas, where a comma followed by ``key=`` continues the method before it
    (``full,fastv:k=2,r=0.5,dymu-mid`` is three methods)."""
    import re

    parts = [p.strip() for p in re.split(r",(?![A-Za-z_]+=)", text) if p.strip()]
    if not parts:
        raise DymuError("--methods: give at least one method")
    return parts


def cmd_report(args) -> None:
    from . import report

    data = report.table(report.load_results(args.dirs))
    print(report.markdown(data), end="")
    if args.out:
        written = report.write(data, args.out)
        print(f"written: {', '.join(str(p) for p in written)}")


def add_commands(sub) -> None:
    """The ``eval`` and ``report`` subcommands."""
    from .runner import DEFAULT_BATCH_SIZE

    p = sub.add_parser("eval", help="evaluate methods on lmms-eval tasks: the paper-layout table (needs the eval extra)")
    p.add_argument("model", help="LLaVA-1.5 or LLaVA-OneVision checkpoint folder or hub id (e.g. assets/toy-llava)")
    p.add_argument("--tasks", required=True, help="lmms-eval tasks, comma separated (dymu_toy_qa, dymu_toy_describe, "
                   "pope, gqa, ...)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="methods, comma separated: full, dymu-low|mid|high (the "
                   "model's thresholds/LEVEL.json), dtome:FILE, tome:r=R, fastv:k=K,r=R, vtw:k=K, joined with + to "
                   "combine (dymu-mid+fastv:k=2,r=0.5), +vtu=none for compact mode (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier run of the same model: "
                   "finished (method, task) pairs are skipped, an unfinished one continues)")
    p.add_argument("--limit", type=int, help="first N samples of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per generate (default: %(default)s)")
    p.add_argument("--vtu", default="fast", choices=["fast", "exact", "none"],
                   help="VTU mode of methods that name none (default: %(default)s)")
    p.add_argument("--toy-data", help="toy benchmark folder (python -m toyvlm.data --out DIR) for the dymu_toy tasks "
                   "(default: $DYMU_TOY_BENCHMARK, else one written once into dymu's cache folder)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="merge dymu eval output folders into one table")
    p.add_argument("dirs", nargs="+", help="dymu eval --out folders")
    p.add_argument("--out", help="also write table.md/.csv/.json and the plots here")
    p.set_defaults(func=cmd_report)
