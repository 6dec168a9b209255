"""How the driver shows a long phase's progress: a line every run.progress_every_s in logs, a bar on a terminal."""

import io

from transfer.train_pass import ProgressBar, format_progress


def test_progress_says_images_done_rate_and_time_left():
    event = {"pass": "finetune", "what": "epoch 2/10", "done": 12_800, "total": 50_000, "seconds": 31.2}
    assert format_progress(event) == "finetune: epoch 2/10: 12,800/50,000 images, 410 images/s, 1:30 left"


def test_a_bar_rewrites_its_line_until_the_next_line_replaces_it():
    out = io.StringIO()
    bar = ProgressBar(out)
    bar.show("head: epoch 1/3: 100/900 images")
    bar.show("head: epoch 1/3: 400/900 images")
    bar.echo("head epoch 1/3: loss 0.5")
    bar.echo("head epoch 2/3: loss 0.4")
    clear = "\r\x1b[2K"
    assert out.getvalue() == (
        f"{clear}head: epoch 1/3: 100/900 images{clear}head: epoch 1/3: 400/900 images"
        f"{clear}head epoch 1/3: loss 0.5\nhead epoch 2/3: loss 0.4\n"
    )
