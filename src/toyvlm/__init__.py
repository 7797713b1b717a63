"""toyvlm: tiny synthetic vision-language tasks for CPU-scale experiments.

See :mod:`toyvlm.data` for the synthetic visual-question-answering generator.
Public names are re-exported lazily so that ``python -m toyvlm.data`` does not
import the module twice.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "QA",
    "Example",
    "Obj",
    "Scene",
    "candidate_questions",
    "generate_scene",
    "make_split",
    "normalize_answer",
    "questions_for",
    "read_benchmark",
    "render",
    "score",
    "write_benchmark",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("toyvlm.data"), name)
    raise AttributeError(f"module 'toyvlm' has no attribute {name!r}")
