"""What a model argument or model name may be, checked before anything is opened or fetched.

The operator's model argument is an existing local path (theirs to choose), a preset name, or a Hugging Face
Hub id (`org/name` in ASCII, as huggingface_hub validates it); anything else, such as a missing path with `..`
or a Hub id with odd characters, is refused with a UsageError (exit 2) instead of being tried as a preset file
or sent to the Hub. One model is served per process and a request's `model` is only compared with its name,
never opened; a name that looks like a path (`..` segment, absolute path, control characters) is refused
all the same (HTTP 400), and so is such a --served-model-name.
"""

from __future__ import annotations

import re
from pathlib import Path

from r1deploy.errors import UsageError
from r1deploy.presets import preset_names, preset_path

MAX_NAME_CHARS = 256
_ASCII_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_repo_id(model: str) -> bool:
    """`org/name` as the Hub spells it: ASCII letters, digits, '-', '_', '.'; no '--' or '..', no '-' or '.'
    at either end of a part, at most 96 characters a part (huggingface_hub's own check)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if _ASCII_REPO_ID.fullmatch(model) is None:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def check_model_source(model: str | None) -> None:
    """UsageError unless `model` is None (the embedded model), an existing path, a preset or a Hub id."""
    if model is None or Path(model).expanduser().exists() or preset_path(model) is not None or is_repo_id(model):
        return
    if ".." in re.split(r"[\\/]", model) or _looks_like_path(model):
        raise UsageError(f"unknown model {model!r}: no such file or directory")
    raise UsageError(f"unknown model {model!r}: not a local path, a preset ({', '.join(preset_names())}) or a Hugging "
                     "Face Hub id (org/name of ASCII letters, digits, '-', '_' and '.', without '..' or '--')")


def path_like(name: str) -> str | None:
    """Why a model *name* (a request's `model`, --served-model-name) could be taken for a path, else None."""
    if _CONTROL.search(name):
        return "control characters are not allowed in a model name"
    if len(name) > MAX_NAME_CHARS:
        return f"a model name has at most {MAX_NAME_CHARS} characters"
    if ".." in re.split(r"[\\/]", name):
        return "'..' is not allowed in a model name"
    if _looks_like_path(name) and not is_repo_id(name):
        return "a model name is not a path"
    return None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "\\", "~", "./", ".\\")) or re.match(r"[A-Za-z]:[\\/]", name) is not None
