"""Converting streams: peak memory stays near one input shard plus one output shard, not the model's size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Runs the real command line in a fresh process and reports its peak RSS (VmHWM) beside its RSS before
# converting. Not ru_maxrss: Linux carries that over from the forking pytest process across exec.
MEASURE = """
import sys
import qwen_mlx.convert.cli as cli

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

baseline = status("VmRSS")
code = cli.main(sys.argv[1:])
print(f"MEASURED {baseline} {status('VmHWM')} {code}")
"""
OUTPUT_SHARD = 16 << 20
# Allocator slack and the few tensors in flight beside the shard being written.
SLACK = 40 << 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize("bits", [4, None])
def test_peak_memory_is_one_input_shard_plus_one_output_shard(bits, checkpoint, tmp_path: Path) -> None:
    source = checkpoint("dense_deep")
    model_bytes = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    largest_input = max(f.stat().st_size for f in source.glob("*.safetensors"))
    assert len(list(source.glob("*.safetensors"))) >= 6 and model_bytes > 6 * largest_input

    out = tmp_path / "out"
    args = [str(source), "-o", str(out), "--no-eval", "--quiet", "--max-shard-size", "16MiB"]
    args += ["--q-bits", str(bits)] if bits else []
    result = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("MEASURED"))
    baseline, peak, code = map(int, line.split()[1:])
    assert code == 0
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 100

    used = peak - baseline
    bound = largest_input + OUTPUT_SHARD + SLACK
    mib = 1 << 20
    assert used <= bound, (
        f"converting a {model_bytes / mib:.0f} MiB checkpoint used {used / mib:.0f} MiB at peak; "
        f"expected at most {bound / mib:.0f} MiB (largest input shard {largest_input / mib:.0f} MiB + "
        f"output shard {OUTPUT_SHARD / mib:.0f} MiB + slack)"
    )
