"""The README's first command trains, spawned and under torchrun, and agrees with one device.

Small sizes and ``--compiler aot_eager`` keep each run to one short compile; the
full-size default is timed by hand (see the README).  The parity line compares
the sharded model with one trained on one device: a "DIFFERS" there points at
the gradients (``grad_sync``) or at a halo.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

PARITY = re.compile(
    r"parity with one device \(([\d+]+) rows\): max \|prediction diff\| (\S+), "
    r"max \|parameter diff\| (\S+) -> matches one device"
)


def _run(cmd, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))  # run from a scratch dir
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=cwd)


@pytest.mark.timeout(300)
def test_demo_spawns_two_ranks_trains_and_matches_one_device(tmp_path):
    png = tmp_path / "demo.png"
    out = _run(
        [
            sys.executable,
            "-m",
            "fxhalo.demo",
            "--compiler",
            "aot_eager",
            "--size",
            "16",
            "--steps",
            "3",
            "--png",
            str(png),
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "over 2 ranks" in out.stdout
    assert "3/3" in out.stdout  # the progress bar reached the end
    parity = PARITY.search(out.stdout)
    assert parity, out.stdout
    assert parity.group(1) == "8+8"
    if importlib.util.find_spec("matplotlib") is not None:
        assert f"wrote {png}" in out.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in out.stdout
        assert not png.exists()


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_demo_runs_under_torchrun(tmp_path):
    out = _run(
        [
            "torchrun",
            "--nproc-per-node",
            "3",
            "-m",
            "fxhalo.demo",
            "--compiler",
            "aot_eager",
            "--size",
            "12",
            "--steps",
            "2",
            "--no-png",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.count("over 3 ranks") == 1  # rank 0 alone reports
    parity = PARITY.search(out.stdout)
    assert parity and parity.group(1) == "4+4+4", out.stdout
    assert "wrote" not in out.stdout and "matplotlib" not in out.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(60)
def test_demo_refuses_a_size_that_gives_a_rank_odd_rows(tmp_path):
    out = _run([sys.executable, "-m", "fxhalo.demo", "--size", "30"], tmp_path)
    assert out.returncode == 2
    assert "try --size 32" in out.stderr
