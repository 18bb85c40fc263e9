"""Every setting is validated before any work, with a message naming the setting, the value and the fix."""

import importlib.util
import os
import re

import pytest

from clippy_jax import config_checks
from tests.helpers import REPO


def demo_config(arg: str = "size=tiny"):
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(REPO, "configs", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _with(overrides: dict, arg: str = "size=tiny"):
    config = demo_config(arg)
    for setting, value in overrides.items():
        *parents, name = setting.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[name] = value
    return config


@pytest.mark.parametrize("arg", ["size=tiny", "", "pool=avg", "tower=efficientnet", "tower=efficientnet,pool=avg"])
def test_the_shipped_demo_configs_pass(arg):
    config_checks.validate(demo_config(arg), num_devices=8)


@pytest.mark.parametrize(("overrides", "message"), [
    # ranges
    ({"train.steps": 0}, "config.train.steps=0 must be >= 1"),
    ({"optim.learning_rate": -1e-3}, "config.optim.learning_rate=-0.001 is outside (0.0, inf)"),
    ({"optim.b1": 1.5}, "config.optim.b1=1.5 is outside [0.0, 1.0)"),
    ({"optim.warmup_steps": -5}, "config.optim.warmup_steps=-5 must be >= 0"),
    ({"optim.grad_accum_steps": 0}, "config.optim.grad_accum_steps=0 must be >= 1"),
    ({"train.keep_checkpoints": 0}, "config.train.keep_checkpoints=0 must be >= 1"),
    ({"train.log_every": 0}, "config.train.log_every=0 must be >= 1"),
    ({"train.checkpoint_every": 0}, "config.train.checkpoint_every=0 must be >= 1"),
    ({"eval.every_steps": -1}, "config.eval.every_steps=-1 must be >= 0"),
    ({"eval.batch_size": 0}, "config.eval.batch_size=0 must be >= 1"),
    ({"train.batch_size": 0}, "config.train.batch_size=0 must be >= 1"),
    ({"data.keep_ratio": 1.5}, "config.data.keep_ratio=1.5 is outside (0.0, 1.0]"),
    ({"data.keep_patches": 1000}, "config.data.keep_patches=1000 exceeds the 64 patches"),
    ({"data.interleave": 0}, "config.data.interleave=0 must be >= 1"),
    ({"data.shuffle_buffer": 0}, "config.data.shuffle_buffer=0 must be >= 1"),
    ({"data.max_text_length": 0}, "config.data.max_text_length=0 must be >= 2"),
    ({"model.image.patch_size": 0}, "config.model.image.patch_size=0 must be >= 1"),
    ({"data.crop": "middle"}, "config.data.crop='middle' is not a crop"),
    # divisibility
    ({"model.image.num_heads": 3}, "config.model.image.num_heads=3 does not divide config.model.image.width=32"),
    ({"data.image_size": 60}, "config.data.image_size=60 is not a multiple of config.model.image.patch_size=8"),
    ({"train.batch_size": 12}, "config.train.batch_size=12 is not divisible by the 8 data-parallel devices"),
    ({"train.loss_block_size": 3}, "config.train.loss_block_size=3 does not divide config.train.batch_size=16"),
    # consistency between settings
    ({"data.source": "webdataset", "data.train_pattern": "/x/*.tar", "data.tokenizer_path": __file__},
     "config.data.eval_pattern='' is empty but config.eval.evaluators names 'synthetic_segmentation'"),
    ({"data.source": "webdataset"}, "config.data.train_pattern='' is empty but data.source='webdataset'"),
    # names
    ({"data.source": "parquet"}, "config.data.source='parquet' is not a known source"),
    ({"model.dtype": "float17"}, "config.model.dtype='float17' is not a supported dtype; choose one of"),
    ({"eval.evaluators": ("segmentaton",)}, "Unknown evaluator 'segmentaton'"),
    ({"init.image": "/no/such/dir"}, "config.init.image='/no/such/dir' is not a directory"),
    ({"data.text_key": "json:"}, "'json:' is not KEY or KEY:FIELD"),
    ({"model.image.remat": "some"}, "config.model.image.remat='some' is not a remat policy; choose 'none' or one of"),
    ({"model.text.attention": "flash"}, "config.model.text.attention='flash' is not an attention kernel"),
    ({"eval.max_examples": -1}, "config.eval.max_examples=-1 must be >= 0"),
    ({"data.source": "webdataset", "data.train_pattern": "/x/*.tar", "data.tokenizer_path": "/nonexistent.model"},
     "config.data.tokenizer_path='/nonexistent.model' does not exist"),
])
def test_bad_settings_are_rejected_naming_setting_value_and_fix(overrides, message):
    with pytest.raises(ValueError, match=None) as raised:
        config_checks.validate(_with(overrides), num_devices=8)
    assert message in str(raised.value)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data.keep_ratio": 0.5}, "config.data.keep_ratio=0.5 drops patches, but config.model.image.tower='efficientnet' "
                               "takes whole images; set config.data.keep_ratio=1.0"),
    ({"data.keep_patches": 4}, "config.data.keep_patches=4 keeps patches"),
    ({"model.image.patch_size": 8}, "config.model.image.patch_size=8 is not a setting of "
                                    "config.model.image.tower='efficientnet'"),
    ({"model.image.patch_stride": 4}, "config.model.image.patch_stride=4 is not a setting"),
    ({"model.image.preset": "b9"}, "config.model.image.preset='b9' is not an EfficientNet preset"),
    ({"model.image.padding": "valid"}, "config.model.image.padding='valid' is not a padding"),
    ({"model.image.tower": "resnet"}, "config.model.image.tower='resnet' is not an image tower"),
    ({"model.image_pool": "cls"}, "reads the CLS token, which config.model.image.tower='efficientnet' has none"),
    ({"model.image.drop_path_rate": 1.5}, "config.model.image.drop_path_rate=1.5 is outside [0.0, 1.0)"),
])
def test_cnn_settings_are_rejected_by_name(overrides, message):
    with pytest.raises(config_checks.ConfigError, match=re.escape(message)):
        config_checks.validate(_with(overrides, "size=tiny,tower=efficientnet"), num_devices=8)


