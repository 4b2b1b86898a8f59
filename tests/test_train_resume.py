"""Kill -9 at arbitrary points, including mid-checkpoint, then resume: the losses equal the uninterrupted run's."""
import json
import os
import signal
import subprocess
import sys
import time

from engine_helpers import stage, stage_args
from mm_llama.train.engine import train_stage

RUNNER = "import sys, torch; torch.set_num_threads(1); from mm_llama.cli import main; sys.exit(main(sys.argv[1:]))"
# Fault injection: die (SIGKILL, no clean-up) while the checkpoint of step 6 is half written.
DIE_IN_SAVE = (
    "import os, signal, sys, torch; torch.set_num_threads(1)\n"
    "import mm_llama.train.checkpointing as c\n"
    "real = c.torch.save\n"
    "def save(obj, f, *a, **k):\n"
    "    real(obj, f, *a, **k)\n"
    "    if str(f).endswith('optimizer.pt') and 'step_00000006' in str(f): os.kill(os.getpid(), signal.SIGKILL)\n"
    "c.torch.save = save\n"
    "from mm_llama.cli import main; sys.exit(main(sys.argv[1:]))"
)
COMMON = ["train.steps=10", "run.checkpoint_every=2", "data.num_workers=2", "train.eval_batches=0"]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _launch(code, args, env):
    return subprocess.Popen([sys.executable, "-c", code, "train", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_anywhere_then_resume_reproduces_losses(demo_data, tmp_path):
    reference = train_stage(stage(demo_data, tmp_path / "reference", *COMMON))
    want = losses(reference)
    assert len(want) == 10

    run_dir = tmp_path / "killed"
    args = stage_args(demo_data, run_dir, *COMMON)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}

    # 1. killed between checkpoints, as soon as step 3 is logged
    proc = _launch(RUNNER, args, env)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert not (run_dir / "final").exists()

    # 2. killed in the middle of writing the step-6 checkpoint
    proc = _launch(DIE_IN_SAVE, args, env)
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    ckpts = run_dir / "checkpoints"
    assert any(p.name.startswith(".step_00000006.tmp") for p in ckpts.iterdir())  # the half-written one
    assert not (ckpts / "step_00000006").exists()

    # 3. resume to the end
    proc = _launch(RUNNER, args, env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert losses(run_dir) == want  # exactly, on CPU
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())
