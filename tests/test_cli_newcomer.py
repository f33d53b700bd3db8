"""The command line a newcomer meets: examples in --help, loud import errors, one-line model-load errors."""
from __future__ import annotations

import importlib

import pytest

from sdserve import cli


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "examples" in out and "sdserve serve" in out and "sdserve batch" in out


def test_a_broken_project_module_fails_loudly(monkeypatch):
    real = importlib.import_module

    def broken(name, *a, **kw):
        if name == "batch_jobs.cli":
            raise ImportError("cannot import name 'run_batch' from 'batch_jobs.runner'", name="batch_jobs.runner")
        return real(name, *a, **kw)

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ImportError, match="run_batch"):
        cli.build_parser()


def test_generate_model_load_error_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli.main(["generate", "a fox", "-o", str(tmp_path / "x.png"), "--device", "cpu",
                   "--model-source", "someorg/not-cached-model"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: model ") and "someorg/not-cached-model" in err and "not in the local cache" in err
