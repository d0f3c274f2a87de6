"""The README is a front door and the docs say what the code does: every flag they name exists,
every `dkdm` command in the README parses, every page it points to is there, and the command
line's choices are the package's own (choices.py), so they cannot drift apart."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from dkdm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _dkdm_flags() -> set[str]:
    flags = set()
    for sub in [build_parser(), *_subparsers(build_parser()).values()]:
        for action in sub._actions:
            flags.update(o for o in action.option_strings if o.startswith("--"))
    return flags


def _bench_flags() -> set[str]:
    """Flags of the scripts in bench/ and scripts/ (the docs name them with their commands)."""
    found = set()
    for path in [*ROOT.glob("bench/**/*.py"), *ROOT.glob("scripts/*.py")]:
        found.update(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", path.read_text()))
    return found


#: Flags of other tools the docs show in their commands (pip, pytest, accelerate, torchrun, tensorboard).
OTHER_TOOLS = {"--logdir", "--multi_gpu", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
               "--main_process_port", "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port",
               "--durations", "--private", "--index-url", "--extra-index-url", "--no-deps", "--upgrade"}


def test_the_readme_is_a_front_door_of_at_most_200_lines_pointing_at_pages_that_exist():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for page in re.findall(r"docs/[a-z0-9_-]+\.md", text):
        assert (ROOT / page).is_file(), f"README names {page}, which does not exist"
    assert not re.search(r"\bissue \d+", text), "the README cites internal issue numbers"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.name)
def test_every_flag_the_docs_name_exists(path):
    known = _dkdm_flags() | _bench_flags() | OTHER_TOOLS
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])", path.read_text())) - {"--stpes"}  # a misspelling shown
    assert not named - known, f"{path.name} names flags no command has: {sorted(named - known)}"


def _readme_commands() -> list[list[str]]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["dkdm"]:
                commands.append(words[1:])
    return commands


def test_every_dkdm_command_in_the_readme_parses():
    commands = _readme_commands()
    assert len(commands) >= 6
    parser = build_parser()
    for words in commands:
        if words:  # a bare `dkdm distill` parses too; `dkdm` alone would print the usage
            parser.parse_args(words)


def test_every_python_block_in_the_readme_compiles():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        compile(block, "README.md", "exec")


def test_the_command_lines_choices_are_the_packages_own():
    from dkdm import choices, pool, preparation, train_config
    from dkdm.diffusion import VARIANCES

    subs = _subparsers(build_parser())

    def choices_of(command, flag):
        return tuple(next(a for a in subs[command]._actions if flag in a.option_strings).choices)

    assert choices_of("distill", "--pool") == choices.POOL_KINDS and set(pool.KINDS) == set(choices.POOL_KINDS)
    assert choices_of("distill", "--prep") == choices.PREPARATIONS == preparation.PREPARATIONS
    assert choices_of("distill", "--variance") == choices.VARIANCES == VARIANCES
    assert choices_of("train", "--lr-decay") == choices.LR_DECAYS == train_config.LR_DECAYS
    assert choices_of("distill", "--pool-dtype") == choices.DTYPES == tuple(pool.DTYPES)


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: p.name)
def test_the_choices_the_docs_list_for_a_flag_are_its_choices(path):
    """`--flag {a,b,c}` in the docs names exactly the choices the command line takes."""
    choices = {}
    for sub in _subparsers(build_parser()).values():
        for action in sub._actions:
            if action.choices:
                choices.update({o: set(action.choices) for o in action.option_strings})
    text = " ".join(path.read_text().split())
    for flag, listed in re.findall(r"`(--[a-z-]+) \{([^}]+)\}`", text):
        assert set(listed.split(",")) == choices[flag], f"{path.name}: {flag} lists {{{listed}}}, the CLI takes {choices[flag]}"
