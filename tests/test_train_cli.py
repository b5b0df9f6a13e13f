"""python -m salad_core.train's argument parsing: boolean TrainConfig fields are plain flags
(``--fsdp`` / ``--no-fsdp``), as the README documents (``torchrun ... train ... --fsdp``)."""

from __future__ import annotations

import pytest


@pytest.fixture
def parsed_config(monkeypatch):
    """Run main(argv) up to train(); returns a function argv -> the TrainConfig it built."""
    import salad_core.train.__main__ as cli
    import salad_core.train.trainer as trainer

    seen = {}

    def fake_train(cfg, resume=True, progress=None):
        seen["cfg"], seen["resume"] = cfg, resume
        return "unused.safetensors"

    monkeypatch.setattr(cli, "_setup_comfy", lambda: None)
    monkeypatch.setattr(trainer, "train", fake_train)

    def run(*extra):
        seen.clear()
        assert cli.main(["train", "--model", "m.safetensors", "--data", "d", "--out", "o", *extra]) == 0
        return seen["cfg"]

    return run


def test_fsdp_is_a_bare_flag(parsed_config):
    assert parsed_config().fsdp is False
    assert parsed_config("--fsdp").fsdp is True
    assert parsed_config("--fsdp", "--steps", "3").steps == 3  # takes no value from the next option
    assert parsed_config("--no-fsdp").fsdp is False


def test_every_boolean_field_has_flag_and_negation(parsed_config):
    cfg = parsed_config()
    assert cfg.linear_branch is True and cfg.checkpointing is True
    cfg = parsed_config("--no-linear-branch", "--no-checkpointing", "--fsdp")
    assert (cfg.linear_branch, cfg.checkpointing, cfg.fsdp) == (False, False, True)
    cfg = parsed_config("--linear-branch", "--checkpointing")
    assert cfg.linear_branch is True and cfg.checkpointing is True


def test_bare_flag_rejects_a_value(parsed_config, capsys):
    with pytest.raises(SystemExit):
        parsed_config("--fsdp", "true")  # the old `--fsdp true` form: 'true' is not an option
    assert "unrecognized arguments: true" in capsys.readouterr().err
