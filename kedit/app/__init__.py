"""The live editing web app: ``python -m kedit.app`` (or ``make app``).

Type a fact, watch the model change its answer beside the unedited one, check the
neighbours, chat with the edited model, undo, share the edit as a file, evaluate.

* :mod:`kedit.app.core` -- the logic (:class:`Workbench`): one model, one shared edit stack,
  one process-wide lock; no web code, tested on tiny models.
* :mod:`kedit.app.ui` -- the gradio page over a workbench.
* :mod:`kedit.app.__main__` -- the command line: load the model, serve on 127.0.0.1.
"""

from kedit.app.core import Workbench

__all__ = ["Workbench"]
