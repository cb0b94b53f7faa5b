"""Hugging Face Hub model ids (`org/name`): the files serving needs, downloaded or found in the local cache.

Which name is what: an existing path stays a path; a preset name or alias (`r1`, `deepseek-r1`,
`r1-distill-qwen-7b`) stays a preset (configs only); an `org/name` goes to the Hub through huggingface_hub,
which honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN and shows its own download bars. An
`org/name` that is also a preset's id (deepseek-ai/DeepSeek-R1) falls back to the preset's config only with
--load-format dummy (random weights need no checkpoint), and says so; otherwise the error says what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

from r1deploy.errors import UsageError
from r1deploy.models.model_names import check_model_source, is_repo_id
from r1deploy.presets import preset_path

log = logging.getLogger("r1deploy.models")

_CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                 "chat_template.jinja", "chat_template.json"]
_WEIGHT_FILES = ["*.safetensors", "model.safetensors.index.json"]


def repo_id_of(path: Path) -> str | None:
    """`org/name` for a snapshot folder of the Hub's cache (models--org--name/snapshots/<rev>), else None: the
    name a model downloaded by id is served under, whoever resolved it to a path."""
    if path.parent.name != "snapshots" or not path.parent.parent.name.startswith("models--"):
        return None
    return path.parent.parent.name.removeprefix("models--").replace("--", "/", 1)


def resolve_model_source(model: str | None, *, revision: str | None = None, download_dir: str | None = None,
                         load_format: str = "auto") -> str | None:
    """The local path (or preset name) to load for `model`; a Hub id is downloaded into the cache first. Anything
    else is refused here (UsageError), before a file is opened or the Hub asked."""
    check_model_source(model)
    if model is None or Path(model).expanduser().exists() or not is_repo_id(model):
        if revision is not None:
            raise UsageError(f"--revision {revision} applies to Hugging Face Hub ids (org/name), not {model!r}")
        return model
    try:
        return str(_download(model, revision, download_dir, weights=load_format != "dummy"))
    except UsageError as exc:
        preset = preset_path(model)
        if load_format == "dummy" and preset is not None:
            log.warning("%s: %s; using the %s preset's config (random weights)", model, exc, preset.stem)
            return model
        hint = (f"; or pass --load-format dummy for random weights at the {preset.stem} preset's shape"
                if preset is not None else "")
        raise UsageError(f"{exc}{hint}") from None


def _download(repo_id: str, revision: str | None, download_dir: str | None, weights: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = download_dir or constants.HF_HUB_CACHE
    log.info("fetching %s%s from the Hugging Face Hub into %s (only config, tokenizer%s)", repo_id,
             f"@{revision}" if revision else "", cache, " and safetensors" if weights else "")
    try:
        # local_files_only spelled out: given a commit hash, snapshot_download would still list the repo online.
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                      local_files_only=constants.HF_HUB_OFFLINE,
                                      allow_patterns=_CONFIG_FILES + (_WEIGHT_FILES if weights else [])))
    except GatedRepoError:
        raise UsageError(f"{repo_id} is gated: accept its terms on huggingface.co and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise UsageError(f"{repo_id} has no revision {revision!r} (--revision)") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{repo_id} is not a model on the Hugging Face Hub (or it is private: set HF_TOKEN); "
                         "for a local model pass its directory or .gguf file") from None
    except LocalEntryNotFoundError:
        raise UsageError(f"{repo_id} is not in the Hugging Face cache {cache} and the Hub cannot be reached "
                         "(HF_HUB_OFFLINE is set or there is no network): download it first (`hf download "
                         f"{repo_id}`), point HF_HOME or --download-dir at a cache holding it, or pass a local "
                         "directory") from None
    except (HfHubHTTPError, OSError) as exc:
        raise UsageError(f"cannot download {repo_id} from the Hugging Face Hub: {exc}") from None
    if not (path / "config.json").is_file():
        raise UsageError(f"{repo_id} has no config.json: not a transformers model r1deploy can serve")
    if weights and not any(path.glob("*.safetensors")):
        raise UsageError(f"{repo_id} has no *.safetensors weights (r1deploy reads safetensors checkpoints; for a "
                         "GGUF repo download the .gguf file and pass its path)")
    return path
