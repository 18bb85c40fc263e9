"""Segments image files with free-text prompts (or groups them bottom-up) and writes the results:

    python -m clippy_jax.segment --checkpoint=DIR --image=photo.jpg [--image=...] \
        --prompts="cat,dog,grass" [--background="floor,wall,sky"] --output=OUT
    python -m clippy_jax.segment --checkpoint=DIR --image=photo.jpg --group=4 --output=OUT

Installed, the same command is `clippy-segment`. `--checkpoint` is a training workdir (e.g. the
demo's `workdirs/demo`) or a converted checkpoint (`python -m clippy_jax.convert`). Each `--image`
(repeat the flag or separate paths with commas; JPEG, PNG, WebP, ... in any mode, EXIF orientation
applied) gives, in OUT:
  <name>_overlay.png  the labels blended over the image at its own resolution, with a legend;
  <name>_labels.png   the label map: pixel value = label index (a palette PNG, coloured as the overlay);
  <name>.json         the labels, in index order, and each one's share of the pixels.
`--background` prompts form one label, "background" (index 0). With `--group=K`, the labels are
the K bottom-up PCA groups of the image instead of prompts.
"""

import json
import os

from absl import app, flags, logging

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or converted checkpoint.", required=True)
_IMAGES = flags.DEFINE_multi_string("image", [], "Image file(s) to segment; repeat the flag or separate with commas.")
_PROMPTS = flags.DEFINE_list("prompts", [], "Comma-separated prompts, one label each.")
_BACKGROUND = flags.DEFINE_list("background", [], "Comma-separated prompts averaged into one 'background' label.")
_GROUP = flags.DEFINE_integer("group", 0, "> 0: the number of bottom-up PCA groups, instead of prompts.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the overlays, label maps and shares.", required=True)
_MODEL_CONFIG = flags.DEFINE_string("model_config", "", "Training config, for workdirs that do not record one.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Shorter side the model sees; 0: the checkpoint's own.")
_WINDOW = flags.DEFINE_integer("window", 0, "> 0: sliding windows of this side (stride 2/3 of it).")


def _image_paths() -> list[str]:
    return [path for value in _IMAGES.value for path in value.split(",") if path]


def _check_flags() -> None:
    """Every flag problem, before the model loads."""
    if not _image_paths():
        raise app.UsageError("Pass at least one --image=PATH.")
    missing = [path for path in _image_paths() if not os.path.isfile(path)]
    if missing:
        raise app.UsageError(f"--image: no such file(s): {missing}.")
    if _GROUP.value < 0:
        raise app.UsageError(f"--group must be >= 1 (or 0 to segment with --prompts), got {_GROUP.value}.")
    if _GROUP.value and (_PROMPTS.value or _BACKGROUND.value):
        raise app.UsageError("--group groups bottom-up without prompts; drop --prompts / --background or --group.")
    if not _GROUP.value and not [p for p in _PROMPTS.value if p.strip()]:
        raise app.UsageError('Pass --prompts="cat,dog,grass" (one label per prompt) or --group=K.')
    if len(_PROMPTS.value) + 1 > 256 or _GROUP.value > 256:
        raise app.UsageError("At most 255 labels: the label map is an 8-bit PNG.")
    names = [os.path.splitext(os.path.basename(path))[0] for path in _image_paths()]
    if len(set(names)) < len(names):
        raise app.UsageError(f"--image: two files share a name, their outputs would collide: {sorted(names)}.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _check_flags()
    import numpy as np  # the model's imports (JAX, TensorFlow) only once the flags are checked
    import tensorflow as tf
    from PIL import Image

    from clippy_jax import logs
    from clippy_jax.evaluate.render import palette
    from clippy_jax.inference import Clippy, read_image

    tf.config.set_visible_devices([], "GPU")  # TensorFlow only resizes; leave accelerators to JAX.
    logs.quiet_libraries()
    paths = _image_paths()
    images = [read_image(path) for path in paths]  # unreadable files fail before the model loads
    clippy = Clippy.load(_CHECKPOINT.value, model_config=_MODEL_CONFIG.value, image_size=_IMAGE_SIZE.value,
                         window=_WINDOW.value)
    prompts = [p.strip() for p in _PROMPTS.value if p.strip()]
    background = [p.strip() for p in _BACKGROUND.value if p.strip()]
    if _GROUP.value:
        results = clippy.group(images, num_groups=_GROUP.value, render=True)
        maps, first_color = [r.groups for r in results], 1
    else:
        results = clippy.segment(images, prompts, background=background, render=True)
        maps, first_color = [r.labels for r in results], 0 if background else 1
    os.makedirs(_OUTPUT.value, exist_ok=True)
    for path, image, result, labels in zip(paths, images, results, maps):
        stem = os.path.join(_OUTPUT.value, os.path.splitext(os.path.basename(path))[0])
        Image.fromarray(result.overlay).save(f"{stem}_overlay.png")
        label_map = Image.fromarray(labels.astype(np.uint8))
        colors = palette(len(result.names) + first_color)[first_color:]
        label_map.putpalette(np.round(colors * 255).astype(np.uint8).ravel().tolist())  # "L" becomes "P"
        label_map.save(f"{stem}_labels.png")
        counts = np.bincount(labels.ravel(), minlength=len(result.names))
        shares = {name: round(float(c) / labels.size, 6) for name, c in zip(result.names, counts)}
        with open(f"{stem}.json", "w") as f:
            json.dump(dict(image=os.path.abspath(path), height=image.shape[0], width=image.shape[1],
                           checkpoint=_CHECKPOINT.value, labels=result.names, shares=shares), f, indent=2)
        top = sorted(shares.items(), key=lambda item: -item[1])[:3]
        logging.info("%s (%dx%d): %s -> %s_overlay.png", path, image.shape[1], image.shape[0],
                     ", ".join(f"{name} {100 * share:.0f}%" for name, share in top), stem)


def run() -> None:
    """The `clippy-segment` console command."""
    app.run(main)


if __name__ == "__main__":
    run()
