"""The ``dkdm`` command line: train, distill, sample, evaluate.

Settings come from built-in defaults, then a YAML file (``--config``), then flags (``settings.py``),
and the library does the rest (``runs.py``, ``tools.py``). A user mistake prints one line and exits
2; a diverged run exits 3; a run whose other process died exits 4; an interrupt checkpoints and
exits 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import DkdmError
from .flags import _did_you_mean, build_parser  # noqa: F401 (build_parser: the parser, for tests and docs)
from .peers import PeerLost

def _given(args) -> dict:
    """The settings given on the command line (argparse leaves the others None)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "config", "no_progress") and v is not None}


def _finished(result) -> None:
    """The last log record as JSON on stdout, then the report's table (main process only)."""
    if result is None or result["last"] is None:  # not the main process, or a dry run
        return
    last = result["last"]
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()}))
    if result["report"] is not None:
        from .evaluation import summary_table

        print(summary_table(result["report"]))


def cmd_train(args) -> None:
    from .runs import train

    _finished(train(args.config, not args.no_progress, **_given(args)))


def cmd_distill(args) -> None:
    from .runs import distill

    _finished(distill(args.config, not args.no_progress, **_given(args)))


def cmd_fewstep(args) -> None:
    from .runs import fewstep

    _finished(fewstep(args.config, not args.no_progress, **_given(args)))


def cmd_synth(args) -> None:
    from .tools import synth

    synth(args.out, args.teacher, args.num, args.steps, args.batch, args.seed or 0, args.teacher_config,
          not args.no_progress)


def cmd_convert(args) -> None:
    from .tools import convert

    convert(args.checkpoint, args.config, args.out, args.format)


def cmd_sample(args) -> None:
    from .tools import sample

    sample(args.model, args.out, args.num, args.steps, args.seed or 0, not args.no_progress)


def cmd_evaluate(args) -> None:
    from .tools import evaluate

    print(json.dumps(evaluate(args.model, args.reference, args.num, args.steps, args.seed or 0,
                              args.inception_weights, not args.no_progress)))


def cmd_push(args) -> None:
    from .tools import push

    print(push(args.directory, args.repo_id, args.private))


def cmd_report(args) -> None:
    from .tools import report

    for path in report(args.directory):
        print(path)


COMMANDS = {"push": cmd_push, "report": cmd_report, "train": cmd_train, "distill": cmd_distill, "fewstep": cmd_fewstep, "synth": cmd_synth, "convert": cmd_convert, "sample": cmd_sample, "evaluate": cmd_evaluate}


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _unrecognized(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> None:
    """argparse's error for arguments the subcommand does not take, naming the closest flags it has."""
    sub = _subparser(parser, command)
    names = [o[2:] for a in sub._actions for o in a.option_strings if o.startswith("--")]
    hints = [f"{token}: {_did_you_mean(token.split('=', 1)[0].lstrip('-'), names, '--') or 'no such flag'}"
             for token in unknown if token.startswith("-")]
    sub.error(f"unrecognized argument(s) {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            _unrecognized(parser, args.command, unknown)
    except SystemExit as e:  # argparse: a usage error (2), --help or --version (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        COMMANDS[args.command](args)
    except DkdmError as e:
        one_line = " | ".join(part.strip() for part in str(e).splitlines() if part.strip())
        print(f"dkdm {args.command}: error: {one_line}", file=sys.stderr, flush=True)
        if isinstance(e, PeerLost):
            # nothing is left to write, the teardown of the broken process group can block on the
            # dead peer, and the launcher's SIGTERM is on its way: leave now, with the exit code
            sys.stdout.flush()
            os._exit(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt as e:
        print(f"dkdm {args.command}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
