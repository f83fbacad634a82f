"""What the user sees: a live line per branch on a terminal, plain lines elsewhere."""

import io

from hft_ray.run.progress import Board


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_each_branch_has_a_live_line_with_its_stage_step_loss_and_speed():
    out = Terminal()
    board = Board(out)
    assert board.live
    board.stage_started("hft", "hft stage 2/3 (caesar)", 300)
    board.steps_done("hft", "hft stage 2/3 (caesar)", 150, 300, 0.1234, 41.5)
    board.say("[hft-ray] fft after stage 1: upper=1.00")
    board.close()
    text = out.getvalue()
    for piece in ("hft stage 2/3 (caesar)", "150/300", "loss 0.1234", "41.5 steps/s", "fft after stage 1"):
        assert piece in text


def test_elsewhere_progress_comes_as_plain_lines():
    out = io.StringIO()
    board = Board(out)
    assert not board.live
    board.stage_started("hft", "hft stage 1/2 (upper)", 20)
    board.steps_done("hft", "hft stage 1/2 (upper)", 10, 20, 3.25, 30.0)
    board.close()
    assert out.getvalue() == "[hft-ray] hft stage 1/2 (upper): step 10/20 loss 3.2500 (30.0 steps/s)\n"
