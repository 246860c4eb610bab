"""The domain README against the code it describes: the template.yaml schema block lists every key with the
schema's own default, and the example `auto` log is what the rules print."""
from __future__ import annotations

import dataclasses
import typing

import yaml

from conftest import REPO_ROOT, TEMPLATES_DIR
from workbench import auto, template
from workbench.template import load_template

README = REPO_ROOT / "models" / "image_classification" / "README.md"
# Keys whose README value is an example of what a template may hold, not a default: (the item's schema, or
# None for an optional section shown filled in).
EXAMPLES = {"metrics": template.Metric, "training.mutual_learning.aux_models": template.AuxModelSection,
            "snapshot": template.Snapshot}


def _schema_block() -> dict:
    text = README.read_text(encoding="utf-8").split("## The template.yaml schema", 1)[1]
    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])


def _schema_keys(cls: type, prefix: str = ""):
    """(dotted key, default or MISSING) for every leaf of the schema's dataclasses."""
    hints = typing.get_type_hints(cls, vars(template))
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]) and key not in EXAMPLES:
            yield from _schema_keys(hints[f.name], key + ".")
        elif f.default is not dataclasses.MISSING:
            yield key, f.default
        elif f.default_factory is not dataclasses.MISSING:
            yield key, f.default_factory()
        else:
            yield key, dataclasses.MISSING


def _leaves(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict) and value and prefix + key not in EXAMPLES:
            yield from _leaves(value, prefix + key + ".")
        else:
            yield prefix + key, value


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_readme_schema_block_lists_every_key_with_the_code_default():
    schema, readme = dict(_schema_keys(template.Template)), dict(_leaves(_schema_block()))
    assert sorted(set(schema) - set(readme)) == [], "keys of the schema missing from the README block"
    assert sorted(set(readme) - set(schema)) == [], "keys in the README block that the schema does not have"
    wrong = {key: (readme[key], default) for key, default in schema.items()
             if default is not dataclasses.MISSING and key not in EXAMPLES and _plain(readme[key]) != _plain(default)}
    assert wrong == {}, "README value vs the schema's default"
    for key, item in EXAMPLES.items():  # an example's keys are the item schema's
        fields = {f.name for f in dataclasses.fields(item)}
        examples = readme[key] if isinstance(readme[key], list) else [readme[key]]
        for example in examples:
            assert set(example) <= fields, (key, sorted(set(example) - fields))


def test_readme_auto_log_example_is_what_the_rules_print():
    text = README.read_text(encoding="utf-8")
    example = text.split("For example, mobilenet_v3_small on 72 training images at 32×32 for 5 epochs logs:", 1)[1]
    lines = [line for line in example.split("```", 2)[1].splitlines() if line.startswith("auto ")]
    assert len(lines) >= 5
    t = load_template(TEMPLATES_DIR / "mobilenet_v3_small" / "template.yaml",
                      {"input.size": [32, 32], "hyper_parameters.basic.epochs": 5})
    _, choices = auto.resolve(t, auto.run_facts(t, 72, 3, "cpu"))
    printed = [str(choice) for choice in choices]
    assert [line for line in lines if line not in printed] == []
