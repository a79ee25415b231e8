"""The packaged all-MiniLM-L6-v2 is used only at its pinned version and only with the expected bytes."""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import pytest

from hf_sparse_attn.commands import packaged_model
from hf_sparse_attn.commands.packaged_model import SHA256, PackagedModelError, verify_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def linked_copy(minilm_path: str, tmp_path: Path) -> Path:
    """A folder with links to the verified files, to tamper with one of them."""
    for name in SHA256:
        (tmp_path / name).symlink_to(Path(minilm_path) / name)
    return tmp_path


def test_verified_folder_holds_only_the_checked_files(minilm_path: str) -> None:
    folder = Path(minilm_path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(SHA256)
    assert {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in SHA256} == SHA256


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_a_changed_file_is_refused(linked_copy: Path, name: str) -> None:
    original = (linked_copy / name).read_bytes()
    (linked_copy / name).unlink()
    (linked_copy / name).write_bytes(original.replace(b"{", b"{ ", 1))  # one byte more, same JSON
    with pytest.raises(PackagedModelError, match=rf"{name} has SHA-256 [0-9a-f]{{64}}, expected {SHA256[name]}"):
        verify_folder(linked_copy)


def test_a_missing_file_is_refused(linked_copy: Path) -> None:
    (linked_copy / "model.safetensors").unlink()
    with pytest.raises(PackagedModelError, match="model.safetensors is missing"):
        verify_folder(linked_copy)


@pytest.mark.parametrize("installed", ["1.0.1", None], ids=["other-version", "not-installed"])
def test_only_the_pinned_version_is_used(monkeypatch: pytest.MonkeyPatch, installed: str | None) -> None:
    def fake_version(name: str) -> str:
        if installed is None:
            raise PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(packaged_model, "version", fake_version)
    with pytest.raises(PackagedModelError, match=rf'pip install "{packaged_model.PACKAGE}==1\.0\.0"'):
        packaged_model.package_folder()


def test_the_extras_pin_the_verified_version() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert text.count(f'"{packaged_model.PACKAGE}') == 2  # the demo and test extras, nowhere else
    assert text.count(f'"{packaged_model.PACKAGE}=={packaged_model.VERSION}"') == 2
