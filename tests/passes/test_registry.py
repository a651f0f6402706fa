"""The pass registry: names, defaults and options given as text (what the CLI's --pass-option sends)."""

import pytest

from graphopt import UnknownPassError, UsageError
from graphopt import passes as registry
from graphopt.passes.atconv import ATConvOptions
from graphopt.passes.linear_attention import LinearAttentionOptions


def test_options_are_listed_with_their_types_and_defaults():
    assert ("heads", "int or none", None) in registry.options_of("linear-attention")
    assert ("hybrid", "bool", False) in registry.options_of("atconv")
    assert registry.options_of("dce") == []


def test_configure_parses_text_by_the_option_type(monkeypatch):
    built = []
    cls, factory = registry.CONFIGURABLE["linear-attention"]
    monkeypatch.setattr(registry, "CONFIGURABLE", {
        "linear-attention": (cls, lambda options: built.append(options) or factory(options)),
        "atconv": (ATConvOptions, lambda options: built.append(options) or registry.atconv_pass(options))})
    lit = registry.configure("linear-attention", {"heads": "2", "cross": "yes", "inherit_out_proj": "false"})
    assert lit.name == "linear-attention" and not lit.exact
    assert built[-1] == LinearAttentionOptions(heads=2, cross=True, inherit_out_proj=False)
    registry.configure("linear-attention", {"heads": "none"})
    assert built[-1] == LinearAttentionOptions(heads=None)
    registry.configure("atconv", {"hybrid": "1", "drop_pos_embed": "TRUE"})
    assert built[-1] == ATConvOptions(hybrid=True, drop_pos_embed=True)


@pytest.mark.parametrize("name, settings, message", [
    ("linear-attention", {"head": "2"}, "has no option 'head' (did you mean 'heads'?)"),
    ("linear-attention", {"heads": "two"}, "linear-attention.heads takes a number (int or none), got 'two'"),
    ("linear-attention", {"heads": "0"}, "at least 1 head"),
    ("linear-attention", {"kernel": "4"}, "must be odd"),
    ("atconv", {"hybrid": "maybe"}, "atconv.hybrid takes true or false"),
    ("dce", {"x": "1"}, "pass 'dce' takes no options"),
])
def test_bad_options_are_clear_usage_errors(name, settings, message):
    with pytest.raises(UsageError) as err:
        registry.configure(name, settings)
    assert message in str(err.value)


def test_an_unknown_pass_suggests_a_name():
    with pytest.raises(UnknownPassError, match="did you mean 'linear-attention'"):
        registry.configure("linear-atention", {})
