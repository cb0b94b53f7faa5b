"""Fixtures: each tiny variant saved as a stock HF directory, loaded by transformers and by us."""

from __future__ import annotations

import pytest
from tiny_models import VARIANTS, Pair, Runner, make_hf_model

from r1deploy.models.loader import load_model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_model(request.param)
    hf.save_pretrained(path)
    return Pair(hf, load_model(str(path)), path)


@pytest.fixture
def runner(pair: Pair) -> Runner:
    return Runner(pair.ours)
