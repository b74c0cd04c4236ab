"""docs/parameters.md is generated from params.py and must not drift."""

import os

from pymta.cli.postconf import params_markdown
from pymta.core.params import PARAMS

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "parameters.md")


def test_parameters_md_is_up_to_date():
    with open(DOC, encoding="utf-8") as f:
        on_disk = f.read()
    assert on_disk == params_markdown(), (
        "docs/parameters.md is out of date: .venv/bin/postconf --doc-markdown > docs/parameters.md")


def test_every_parameter_is_documented_once():
    text = params_markdown()
    for name in PARAMS:
        assert text.count(f"\n## {name}\n") == 1, name
        assert PARAMS[name].doc, f"{name} has no description in params.py"
