"""The command line (cli.py): a user's mistake is one line on stderr and exit status 2."""

import pytest

from bigbatch.cli import main as cli_main


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["train", "--set", "train.batchsize=3"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("bigbatch: error: unknown config key 'train.batchsize'")
        and "Traceback" not in err
    )
    assert (
        cli_main(
            [
                "train",
                "--set",
                f"data.path={tmp_path / 'missing.zip'}",
                "--set",
                "data.format=image-folder",
            ]
        )
        == 2
    )
    assert "missing.zip" in capsys.readouterr().err


def test_resume_and_overwrite_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--resume", "--overwrite"])
    assert exit_info.value.code == 2
    assert "--overwrite: not allowed with argument --resume" in capsys.readouterr().err
