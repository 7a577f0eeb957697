"""Editors. Each registers here by import path; nothing is imported until used."""

from kedit.editors.base import (EDITORS, Edit, EditFileError, EditMismatchError, Editor, EditStack, InvalidEditError,
                                WeightDelta, editor, register)

register("ft-l", "kedit.editors.ft:FTL")
register("ft-m", "kedit.editors.ft:FTM")
register("lora", "kedit.editors.lora:LoRA")
register("rome", "kedit.editors.rome:ROME")
register("memit", "kedit.editors.memit:MEMIT")
register("alphaedit", "kedit.editors.alphaedit:AlphaEdit")
register("emmet", "kedit.editors.emmet:EMMET")
register("mend", "kedit.editors.mend:MEND")
register("malmen", "kedit.editors.malmen:MALMEN")
register("serac", "kedit.editors.serac:SERAC")
register("grace", "kedit.editors.grace:GRACE")
register("ultraedit", "kedit.editors.ultraedit:UltraEdit")
register("wise", "kedit.editors.wise:WISE")

__all__ = ["EDITORS", "Edit", "EditFileError", "EditMismatchError", "EditStack", "Editor", "InvalidEditError",
           "WeightDelta", "editor", "register"]
