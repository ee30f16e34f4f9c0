"""`--methods` grammar of the ablation and QuantizedCache rows, and `--dtype`; no model needed.

- `subtok:KEY=VALUE[+KEY=VALUE...][@B]` overrides any `SubTokenConfig` field, parsed with the
  field's type from the dataclass (so fields added later work untouched), or names a preset.
- `quantized[:BACKEND[+OPTION=N...]][@BITS]` are transformers' `QuantizedCache` rows; a backend
  that cannot run here is skipped with a logged one-line reason.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import pytest

from hf_subtok import SubTokenConfig, cli
from hf_subtok.bench import parse_methods
from hf_subtok.bench import quantized_methods as qm
from hf_subtok.bench.overrides import format_overrides, parse_overrides
from hf_subtok.presets import PRESETS

ALL_WORK = {backend: None for backend in qm.BACKENDS}


def _names(text, budgets=(0.5,), problems=None):
    specs = parse_methods(text, list(budgets), have_kvpress=False, quant_problems=problems or ALL_WORK)
    return [s.name for s in specs]


# --- subtok overrides and presets ----------------------------------------------------------


def test_overrides_name_the_row_and_do_not_collide_with_plain_subtok():
    specs = parse_methods("subtok:axes=tokens@0.25,subtok@0.25", [0.5], have_kvpress=False)
    assert [s.name for s in specs] == ["subtok@0.25", "subtok[axes=tokens]@0.25"]
    assert specs[1].options == (("axes", "tokens"),) and specs[1].label == "subtok[axes=tokens]"
    assert not specs[1].is_plain_subtok and specs[0].is_plain_subtok


def test_several_overrides_are_typed_per_field():
    (spec,) = parse_methods(
        "subtok:axes=groups+token_scorer=key_norm+window=32+keep_groups=none@0.5", [0.75], have_kvpress=False
    )
    assert spec.name == "subtok[axes=groups+token_scorer=key_norm+window=32+keep_groups=none]@0.5"
    assert dict(spec.options) == {"axes": "groups", "token_scorer": "key_norm", "window": 32, "keep_groups": None}


def test_overrides_without_a_budget_expand_over_budgets():
    assert _names("subtok:axes=tokens", budgets=(0.5, 0.25)) == ["subtok[axes=tokens]@0.5", "subtok[axes=tokens]@0.25"]


def test_presets_run_at_their_budget_unless_one_is_given():
    balanced = PRESETS["balanced"]["budget"]
    assert _names("subtok:balanced") == [f"subtok[balanced]@{balanced:g}"]
    (spec,) = parse_methods("subtok:balanced+axes=tokens@0.25", [0.5], have_kvpress=False)
    assert spec.name == "subtok[balanced+axes=tokens]@0.25"
    assert dict(spec.options) == {**{k: v for k, v in PRESETS["balanced"].items() if k != "budget"}, "axes": "tokens"}
    (lossless,) = parse_methods("subtok:lossless", [0.5], have_kvpress=False)
    assert lossless.budget is None and lossless.name == "subtok[lossless]"


@pytest.mark.parametrize(
    "text, match",
    [
        ("subtok:nope=1", "subtok field must be one of .*got 'nope'"),
        ("subtok:window=x", "subtok field window must be int, got 'x'"),
        ("subtok:axes=sideways", "axes must be one of .*got 'sideways'"),
        ("subtok:num_groups=0@0.5", r"method .*: num_groups must be in 1..256, got 0"),
        ("subtok:budget=0.5", "budget is set with @B"),
        ("subtok:window=8+window=16", "window is set twice"),
        ("subtok:fancy", "subtok preset must be one of .*got 'fancy'"),
        ("subtok:axes=tokens@2", r"budget must be in \(0, 1\], got 2"),
    ],
)
def test_bad_overrides_raise_value_error_naming_field_and_value(text, match):
    with pytest.raises(ValueError, match=match):
        parse_methods(text, [0.5], have_kvpress=False)


def test_every_subtok_config_field_parses_from_its_own_default():
    """No hard-coded field list: each field's default, written out, parses back to itself."""
    defaults = SubTokenConfig()
    for f in dataclasses.fields(SubTokenConfig):
        if f.name == "budget":
            continue
        value = getattr(defaults, f.name)
        text = format_overrides([(f.name, value)])
        assert parse_overrides(text, SubTokenConfig, what="subtok field") == ((f.name, value),), text


@dataclasses.dataclass
class _Later:
    """Stands for fields the lead adds to `SubTokenConfig` later."""

    bits: int | None = None
    layer_budgets: tuple[float, ...] = ()
    uniform: bool = False
    mode: Literal["a", "b"] = "a"
    layers: list = dataclasses.field(default_factory=list)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("bits=4", {"bits": 4}),
        ("bits=none", {"bits": None}),
        ("layer_budgets=[0.5,0.25]+uniform=true", {"layer_budgets": (0.5, 0.25), "uniform": True}),
        ("layer_budgets=0.5/0.25", {"layer_budgets": (0.5, 0.25)}),
        ("mode=b", {"mode": "b"}),
        ("layers=[{'layers':'0-3','budget':0.5}]", {"layers": [{"layers": "0-3", "budget": 0.5}]}),
    ],
)
def test_overrides_parse_any_dataclass_by_field_type(text, expected):
    assert dict(parse_overrides(text, _Later, what="field")) == expected


