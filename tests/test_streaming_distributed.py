"""`torchrun --nproc-per-node 2 -m scoremerge merge ...` on the CPU (gloo): the ranks split the
output shards and the result is byte for byte the single-process merge's."""
import os
import subprocess
import sys

import pytest
import torch

from scoremerge.cli import main
from scoremerge.io import save_state_dict

from test_streaming import finetuned, model


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed absent")
def test_two_gloo_ranks_write_the_single_process_merge(tmp_path):
    base = model(0, torch.bfloat16)
    paths = [str(save_state_dict(sd, tmp_path / f"m{i}", max_shard_size="8KB"))
             for i, sd in enumerate([base] + [finetuned(base, s) for s in (1, 2, 3)])]
    args = ["merge", "--base", paths[0], "--experts", *paths[1:], "--method", "score",
            "--max-shard-size", "10KB", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "scoremerge", *args,
                          "--out", str(tmp_path / "multi")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    single = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert len([n for n in single if n.endswith(".safetensors")]) > 2
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == single
    for name in single:
        assert (tmp_path / "multi" / name).read_bytes() == \
            (tmp_path / "single" / name).read_bytes(), name
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
