"""The grid's live line about a training cell, from the cell's progress file."""

import io
import json

from lrexp.live import LiveLine


class Terminal(io.StringIO):
    def isatty(self):
        return True


def write(path, step, seconds, loss=2.5):
    path.write_text(json.dumps({"step": step, "max_steps": 20, "start_step": 4, "seconds": seconds, "loss": loss,
                                "tokens_per_s": 1000.0}))


def test_a_terminal_gets_the_line_rewritten_in_place_then_cleared(tmp_path):
    path, out = tmp_path / "progress.json", Terminal()
    line = LiveLine(out, "[2/3]", path, later_cells=1, cell_seconds=60.0)
    line.update()
    assert out.getvalue() == ""  # nothing written yet
    write(path, 8, 2.0)  # 4 steps in 2 s: 12 steps left take 6 s, then one more cell of 60 s
    line.update()
    first = "[2/3] step 8/20, loss 2.500, 1,000 tok/s, ETA cell 6s, grid 1m06s"
    assert out.getvalue() == "\r" + first
    write(path, 12, 4.0, loss=None)
    line.update()
    second = "[2/3] step 12/20, 1,000 tok/s, ETA cell 4s, grid 1m04s"
    assert out.getvalue() == "\r" + first + "\r" + second.ljust(len(first))  # the longer line overwritten
    line.close()
    assert out.getvalue().endswith("\r" + " " * len(second) + "\r")


def test_a_log_gets_a_new_line_every_so_often(tmp_path):
    path, out = tmp_path / "progress.json", io.StringIO()
    line = LiveLine(out, "[1/1]", path, later_cells=0, cell_seconds=None, every_s=3600)
    write(path, 8, 2.0)
    line.update()
    write(path, 12, 4.0)
    line.update()  # within the hour: not again
    assert out.getvalue() == "[1/1] step 8/20, loss 2.500, 1,000 tok/s, ETA cell 6s, grid 6s\n"
    line.every_s = 0
    line.update()
    assert out.getvalue().splitlines()[-1].startswith("[1/1] step 12/20")
    line.close()
    assert out.getvalue().endswith("\n")
