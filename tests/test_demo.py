"""The README's first command works, spawned and under torchrun."""

import os
import shutil
import subprocess
import sys

import pytest


def _run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)


@pytest.mark.timeout(450)
def test_demo_spawns_two_ranks_and_matches_one_device():
    out = _run([sys.executable, "-m", "fxhalo.demo", "--compiler", "aot_eager", "--size", "32", "--steps", "1"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "over 2 ranks" in out.stdout and "matches one device" in out.stdout


@pytest.mark.timeout(450)
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_demo_runs_under_torchrun():
    out = _run(["torchrun", "--nproc-per-node", "3", "-m", "fxhalo.demo", "--compiler", "aot_eager",
                "--size", "24", "--steps", "1"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "over 3 ranks" in out.stdout and "matches one device" in out.stdout
