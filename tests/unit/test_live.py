"""The grid's live line about its training cells, from the cells' progress files."""

import io
import json

from lrexp.grid.live import LiveLine, Running, grid_left, status


class Terminal(io.StringIO):
    def isatty(self):
        return True


def write(path, step, seconds, loss=2.5, max_steps=20):
    path.write_text(json.dumps({"step": step, "max_steps": max_steps, "start_step": 4, "seconds": seconds,
                                "loss": loss, "tokens_per_s": 1000.0}))


def test_a_terminal_gets_the_line_rewritten_in_place_then_cleared(tmp_path):
    path, out = tmp_path / "progress.json", Terminal()
    cell = [Running("[2/3]", path, started=0.0)]
    line = LiveLine(out)
    line.show(status(cell, later_cells=1, cell_seconds=60.0, slots=1, now=2.0))
    assert out.getvalue() == ""  # nothing written yet
    write(path, 8, 2.0)  # 4 steps in 2 s: 12 steps left take 6 s, then one more cell of 60 s
    line.show(status(cell, later_cells=1, cell_seconds=60.0, slots=1, now=2.0))
    first = "[2/3] step 8/20, loss 2.500, 1,000 tok/s, ETA cell 6s, grid 1m06s"
    assert out.getvalue() == "\r" + first
    write(path, 12, 4.0, loss=None)
    line.show(status(cell, later_cells=1, cell_seconds=60.0, slots=1, now=4.0))
    second = "[2/3] step 12/20, 1,000 tok/s, ETA cell 4s, grid 1m04s"
    assert out.getvalue() == "\r" + first + "\r" + second.ljust(len(first))  # the longer line overwritten
    line.clear()
    assert out.getvalue().endswith("\r" + " " * len(second) + "\r")


def test_a_log_gets_a_new_line_every_so_often(tmp_path):
    path, out = tmp_path / "progress.json", io.StringIO()
    cell = [Running("[1/1]", path, started=0.0)]
    line = LiveLine(out, every_s=3600)
    write(path, 8, 2.0)
    line.show(status(cell, later_cells=0, cell_seconds=None, slots=1, now=2.0))
    write(path, 12, 4.0)
    line.show(status(cell, later_cells=0, cell_seconds=None, slots=1, now=4.0))  # within the hour: not again
    assert out.getvalue() == "[1/1] step 8/20, loss 2.500, 1,000 tok/s, ETA cell 6s, grid 6s\n"
    line.every_s = 0
    line.show(status(cell, later_cells=0, cell_seconds=None, slots=1, now=4.0))
    assert out.getvalue().splitlines()[-1].startswith("[1/1] step 12/20")
    line.clear()
    assert out.getvalue().endswith("\n")


def test_cells_training_at_once_share_one_line_and_the_grid_eta_counts_the_free_slots(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    cells = [Running("[1/5]", a, started=0.0), Running("[2/5]", b, started=0.0)]
    write(a, 8, 2.0)  # 6 s left
    assert status(cells, later_cells=3, cell_seconds=None, slots=2, now=2.0) == (
        "[1/5] step 8/20, loss 2.500, 1,000 tok/s, ETA 6s"  # only one cell timed: no grid ETA yet
    )
    write(b, 12, 8.0, max_steps=28)  # 8 steps in 8 s: 16 s left
    # the cells project to 8 + 6 = 14 s and 8 + 16 = 24 s: 19 s a cell; the 3 later cells start as a slot
    # frees: in 6 s (ending in 25 s), in 16 s (ending in 35 s), in 25 s (ending in 44 s)
    assert status(cells, later_cells=3, cell_seconds=None, slots=2, now=8.0) == (
        "[1/5] step 8/20, loss 2.500, 1,000 tok/s, ETA 6s | [2/5] step 12/28, loss 2.500, 1,000 tok/s, ETA 16s"
        " | ETA grid 44s"
    )


def test_the_grid_eta_schedules_later_cells_on_the_first_free_slot():
    assert grid_left([], later_cells=3, cell_seconds=10.0, slots=1) == 30.0
    assert grid_left([4.0], later_cells=3, cell_seconds=10.0, slots=2) == 20.0  # slots free at 4 and 0
    assert grid_left([4.0, 50.0], later_cells=1, cell_seconds=10.0, slots=2) == 50.0
    assert grid_left([], later_cells=0, cell_seconds=10.0, slots=4) == 0.0
