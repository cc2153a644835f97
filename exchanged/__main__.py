"""`python -m exchanged`, and the `exchanged` command (pyproject's console script).

`exchanged serve`, the daemon, is started here without the rest of the command line: the
command line's own code (exchanged.cli) and the CA's (exchanged.ca, store.cadb), which it
imports, would otherwise stay in the daemon's memory for its whole life, about 0.8 MiB
resident. Anything but a plain `serve [--config FILE]` (help, a wrong or abbreviated option)
and every other command go to exchanged.cli, which says what is wrong the usual way."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    config = _serve_config(args[1:]) if args[:1] == ["serve"] else None
    if config is not None:
        from exchanged.errors import reported

        def serve() -> int:  # imported inside: a broken install is reported in one line too
            from exchanged.node.config import Config
            from exchanged.node.service import run
            return run(Config.load(config))

        return reported(serve)
    from exchanged.cli import main as cli_main
    return cli_main(args)


def _serve_config(args: list[str]) -> str | None:
    """The configuration file of `exchanged serve ARGS`; None unless ARGS are just that."""
    import argparse

    from exchanged.node.config import config_option
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False, allow_abbrev=False)
    config_option(parser)
    try:
        known, rest = parser.parse_known_args(args)
    except argparse.ArgumentError:
        return None
    return None if rest else str(known.config)


if __name__ == "__main__":
    sys.exit(main())
