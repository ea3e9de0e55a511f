"""Data parallelism over local devices: four CPU devices give the tokens of one, each device holds its
own image rows, and a batch that does not divide by the device count still runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "dallebart-tiny"

# Writes {batch name: {"tokens", "shards": [device id, first row, end row] per shard of the sampled tokens,
# "devices"}}: "even" is two prompts x two images; on several devices with the parallel sampler, "uneven"
# is one prompt x three images too.
SCRIPT = """
import json, sys, numpy as np, jax
from dalle_space import bundled, checkpoints, text
from dalle_space.engine import Engine, ModelInfo, seed_keys
fixture = "tests/fixtures/dallebart-tiny"
config, params = checkpoints.load_dallebart(fixture)
tokenizer = text.load_tokenizer(bundled.DALLEBART)
engine = Engine(config, params, tokenizer, None, None, None, ModelInfo("fixture", None, "float32", "cpu"))
expected = np.load(fixture + "/expected.npz")
sampled = []
run = engine._run
def recording(*args, **kwargs):
    out = run(*args, **kwargs)
    sampled.append(out[0])
    return out
engine._run = recording
mode = sys.argv[2]
batches = {"even": 2, "uneven": 1} if jax.device_count() > 1 and mode == "parallel" else {"even": 2}
report = {}
for name, n_prompts in batches.items():
    n_images = 4 if name == "even" else 3
    tokens = engine.sample_tokens(expected["input_ids"][:n_prompts], expected["attention_mask"][:n_prompts],
                                  seed_keys(range(n_images)), condition_scale=3.0, mode=mode)
    shards = sorted((s.device.id, s.index[0].start or 0, s.index[0].stop or n_images)
                    for s in sampled[-1].addressable_shards)
    report[name] = {"tokens": tokens.tolist(), "shards": shards, "devices": jax.device_count()}
json.dump(report, open(sys.argv[1], "w"))
"""


def _sample(tmp_path, devices: int, mode: str) -> dict:
    out = tmp_path / f"report-{devices}-{mode}.json"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", SCRIPT, str(out), mode], cwd=REPO, env=env, check=True, timeout=600)
    report = json.loads(out.read_text())
    assert {batch["devices"] for batch in report.values()} == {devices}
    return report


def test_four_devices_give_the_tokens_of_one_and_each_holds_its_rows(tmp_path):
    one = _sample(tmp_path, 1, "parallel")
    parallel = _sample(tmp_path, 4, "parallel")
    serial = _sample(tmp_path, 4, "serial")
    np.testing.assert_array_equal(parallel["even"]["tokens"], one["even"]["tokens"])
    np.testing.assert_array_equal(serial["even"]["tokens"], one["even"]["tokens"])
    for report in (parallel, serial):  # image i on device i, not every row on one device
        assert report["even"]["shards"] == [[0, 0, 1], [1, 1, 2], [2, 2, 3], [3, 3, 4]]

    # Three images on four devices: the rows are left whole, and the images are still upstream's.
    expected = np.load(FIXTURE / "expected.npz")
    uneven = np.asarray(parallel["uneven"]["tokens"])
    assert uneven.shape == (3, 256)
    for seed in (0, 1):
        np.testing.assert_array_equal(uneven[seed], expected[f"sample_k50_cs3_seed{seed}"][0, 1:])