@pytest.mark.parametrize(
    "text, match",
    [("bits=four", "field bits must be int or none, got 'four'"), ("uniform=maybe", "uniform must be true or false"),
     ("mode=c", "mode must be one of a, b, got 'c'"), ("bits", "must be key=value, got 'bits'")],
)
def test_bad_typed_values_name_the_field(text, match):
    with pytest.raises(ValueError, match=match):
        parse_overrides(text, _Later, what="field")


def test_commas_inside_brackets_stay_in_one_method():
    specs = parse_methods("dense,subtok:overrides=[{'layers':'0-1','budget':0.5}]@0.375", [0.5], have_kvpress=False)
    assert [s.family for s in specs] == ["dense", "subtok"]
    assert dict(specs[1].options)["overrides"] == [{"layers": "0-1", "budget": 0.5}]


# --- quantized ------------------------------------------------------------------------------


def test_bare_quantized_is_every_backend_at_4_and_2_bits():
    assert _names("dense,quantized") == [
        "dense", "quantized[quanto]@4bit", "quantized[hqq]@4bit", "quantized[quanto]@2bit", "quantized[hqq]@2bit",
    ]


def test_named_backend_bits_and_options():
    assert _names("quantized:hqq@2,quantized@4") == ["quantized[quanto]@4bit", "quantized[hqq]@4bit", "quantized[hqq]@2bit"]
    (spec,) = parse_methods("quantized:quanto+residual_length=32+q_group_size=16@4", [0.5], quant_problems=ALL_WORK)
    assert spec.name == "quantized[quanto+residual_length=32+q_group_size=16]@4bit"
    assert (spec.backend, spec.bits, dict(spec.options)) == ("quanto", 4, {"residual_length": 32, "q_group_size": 16})


@pytest.mark.parametrize(
    "text, match",
    [
        ("quantized:gptq", "quantized backend must be one of quanto, hqq, got 'gptq'"),
        ("quantized:quanto@3", r"bits for quanto must be one of \(2, 4\), got 3"),
        ("quantized:quanto@four", "quantized bits must be int, got 'four'"),
        ("quantized:hqq+group=4", "quantized option must be one of .*got 'group'"),
        ("quantized:hqq+residual_length=x", "quantized option residual_length must be int, got 'x'"),
        ("quantized:hqq+residual_length=0", "residual_length must be >= 1, got 0"),
    ],
)
def test_bad_quantized_items_raise_value_error(text, match):
    with pytest.raises(ValueError, match=match):
        parse_methods(text, [0.5], quant_problems=ALL_WORK)


def test_a_backend_that_cannot_run_is_skipped_with_a_logged_reason(caplog):
    reason = "hqq cannot be imported (ModuleNotFoundError: No module named 'hqq')"
    with caplog.at_level(logging.WARNING, logger="hf_subtok.bench.methods"):
        names = _names("dense,quantized", problems={"quanto": None, "hqq": reason})
    assert names == ["dense", "quantized[quanto]@4bit", "quantized[quanto]@2bit"]
    assert [r.getMessage() for r in caplog.records] == [f"skipping quantized[hqq]: {reason}"]
    with pytest.raises(ValueError, match="at least one runnable method"):
        parse_methods("quantized:hqq", [0.5], quant_problems={"hqq": reason})


def test_backend_problem_is_one_line_when_the_import_fails(monkeypatch):
    def broken(name):
        raise ImportError(f"No module named {name!r}\nsecond line")

    monkeypatch.setattr(qm.importlib, "import_module", broken)
    reason = qm.backend_problem("hqq")
    assert reason == "hqq cannot be imported (ImportError: No module named 'hqq')"


def test_backend_problem_is_one_line_when_quantizing_fails(monkeypatch):
    monkeypatch.setattr(qm.importlib, "import_module", lambda name: None)

    class Failing:
        def __init__(self, **kwargs):
            raise RuntimeError("no kernel for this CPU\nat line 3")

    monkeypatch.setattr(qm, "_layer_class", lambda backend: Failing)
    assert qm.backend_problem("quanto") == "quanto fails on this machine (RuntimeError: no kernel for this CPU at line 3)"


@pytest.mark.parametrize("backend", list(qm.BACKENDS))
def test_installed_backends_run_here(backend):
    pytest.importorskip(qm.BACKENDS[backend].module)
    assert qm.backend_problem(backend) is None
    assert qm.backend_problem(backend, bits=2) is None


# --- --dtype --------------------------------------------------------------------------------


def test_dtype_reaches_the_bench_config():
    args = cli.build_parser().parse_args(["bench", "--methods", "dense", "--dtype", "bfloat16"])
    config = cli.bench_config_from_args(args)
    assert config.dtype == "bfloat16" and config.to_dict()["dtype"] == "bfloat16"
    assert cli.bench_config_from_args(cli.build_parser().parse_args(["bench", "--methods", "dense"])).dtype == "float32"


def test_bad_dtype_is_one_line_and_exit_2(capsys):
    assert cli.main(["bench", "--methods", "dense", "--dtype", "float64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dtype: invalid choice: 'float64'" in err


def test_bad_override_from_the_command_line_is_one_line(capsys):
    assert cli.main(["bench", "--methods", "subtok:axes=sideways@0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "axes must be one of" in err and "'sideways'" in err
