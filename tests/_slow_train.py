"""Run a training script as `python <script>` would, each optimiser step made at least SECONDS long, so that a test
can signal or kill it mid-epoch:  python tests/_slow_train.py train_clip.py 0.3 --data ... --out ..."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402

script, seconds = sys.argv.pop(1), float(sys.argv.pop(1))
sys.argv[0] = script  # what run_main and the resume line name
module = __import__(script.removesuffix(".py"))
step_name = "optimizer_step" if hasattr(module, "optimizer_step") else "hinge_step"
real_step = getattr(module, step_name)


def slow_step(*args, **kwargs):
    time.sleep(seconds)  # a signal arriving here runs its handler; the sleep then finishes (PEP 475)
    return real_step(*args, **kwargs)


setattr(module, step_name, slow_step)
model.run_main(module.main)
