"""Where the embedded tiny Llama lives, so ``model.name = "embedded"`` works offline.

Flower ships an app to its runtime as a FAB that carries source and text files but no weights, and
puts it first on ``sys.path``; the weights are then found in the installed ``pollen-fl`` distribution
(a regular or an editable install) instead of next to this file.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

EMBEDDED_NAME = "embedded"
_RELATIVE = Path("tasks") / "assets" / "tiny-llama"
_WEIGHTS = "model.safetensors"


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent / "assets" / "tiny-llama"
    found = [here]
    try:
        dist = metadata.distribution("pollen-fl")
    except metadata.PackageNotFoundError:
        return found
    found.append(Path(str(dist.locate_file(_RELATIVE))))
    direct_url = dist.read_text("direct_url.json")
    if direct_url:  # editable installs record the source folder here
        url = json.loads(direct_url).get("url", "")
        if url.startswith("file://"):
            found.append(Path(unquote(urlparse(url).path)) / _RELATIVE)
    return found


def embedded_model_dir() -> Path:
    """The folder holding the embedded model's config, weights and tokenizer."""
    for candidate in _candidates():
        if (candidate / _WEIGHTS).is_file():
            return candidate
    searched = ", ".join(str(c) for c in _candidates())
    raise FileNotFoundError(
        f"the embedded model weights ({_WEIGHTS}) were not found in {searched}; install Pollen with "
        "`pip install -e .` from its repository, or run scripts/build_base_model.py"
    )


def resolve_model_name(name: str) -> str:
    """``model.name`` as transformers loads it: a folder for 'embedded' and 'smollm2-135m', else unchanged.

    'smollm2-135m' is converted on first use (tasks/smollm2.py); server and nodes resolve alike.
    """
    if name == EMBEDDED_NAME:
        return str(embedded_model_dir())
    from tasks.smollm2 import SMOLLM2_NAME, smollm2_model_dir

    return str(smollm2_model_dir()) if name == SMOLLM2_NAME else name
