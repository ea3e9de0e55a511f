"""Training on two CPU devices (training/devices.py): the batch is split, and the phases train as on one (their
losses agree to rounding; Adam's normalised steps make single parameters differ by up to a fifth of a step).

JAX's device count is fixed when its backend starts, so the two-device runs happen in a child process; the
pytest process keeps its single device.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, dataclasses
from unittest import mock
import jax, numpy as np
jax.config.update("jax_num_cpu_devices", 2)
from dalle_space.config import VQGANConfig
from training import dallebart_stage, data, devices, vqgan_stage
from training.train import DALLEBART_CONFIG

def holders(array):
    return sorted(len(shard.data) for shard in array.addressable_shards)

report = {"split 8": holders(devices.BatchSplit(8).rows(np.zeros((8, 3)))[0]),
          "split 7": holders(devices.BatchSplit(7).rows(np.zeros((7, 3)))[0]),
          "replicated": len(devices.BatchSplit(8).replicated(np.zeros(3)).sharding.device_set)}

config = VQGANConfig(ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), resolution=32,
                     z_channels=32, embed_dim=8, n_embed=32)
pictures = data.make_scenes(seed=0, n=32, resolution=32).images
vq = vqgan_stage.VQGANTraining(steps=3, batch_size=8)
rng = np.random.default_rng(0)
n, length = 16, DALLEBART_CONFIG.max_text_length
pairs = dallebart_stage.Pairs(rng.integers(0, 1000, (n, length)).astype(np.int32), np.ones((n, length), np.int32),
                              rng.integers(0, 256, (n, DALLEBART_CONFIG.image_length)).astype(np.int32),
                              np.zeros((1, length), np.int32), np.ones((1, length), np.int32))
plain = dataclasses.replace(dallebart_stage.PLAIN, steps=3, batch_size=8)

def run():
    vq_losses, db_losses = [], []
    vqgan_stage.train(config, vq, pictures, 0, on_step=lambda i, loss, terms: vq_losses.append(loss))
    start = dallebart_stage.begin(DALLEBART_CONFIG, plain, 0)
    dallebart_stage.train(DALLEBART_CONFIG, plain, pairs, 0, start, on_step=lambda i, loss: db_losses.append(loss))
    return vq_losses, db_losses

split = run()
every = jax.devices
with mock.patch.object(jax, "devices", lambda *a: every(*a)[:1]):
    one = run()
report["vqgan losses"] = [split[0], one[0]]
report["dallebart losses"] = [split[1], one[1]]
print(json.dumps(report))
"""


def test_a_batch_split_over_two_devices_trains_as_on_one():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["split 8"] == [4, 4]  # each device holds half the rows
    assert report["split 7"] == [7]  # rows that do not split evenly stay on one device
    assert report["replicated"] == 2
    for stage in ("vqgan losses", "dallebart losses"):
        split, one = report[stage]
        assert len(split) == 3 and max(abs(a - b) for a, b in zip(split, one)) < 1e-4 * max(one), (stage, split, one)
