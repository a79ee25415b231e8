"""README is the contract: CI runs exactly its test command, and its Python examples use the real API."""

from __future__ import annotations

import re

from conftest import REPO

import hf_sparse_attn


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci_commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("pip install")]
    assert len(ci_commands) == 1
    assert ci_commands[0] in readme


def test_readme_names_only_exported_functions():
    readme = (REPO / "README.md").read_text()
    used = set(re.findall(r"hf_sparse_attn\.([a-z_]+)\(", readme))
    assert used, "README shows no hf_sparse_attn calls"
    assert used <= set(hf_sparse_attn.__all__), used - set(hf_sparse_attn.__all__)
