"""kedit: edit the knowledge of language models.

>>> model, tok = kedit.load_model("smollm2-135m")
>>> edit = kedit.editor("rome").edit(model, tok, [{"prompt": "The capital of France is",
...                                                "subject": "France", "target_new": "Rome"}])
>>> with edit.applied(model): ...
"""

from __future__ import annotations

import logging
from typing import Any

__version__ = "0.1.0"
__all__ = ["Edit", "EditRequest", "editor", "load_editor", "load_model"]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    # lazy: `import kedit` must not import torch/transformers
    if name == "load_model":
        from kedit.models import load_model

        return load_model
    if name == "editor":
        from kedit.editors import editor

        return editor
    if name == "Edit":
        from kedit.editors import Edit

        return Edit
    if name == "EditRequest":
        from kedit.data import EditRequest

        return EditRequest
    if name == "load_editor":
        from kedit.checkpoint import load_editor

        return load_editor
    raise AttributeError(f"module 'kedit' has no attribute {name!r}")
