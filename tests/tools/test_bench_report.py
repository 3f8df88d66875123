"""The machine description every benchmark's raw results start with."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

_PRINT_HEADER = (
    "import json, sys; sys.path.insert(0, 'tools'); import bench_report; "
    "print(json.dumps(bench_report.run_header(seed=3)))")


def _header(onednn):
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn)
    result = subprocess.run([sys.executable, "-c", _PRINT_HEADER],
                            cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_header_tells_which_kernels_ran():
    # Two machines with one CPU name can differ in oneDNN (2-3x in speed,
    # other round-off): the header says which ran.
    on, off = _header("1"), _header("0")
    assert on["onednn"] is True and off["onednn"] is False
    assert on["cpu"] == off["cpu"] and on["cpu_flags"] == off["cpu_flags"]
    assert on["seed"] == 3 and on["cores"] >= 1
