"""Run the `dasam3` CLI and SIGKILL it at a chosen point (the fault suite's crash injector).

    python kill_hook.py POINT N -- dasam3 arguments...

POINT is one of
  step  — just before the optimizer step that follows global step N (N = 0: before any step);
  save  — inside the N-th checkpoint write: the trainer state is half written into the staging folder;
  link  — in the N-th checkpoint, after its folder is in place, before `last` is pointed at it.
The process dies with SIGKILL (no cleanup, no finally blocks), as on an OOM kill or a power cut.
"""

import os
import signal
import sys


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str, count: int) -> None:
    from dasam3.training import checkpoint, trainer

    calls = {"n": 0}
    if point == "step":
        original_step = trainer.Trainer._train_step

        def train_step(self, *args, **kwargs):
            if self.progress.global_step == count:
                die()
            return original_step(self, *args, **kwargs)

        trainer.Trainer._train_step = train_step
    elif point == "save":
        original_save = checkpoint.torch.save

        def save(obj, path, *args, **kwargs):
            calls["n"] += 1
            original_save(obj, path, *args, **kwargs)
            if calls["n"] == count:
                size = os.path.getsize(path)
                with open(path, "r+b") as handle:
                    handle.truncate(size // 2)
                die()

        checkpoint.torch.save = save
    elif point == "link":
        original_point = trainer.point

        def point_last(link, target):
            if link.name == "last":
                calls["n"] += 1
                if calls["n"] == count:
                    die()
            return original_point(link, target)

        trainer.point = point_last
    else:
        raise SystemExit(f"kill_hook: unknown point {point!r}")


if __name__ == "__main__":
    point, count, separator, *arguments = sys.argv[1:]
    assert separator == "--"
    install(point, int(count))
    from dasam3.cli import main

    sys.exit(main(arguments))
