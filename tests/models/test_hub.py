"""Hub model ids: loaded from a local cache in the Hub's own layout with HF_HUB_OFFLINE=1 (no network), the
served name is the repo id, and every failure names the flag or variable to change."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from r1deploy.cli import main
from r1deploy.errors import UsageError
from r1deploy.models.hub import is_repo_id, repo_id_of, resolve_model_source

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "tests" / "server"))
from tiny import save_tiny_model_dir

REPO = "tiny-org/Tiny-R1-Test"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME with hub/models--tiny-org--Tiny-R1-Test/{refs/main, snapshots/<rev>/...}, as `hf download`
    leaves it (files copied, not blob symlinks: huggingface_hub reads both)."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = save_tiny_model_dir(repo / "snapshots" / REVISION)
    (snapshot / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                                                       "max_new_tokens": 5}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return home


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import; the subprocess test below sets the variable itself.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_names() -> None:
    assert is_repo_id(REPO) and is_repo_id("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    assert not any(is_repo_id(n) for n in ("r1", "deepseek-r1", "a/b/c", "a--b/c", "/abs/path", "x.gguf"))
    assert repo_id_of(Path("/c/hub/models--deepseek-ai--DeepSeek-R1/snapshots/abc")) == "deepseek-ai/DeepSeek-R1"
    assert repo_id_of(Path("/models/DeepSeek-R1")) is None


def test_hub_id_resolves_to_the_cached_snapshot(hub_cache: Path, offline: None) -> None:
    path = resolve_model_source(REPO, download_dir=str(hub_cache / "hub"))
    assert path is not None and Path(path).resolve() == (hub_cache / "hub" / "models--tiny-org--Tiny-R1-Test" /
                                                          "snapshots" / REVISION).resolve()
    assert resolve_model_source(REPO, revision=REVISION, download_dir=str(hub_cache / "hub")) == path


def test_paths_and_presets_stay_as_they_are(tmp_path: Path) -> None:
    assert resolve_model_source(None) is None
    assert resolve_model_source("r1") == "r1"  # an alias is a preset, never a Hub lookup
    assert resolve_model_source(str(tmp_path)) == str(tmp_path)
    with pytest.raises(UsageError, match="--revision"):
        resolve_model_source(str(tmp_path), revision="main")


def test_missing_repo_offline_names_what_to_do(tmp_path: Path, offline: None) -> None:
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE.*--download-dir") as info:
        resolve_model_source("nobody/no-such-model", download_dir=str(tmp_path))
    assert "--load-format dummy" not in str(info.value)  # no preset of that name


def test_preset_id_falls_back_to_its_config_only_with_dummy(tmp_path: Path, offline: None) -> None:
    repo = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    with pytest.raises(UsageError, match="--load-format dummy"):
        resolve_model_source(repo, download_dir=str(tmp_path))
    assert resolve_model_source(repo, download_dir=str(tmp_path), load_format="dummy") == repo


def test_serve_exits_2_naming_the_flag(tmp_path: Path, offline: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "--download-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--load-format dummy" in err and "load_format=" not in err.split("--load-format dummy")[0]


def test_llm_loads_a_hub_id_offline_from_hf_home(hub_cache: Path, tmp_path: Path) -> None:
    """The real environment path: HF_HOME and HF_HUB_OFFLINE as a user sets them, in a fresh process."""
    home = tmp_path / "home"
    shutil.copytree(hub_cache, home, symlinks=True)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    script = (
        "from r1deploy import LLM\n"
        f"llm = LLM({REPO!r}, device='cpu', max_model_len=64, num_gpu_blocks_override=16)\n"
        "out = llm.generate('the cat', None)[0]\n"
        "p = llm.get_default_sampling_params()\n"
        "print(llm.engine.loaded.name, p.temperature, p.top_p, p.top_k, p.max_tokens, len(out.token_ids) <= 5)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    # the served name is the repo id; generate(prompt, None) used the snapshot's generation_config.json
    assert done.stdout.split()[-6:] == [REPO, "0.6", "0.95", "20", "5", "True"]