def test_a_vocabulary_smaller_than_the_tokenizer_is_rejected():
    config = _with({"model.text.vocab_size": 100})
    with pytest.raises(config_checks.ConfigError, match="config.model.text.vocab_size=100 is smaller than the "
                                                        "tokenizer's 512 tokens"):
        config_checks.check_vocab(config, 512)
    config_checks.check_vocab(_with({"model.text.vocab_size": 0}), 512)


def test_resume_names_each_changed_setting_with_both_values():
    saved = config_checks.flatten(demo_config())
    now = config_checks.flatten(_with({"model.image.width": 64, "optim.learning_rate": 1e-4}))
    with pytest.raises(config_checks.ConfigError, match=r"config.model.image.width=32 -> 64;"):
        config_checks.check_resume(now, saved, "/w", workdir_step=6, steps=10)
    config_checks.check_resume(config_checks.flatten(_with({"optim.learning_rate": 1e-4})), saved, "/w", 6, 10)
    with pytest.raises(config_checks.ConfigError, match="config.train.steps=5 is below the step 6 that /w"):
        config_checks.check_resume(saved, saved, "/w", workdir_step=6, steps=5)


def test_a_config_without_a_setting_is_rejected_naming_it():
    """Code reads settings without re-defaulting them: a config that lacks one fails at start-up."""
    config = demo_config()
    del config.data["max_consecutive_skips"]
    with pytest.raises(config_checks.ConfigError, match="lacks a setting.*max_consecutive_skips"):
        config_checks.validate(config, num_devices=8)


def test_model_presets_pass_the_checks():
    """`variant='B/16'` (and T5's `size`) expand before the checks, as in `build_model`."""
    config = demo_config()
    config.model.image = dict(variant="Ti/16", posemb_grid=(4, 4), use_cls_token=True)
    config.data.image_size = 64
    config_checks.validate(config, num_devices=8)
    config.model.image.variant = "Q/16"
    with pytest.raises(config_checks.ConfigError, match="Q/16"):
        config_checks.validate(config, num_devices=8)


def test_main_refuses_a_positional_argument_with_exit_2_and_one_line(tmp_path):
    from tests.helpers import run_main

    result = run_main(str(tmp_path / "w"), "stray", check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "unexpected arguments ['stray']" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(("flag", "message"), [
    ("--config.optim.lr=1e-3", "--config.optim.lr names an unknown key 'lr' of config.optim; the keys of "
     "config.optim are b1, b2, eps, grad_accum_steps, grad_clip_norm, learning_rate, warmup_steps, weight_decay."),
    ("--config.data.patch_size=16", "--config.data.patch_size names an unknown key 'patch_size' of config.data; did "
     "you mean config.model.image.patch_size?"),
])
def test_an_unknown_key_names_its_section_keys_or_where_it_lives(tmp_path, flag, message):
    from tests.helpers import run_main

    result = run_main(str(tmp_path / "w"), flag, check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()
