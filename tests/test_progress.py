"""The progress reporter: stdout lines with rate and ETA, a live HTML bar in a notebook."""

from __future__ import annotations

import pytest
import torch

from nbcompress import progress as progress_module
from nbcompress.progress import Progress, clock, plural
from nbcompress.zoo import SeedCNN, train


class Clock:
    """A virtual clock: each reading returns ``now`` (advanced by hand)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_say_done_rate_elapsed_eta_and_end_with_the_total_time():
    lines, t = [], Clock()
    bar = Progress(4, "train", "epoch", notebook=False, write=lines.append, timer=t, every=5)
    for second in (1, 2, 6, 8):
        t.now = second
        bar.update(note=f"loss {1 / second:.2f}")
    bar.close()
    assert lines == [
        "train: 0/4 epochs, 0.0 s elapsed, ETA —",
        "train: 3/4 epochs, 2 s/epoch, 6.0 s elapsed, ETA 2.0 s — loss 0.17",
        "train: 4 epochs in 8.0 s (done) — loss 0.12",
    ]


def test_a_short_step_under_the_delay_shows_nothing_a_long_one_shows_its_end():
    lines, t = [], Clock()
    with Progress(3, "x", notebook=False, write=lines.append, timer=t, delay=2) as bar:
        t.now = 1
        bar.update(3)
    assert lines == []
    bar = Progress(3, "x", notebook=False, write=lines.append, timer=t, delay=2)
    t.now = 4
    bar.update()
    bar.close()
    assert (
        lines[0].startswith("x: 1/3 steps")
        and lines[-1] == "x: 1 of 3 steps in 3.0 s (stopped early)"
    )


def test_in_a_notebook_one_display_is_updated_in_place(monkeypatch):
    shown = []

    class Handle:
        def update(self, body):
            shown.append(("update", body.data))

    def display(body, display_id):
        assert display_id is True
        shown.append(("display", body.data))
        return Handle()

    import IPython.display

    monkeypatch.setattr(IPython.display, "display", display)
    t = Clock()
    with Progress(10, "speedup", "layer", notebook=True, timer=t) as bar:
        for k in range(10):
            t.now = 0.1 * (k + 1)  # 10 updates in 1 s: throttled to one redraw per 0.5 s
            bar.update(note="<b>conv</b>")
    kinds = [k for k, _ in shown]
    assert kinds[0] == "display" and set(kinds[1:]) == {"update"} and len(kinds) <= 5
    first, last = shown[0][1], shown[-1][1]
    assert "<progress value='0' max='10'" in first
    assert "<progress value='10' max='10'" in last and "10 layers in 1.0 s (done)" in last
    assert "&lt;b&gt;conv&lt;/b&gt;" in last  # the note is text, never markup


def test_units_and_durations_read():
    assert [plural(u) for u in ("epoch", "batch", "pass")] == ["epochs", "batches", "passes"]
    assert [clock(s) for s in (0.44, 12.4, 125)] == ["0.4 s", "12 s", "2 min 05 s"]
    assert not progress_module.in_notebook()  # tests run without a kernel


def test_train_reports_on_stdout_never_on_stderr(capsys):
    torch.manual_seed(0)
    x, y = torch.rand(40, 1, 28, 28), torch.randint(0, 10, (40,))
    train(SeedCNN(), x, y, epochs=2, batch_size=16, progress=True)
    out = capsys.readouterr()
    assert out.err == ""
    last = out.out.strip().splitlines()[-1]
    assert last.startswith("train: 6 batches in ") and "(done)" in last
    assert "epoch 2/2, loss " in last
    train(SeedCNN(), x, y, epochs=1, batch_size=16)  # default: silent when under 2 s
    assert capsys.readouterr().out == ""
    seen = []
    train(SeedCNN(), x, y, epochs=2, batch_size=16, progress=lambda e, loss: seen.append(e))
    assert seen == [1, 2] and capsys.readouterr().out == ""


@pytest.mark.parametrize("enabled", [False])
def test_disabled_shows_nothing(enabled, capsys):
    with Progress(2, "x", enabled=enabled) as bar:
        bar.update(2)
    assert capsys.readouterr().out == ""
