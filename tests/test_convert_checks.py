"""`python -m clippy_jax.convert` checks before it writes: depth, every key and shape, files, --output."""

import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.numpy import save_file

from clippy_jax.convert.__main__ import cli
from tests.helpers import REPO


@pytest.fixture(scope="module")
def vit_ti_state() -> dict[str, np.ndarray]:
    """A full-depth ViT-Ti/16 (12 blocks), as timm builds it."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _run(tmp_path, state_or_path, *flags: str, kind: str = "timm_vit") -> tuple[int, str]:
    path = state_or_path
    if isinstance(state_or_path, dict):
        path = str(tmp_path / "weights.safetensors")
        save_file(state_or_path, path)
    result = subprocess.run([sys.executable, "-m", "clippy_jax.convert", f"--from={kind}", f"--input={path}",
                             f"--output={tmp_path / 'out'}", *flags], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=False)
    return result.returncode, result.stderr


def test_a_checkpoint_without_its_last_block_is_refused(tmp_path, vit_ti_state):
    truncated = {k: v for k, v in vit_ti_state.items() if not k.startswith("blocks.11.")}
    code, stderr = _run(tmp_path, truncated)
    assert code == 2
    assert "The image tower has 11 blocks but ViT-Ti has 12" in stderr and "--image-depth=11" in stderr
    assert "Traceback" not in stderr and not os.path.exists(tmp_path / "out")


def test_an_oversized_qkv_is_refused_naming_the_key_and_both_shapes(tmp_path, vit_ti_state, capsys):
    state = dict(vit_ti_state, **{"blocks.3.attn.qkv.weight": np.zeros((3 * 192 + 48, 192), np.float32)})
    path = str(tmp_path / "weights.safetensors")
    save_file(state, path)
    assert cli(["--from=timm_vit", f"--input={path}", f"--output={tmp_path / 'out'}"]) == 2
    stderr = capsys.readouterr().err
    assert "mis-shaped: blocks.3.attn.qkv.weight has shape (624, 192), the model expects (576, 192)" in stderr
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(("key", "shape", "message"), [
    ("blocks.0.attn.proj.weight", (192, 100), "mis-shaped: blocks.0.attn.proj.weight has shape (192, 100)"),
    ("cls_token", (1, 1, 100), "cls_token has shape (1, 1, 100); a ViT of width 192 needs (1, 1, 192)"),
    ("pos_embed", (1, 197, 100), "pos_embed has shape (1, 197, 100)"),
    ("cls_token", None, "pos_embed has 197 = 1 + 196 entries (a cls entry and a square grid) but there is no "
                        "cls_token"),
])
def test_wrong_shapes_are_named_before_any_reshape(tmp_path, vit_ti_state, capsys, key, shape, message):
    state = dict(vit_ti_state)
    if shape is None:
        del state[key]
    else:
        state[key] = np.zeros(shape, np.float32)
    path = str(tmp_path / "weights.safetensors")
    save_file(state, path)
    assert cli(["--from=timm_vit", f"--input={path}", f"--output={tmp_path / 'out'}"]) == 2
    assert message in capsys.readouterr().err


def test_file_errors_name_the_path(tmp_path, capsys):
    garbage, not_dict, empty = tmp_path / "garbage.pth", tmp_path / "list.pth", tmp_path / "empty.safetensors"
    garbage.write_bytes(b"\x00garbage" * 10)
    torch.save([torch.zeros(2)], not_dict)
    empty.write_bytes(b"")
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text("")
    cases = [
        (["--from=timm_vit", f"--input={garbage}"], f"{garbage} cannot be read as a PyTorch pickle"),
        (["--from=timm_vit", f"--input={not_dict}"], f"{not_dict} holds a list, not a state dict"),
        (["--from=timm_vit", f"--input={empty}"], f"{empty} cannot be read as safetensors"),
        (["--from=timm_vit", f"--input={folder}"], f"--input={folder} is not a file"),
        (["--from=hf_t5", f"--input={garbage}"], f"--input={garbage} is not a folder"),
        (["--from=hf_t5", f"--input={folder}"], f"{folder / 'config.json'} is not valid JSON"),
    ]
    for args, message in cases:
        assert cli([*args, f"--output={tmp_path / 'out'}"]) == 2
        assert message in capsys.readouterr().err


def test_an_output_that_is_a_file_is_refused_before_reading(tmp_path, capsys):
    output = tmp_path / "out"
    output.write_text("")
    assert cli(["--from=timm_vit", f"--input={tmp_path / 'missing.safetensors'}", f"--output={output}"]) == 2
    assert f"--output={output} exists and is not a directory" in capsys.readouterr().err
