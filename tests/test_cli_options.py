"""`hf-subtok generate --preset ... --bits ...` and `train-router` without peft.

The cache `generate` builds is recorded by a `SubTokenCache` subclass; the model is a tiny
random Llama with the real tokenizer. What the configuration must be comes from the presets'
table and the options given (the options win), written out per case.
"""

from __future__ import annotations

import sys

import pytest

from hf_subtok import SubTokenConfig, cli, recipes
from hf_subtok.presets import PRESETS


@pytest.fixture
def used_configs(monkeypatch, tiny_chat_model, smollm_tokenizer):
    """Generation runs on the tiny model; returns the list of configs its caches were built with."""
    import hf_subtok
    import hf_subtok.model_loading as loading

    monkeypatch.setattr(
        loading,
        "load_model_and_tokenizer",
        lambda model=None, **kw: (tiny_chat_model, smollm_tokenizer),
    )
    class Configs(list):
        """The configs given, and in `in_force` the configs in force (recipe applied)."""

    configs = Configs()
    configs.in_force = []

    class Recording(hf_subtok.SubTokenCache):
        def __init__(self, model, config=None, *args, **kwargs):
            configs.append(config)
            super().__init__(model, config, *args, **kwargs)
            configs.in_force.append(self.config)

    monkeypatch.setattr(hf_subtok, "SubTokenCache", Recording)
    return configs


PROMPT = ["--prompt", "Tell me a story about a lighthouse. " * 12, "--max-new-tokens", "3"]


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--preset", "compact"], PRESETS["compact"]),
        (
            ["--preset", "compact", "--window", "8", "--no-rotate", "--bits", "4"],
            {**PRESETS["compact"], "window": 8, "rotate": False, "bits": 4},
        ),
        (["--preset", "balanced", "--bits", "none"], {**PRESETS["balanced"], "bits": None}),
        (
            ["--bits", "4", "--token-scorer", "key_norm", "--budget", "0.5", "--num-groups", "4"],
            {"bits": 4, "token_scorer": "key_norm", "budget": 0.5, "num_groups": 4},
        ),
        (
            ["--budget", "0.5", "--overrides", "[{'layers': '0-0', 'budget': 0.75}]"],
            {"budget": 0.5, "overrides": [{"layers": "0-0", "budget": 0.75}]},
        ),
    ],
    ids=["preset", "preset+fields", "bits-none", "fields-only", "overrides"],
)
def test_generate_builds_the_preset_with_the_given_fields(capsys, used_configs, options, expected):
    assert cli.main(["generate", *PROMPT, *options]) == 0, capsys.readouterr().err
    assert len(used_configs) == 1
    assert used_configs[0] == SubTokenConfig(**expected)
    assert "memory: stored" in capsys.readouterr().out


def test_a_preset_value_is_overridden_not_dropped(capsys, used_configs):
    assert cli.main(["generate", *PROMPT, "--preset", "aggressive", "--window", "32"]) == 0
    assert (used_configs[0].budget, used_configs[0].window) == (0.125, 32)
    # in force: the table's recipe at 0.125 for a float32 model, the window given
    row = recipes.recipe_for(0.125, "float32")
    in_force = used_configs.in_force[0]
    assert in_force.window == 32
    assert {k: getattr(in_force, k) for k in row.fields if k != "window"} == {
        k: v for k, v in row.fields.items() if k != "window"
    }
    assert f"recipe {row.candidate}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options, match",
    [
        (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
        (["--bits", "3"], "bits must be one of (2, 4, 8), 'auto' or None, got 3"),
        (["--window", "x"], "argument --window: window must be int, got 'x'"),
        (["--token-scorer", "magic"], "token_scorer must be one of"),
        (["--preset", "compact", "--keep-groups", "3"], "keep_groups must be in 1..2, got 3"),
    ],
)
def test_bad_configuration_options_are_one_line_errors(capsys, options, match):
    assert cli.main(["generate", "--prompt", "hi", *options]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


# --- train-router without peft ---


@pytest.fixture
def no_peft(monkeypatch):
    """`import peft` fails as it does where peft is not installed; no model may be loaded."""
    import hf_subtok.model_loading as loading

    monkeypatch.setitem(sys.modules, "peft", None)
    loads = []
    monkeypatch.setattr(
        loading,
        "load_model_and_tokenizer",
        lambda *a, **k: loads.append(a) or pytest.fail("model loaded"),
    )
    return loads


def test_train_router_without_peft_is_one_line_naming_the_extra(capsys, tmp_path, no_peft):
    status = cli.main(["train-router", "--out", str(tmp_path / "out"), "--steps", "2"])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "peft" in err and "pip install 'hf-subtok[train]'" in err
    assert no_peft == [] and not (tmp_path / "out").exists()


def test_console_script_without_peft_exits_2(tmp_path):
    import subprocess

    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from hf_subtok.cli import main\n"
        f"sys.exit(main(['train-router', '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'hf-subtok[train]'" in lines[0], proc.stderr


def test_a_router_without_lora_needs_no_peft(no_peft):
    from hf_subtok.training import TrainConfig
    from hf_subtok.training.command import missing_dependency

    assert missing_dependency(TrainConfig(lora_r=0)) is None
    assert "hf-subtok[train]" in missing_dependency(TrainConfig(lora_r=8))
