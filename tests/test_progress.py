"""Progress bars in a log file: whole lines with count, elapsed and ETA, no carriage returns."""

import io
import sys

from distill3r.progress import progress_bar


def test_bar_writes_lines_when_not_on_a_terminal(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress_bar(range(5), desc="cache", unit="sample", mininterval=0, miniters=1):
        pass
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) >= 2 and all(line.startswith("cache:") for line in lines)
    assert "5/5" in lines[-1] and "<00:00" in lines[-1]  # count, elapsed<remaining
    log.truncate(0)
    list(progress_bar(range(3), disable=True))
    assert log.getvalue() == ""
