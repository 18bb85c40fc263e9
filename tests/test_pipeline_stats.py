"""`python -m clippy_jax.data.stats`: per-channel mean / std of the usable images, against numpy."""

import io
import json
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image

from clippy_jax.data import stats, writers
from tests.helpers import REPO


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_stats_equal_numpy_over_the_usable_images(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (int(rng.integers(8, 30)), 17, 3), dtype=np.uint8) for _ in range(9)]
    images[0][..., 2] //= 4  # unequal channels
    for shard in range(3):
        members = []
        for i in range(shard * 3, shard * 3 + 3):
            members += writers.webdataset_members(f"{i:04d}", _png(images[i]), f"caption {i}", "png")
        members += writers.webdataset_members(f"bad{shard}", b"\xff\xd8 truncated", "caption", "jpg")
        members += writers.webdataset_members(f"empty{shard}", _png(np.zeros((4, 4, 3), np.uint8)), "", "png")
        writers.write_tar(str(tmp_path / f"s-{shard}.tar"), members)
    pattern = str(tmp_path / "s-*.tar")
    config = ml_collections.ConfigDict(dict(source="webdataset", train_pattern=pattern, image_key="png,jpg",
                                            text_key="txt", interleave=2))
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]) / 255.0
    result = stats.compute(config, num_examples=100)
    assert result["examples"] == 9 and result["pixels_per_channel"] == len(pixels)
    np.testing.assert_allclose(result["mean"], pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(result["std"], pixels.std(0), rtol=1e-9)

    output = str(tmp_path / "stats.json")
    completed = subprocess.run(
        [sys.executable, "-m", "clippy_jax.data.stats", f"--pattern={pattern}", "--source=webdataset",
         "--image_key=png,jpg", "--num_examples=4", f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
    )
    assert "4 examples: mean=(" in completed.stdout
    with open(output) as f:
        assert json.load(f)["examples"] == 4
