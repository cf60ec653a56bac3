"""`vscsi vm`: user mistakes end in one line and a non-zero exit, before any boot."""

from __future__ import annotations

import pytest

from vscsi.cli import main


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--socket", "/nonexistent/vscsi.sock", "--command", "true"], "does not exist"),
        (["--script", "/nonexistent/script.sh"], "script /nonexistent/script.sh"),
        (["--disk", "/nonexistent/d.img", "--command", "true"], "disk file"),
        (["--vcpus", "0", "--command", "true"], "at least 1"),
        (["--timeout", "0", "--command", "true"], "positive"),
    ],
)
def test_bad_input_is_one_line(argv: list[str], needle: str, capsys) -> None:
    rc = main(["vm", "run", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err


def test_script_or_command_required(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["vm", "run"])
    assert info.value.code == 2


@pytest.mark.guest
def test_build_prints_the_image(guest_image, capsys) -> None:
    assert main(["vm", "build"]) == 0
    out = capsys.readouterr().out
    assert str(guest_image.kernel) in out and guest_image.kernel_version in out
