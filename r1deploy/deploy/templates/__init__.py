"""Deployment file templates as data (string.Template: $name fields, $$ for a literal $)."""

from __future__ import annotations

from importlib.resources import files
from string import Template
from typing import Any


def render(template: str, **fields: Any) -> str:
    return Template(files(__package__).joinpath(template).read_text()).substitute(fields)
