"""Progress that a log file can hold: a live bar only on a terminal, elsewhere a plain line a
minute (done, rate, ETA) and one at the end."""

import io
import re

from dkdm.cli import main
from dkdm.progress import LineProgress, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_live_bar_and_a_file_gets_lines():
    from tqdm.auto import tqdm

    bar = progress_bar(10, "train", stream=_Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    assert isinstance(progress_bar(10, "train", stream=io.StringIO()), LineProgress)


def test_lines_carry_the_rate_and_eta_and_come_only_every_interval():
    out = io.StringIO()
    bar = LineProgress(1000, "train", stream=out, every_s=0.0)  # a line at every update
    bar.set_postfix(loss="0.1234")
    for _ in range(3):
        bar.update(100)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert re.fullmatch(r"train: 300 / 1,000 steps \(30%\), [\d,]+ steps/s, ETA \d+ s, loss 0\.1234", lines[2]), lines
    assert lines[3].startswith("train: 300 steps in ") and "loss 0.1234" in lines[3]
    quiet = io.StringIO()
    bar = LineProgress(10 ** 6, "pool", unit_scale=True, stream=quiet, every_s=3600.0)
    for _ in range(10 ** 4):
        bar.update(100)
    bar.close()
    assert quiet.getvalue().count("\n") == 1 and "1.00M" in quiet.getvalue()  # the end line alone
    disabled = io.StringIO()
    with progress_bar(10, "x", disable=True, stream=disabled) as bar:
        bar.update(10)
    assert disabled.getvalue() == ""


def test_a_run_with_stderr_to_a_file_writes_a_few_plain_lines(tmp_path, capsys):
    """stderr captured is not a terminal: no carriage returns, no redrawn bars; a line per phase."""
    assert main(["distill", "--steps", "30", "--batch", "8", "--rho", "0.01", "--out", str(tmp_path / "d")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) <= 20, err
    assert any(re.match(r"train: 30 steps in \d+ s \([\d,]+ steps/s\)", line) for line in lines), err
