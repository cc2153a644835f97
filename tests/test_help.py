"""Every command answers --help with its own usage."""

import pytest

from exchanged.cli import build_parser, main

COMMANDS = [
    ["token", "list"], ["token", "keygen"], ["token", "import-cert"], ["csr"], ["ca", "init"],
    ["ca", "request", "submit"], ["ca", "request", "list"], ["ca", "request", "show"],
    ["ca", "request", "approve"], ["ca", "request", "reject"], ["ca", "issue"],
    ["ca", "reissue"], ["ca", "hold"], ["ca", "release"], ["ca", "revoke"], ["ca", "crl"],
    ["ca", "list"], ["ca", "show"], ["cert", "verify"], ["role", "list"], ["role", "grant"],
    ["role", "review"], ["role", "revoke"], ["role", "suspend"], ["role", "resume"],
    ["audit", "show"], ["audit", "verify"], ["audit", "export"], ["audit", "checkpoint"],
    ["audit", "witnessed"], ["serve"], ["send"], ["outbox"], ["inbox"], ["inbox", "show"],
    ["inbox", "sign-for"], ["inbox", "register"], ["inbox", "distribute"],
    ["inbox", "forward"], ["inbox", "return"], ["inbox", "paper-received"],
    ["inbox", "export"], ["due"], ["archive", "export"], ["status"], ["crl", "fetch"],
    ["crl", "install"], ["ca", "serve"], ["backup"], ["restore"], ["reload"], ["renew"],
    ["config", "check"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: exchanged " + " ".join(argv))


def test_no_command_reads_a_pin_from_argv() -> None:
    """No option takes a PIN value: only PIN files (and the environment, and prompts)."""
    seen = []

    def walk(p) -> None:  # type: ignore[no-untyped-def]
        for action in p._actions:
            for s in action.option_strings:
                seen.append(s)
                assert "pin" not in s or s.endswith("pin-file"), s
            if getattr(action, "choices", None) and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    assert "--operator-pin-file" in seen and "--ca-pin-file" in seen
