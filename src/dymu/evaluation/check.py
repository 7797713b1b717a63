"""``python -m dymu.evaluation.check``: the eval extra's install is what ``dymu eval`` needs (``make eval-setup`` runs
it): the CPU torch kept, no torchvision (the registry's build fails on a CPU torch and breaks transformers' image
processors), filelock below 4, lmms-eval's evaluator importable and the ``dymu`` entry point resolving."""

from __future__ import annotations

import importlib.util
import sys


def problems() -> list[str]:
    from importlib.metadata import entry_points, version

    found = []
    if importlib.util.find_spec("torchvision") is not None:
        found.append("torchvision is installed: pip uninstall torchvision timm (it needs a CUDA torch)")
    if int(version("filelock").split(".")[0]) >= 4:
        found.append(f"filelock {version('filelock')}: lmms-eval 0.7.3 needs filelock<4")
    try:
        import lmms_eval.evaluator  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (reported as one line)
        found.append(f"lmms-eval's evaluator does not import: {type(exc).__name__}: {exc}")
    if not [e for e in entry_points(group="lmms_eval.models") if e.name == "dymu"]:
        found.append("no 'dymu' entry point in lmms_eval.models: pip install -e '.[eval]'")
    import torch

    if torch.version.cuda is not None and not torch.cuda.is_available():
        found.append(f"torch {torch.__version__} is a CUDA build on a machine without a GPU (the CPU wheel was replaced)")
    return found


def main() -> int:
    found = problems()
    for problem in found:
        print(f"eval extra: {problem}", file=sys.stderr)
    if not found:
        import torch
        from importlib.metadata import version

        print(f"eval extra ok: torch {torch.__version__}, lmms-eval {version('lmms_eval')}, filelock {version('filelock')}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
