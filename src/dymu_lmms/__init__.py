"""dymu's lmms-eval plugin: the ``dymu`` model (entry point ``lmms_eval.models``) and the toy benchmark's tasks.

This module stays light: lmms-eval resolves its entry point when it starts, before it knows which model is asked
for, so it imports neither torch nor dymu; the model class (``dymu.evaluation.model.DymuLMM``) is imported by
lmms-eval only when ``--model dymu`` is used. The tasks (``dymu_toy_qa``, ``dymu_toy_describe``) are lmms-eval task
YAML files in :data:`TASKS`: ``lmms-eval --include_path`` that folder (``dymu eval`` does it itself).
"""

from __future__ import annotations

import os

#: the folder of the toy benchmark's lmms-eval tasks (pass it to ``lmms-eval --include_path``)
TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
#: the lmms-eval model name and the class behind it
MODEL_ID = "dymu"
MODEL_CLASS = "dymu.evaluation.model.DymuLMM"


def manifest():
    """The ``ModelManifest`` lmms-eval registers for ``--model dymu`` (called by its entry-point loader)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
