"""Replace DeepSpeed's consolidation scripts in each checkpoint folder with ones that refuse.

DeepSpeed copies `zero_to_fp32.py` and `zero_to_torch.py` next to every ZeRO checkpoint it saves (0.19.8: into
the directory holding the tags, `<run>/checkpoints/`). They rebuild the model
from the optimizer's partitions, so after progressive freezing (frozen parameters leave the optimizer) they
return a model without the embedding and the frozen layers, and say nothing. The complete weights are in the
checkpoint's `export/`; the scripts left in their place exit 1 and point there.
"""

from __future__ import annotations

import os
from pathlib import Path

SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")

_REFUSAL = '''#!/usr/bin/env python
"""Written by sdt-dist in place of DeepSpeed's {name}, which would silently return a partial model."""
import sys

sys.exit(
    "{name}: not for sdt-dist checkpoints. DeepSpeed rebuilds the model from the optimizer state, which no "
    "longer holds the parameters progressive freezing removed (the embedding and the frozen layers), so the "
    "result would be incomplete. The complete weights are in export/ inside each checkpoint "
    "(student.safetensors, teacher.safetensors, model_config.json); for a Hugging Face "
    "folder run `sdt-export-hf <run or checkpoint folder> OUT`."
)
'''


def replace_consolidation_scripts(checkpoint_dir: Path) -> list[Path]:
    """Overwrite the DeepSpeed consolidation scripts present in `checkpoint_dir`; returns those replaced."""
    replaced = []
    for name in SCRIPTS:
        path = Path(checkpoint_dir) / name
        if path.is_file():
            path.write_text(_REFUSAL.format(name=name))
            os.chmod(path, 0o755)
            replaced.append(path)
    return replaced
