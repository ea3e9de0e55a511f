"""Data parallelism over local devices: four CPU devices must give the tokens of one."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys, numpy as np, jax
from dalle_space import bundled, checkpoints, text
from dalle_space.engine import Engine, ModelInfo, seed_keys
fixture = "tests/fixtures/dallebart-tiny"
config, params = checkpoints.load_dallebart(fixture)
tokenizer = text.load_tokenizer(bundled.build_dallebart(bundled.cache_dir()))
engine = Engine(config, params, tokenizer, None, None, None, ModelInfo("fixture", None, "float32", "cpu"))
expected = np.load(fixture + "/expected.npz")
tokens = engine.sample_tokens(expected["input_ids"][:2], expected["attention_mask"][:2], seed_keys(range(4)),
                              condition_scale=3.0, mode=sys.argv[2])
np.save(sys.argv[1], np.stack([tokens, np.full_like(tokens, jax.device_count())]))
"""


def _tokens(tmp_path, devices: int, mode: str) -> np.ndarray:
    out = tmp_path / f"tokens-{devices}-{mode}.npy"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", SCRIPT, str(out), mode], cwd=REPO, env=env, check=True, timeout=600)
    tokens, device_count = np.load(out)
    assert (device_count == devices).all()
    return tokens


def test_four_devices_give_the_tokens_of_one(tmp_path):
    one = _tokens(tmp_path, 1, "parallel")
    np.testing.assert_array_equal(_tokens(tmp_path, 4, "parallel"), one)
    np.testing.assert_array_equal(_tokens(tmp_path, 4, "serial"), one)
