"""`benchmarks/decode_speed.py --configs`: configurations given as `SubTokenConfig` fields."""

from __future__ import annotations

import pytest

from hf_subtok import SubTokenConfig
from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("decode_speed")


def test_configs_are_parsed_into_named_subtoken_configs(script):
    text = "axes=groups+num_groups=1+keep_groups=1+bits=2+value_codes=16+window=4+budget=0.07"
    configs = script.configured([text])
    assert list(configs) == [f"subtok {text}"]
    assert configs[f"subtok {text}"] == SubTokenConfig(
        axes="groups", num_groups=1, keep_groups=1, bits=2, value_codes=16, window=4, budget=0.07
    )


@pytest.mark.parametrize("text, message", [("value_codez=16", "--configs field must be one of"), ("window=x", "window")])
def test_bad_configs_name_the_field(script, text, message):
    with pytest.raises(ValueError, match=message):
        script.configured([text])
