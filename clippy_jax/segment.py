"""Segments image files with free-text prompts (or groups them bottom-up) and writes the results:

    python -m clippy_jax.segment --checkpoint=DIR --image=photo.jpg [--image=...] \
        --prompts="cat,dog,grass" [--background="floor,wall,sky"] --output=OUT
    python -m clippy_jax.segment --checkpoint=DIR --image=photo.jpg --group=4 --output=OUT

Installed, the same command is `clippy-segment`. `--checkpoint` is a training workdir (e.g. the
demo's `workdirs/demo`) or a converted checkpoint (`python -m clippy_jax.convert`). Each `--image`
(repeat the flag or separate paths with commas; JPEG, PNG, WebP, ... in any mode, EXIF orientation
applied) gives, in OUT:
  <name>_overlay.png  the labels blended over the image (enlarged when small), a legend beside it;
  <name>_labels.png   the label map: pixel value = label index (a palette PNG, coloured as the overlay);
  <name>.json         the labels, in index order, and each one's share of the pixels.
`--background` prompts form one label, "background" (index 0). With `--group=K`, the labels are
the K bottom-up PCA groups of the image instead of prompts.

An image that cannot be read or segmented is reported in one line and the others go on; flags, the
output folder and the images are checked before the model loads. Exit status: 0 all segmented; 2 bad
flags, checkpoint, model config or images (with the count); 1 another failure (`--traceback` for details).
"""

import json
import os

from absl import flags, logging

from clippy_jax import cli, logs

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or converted checkpoint.")
_IMAGES = flags.DEFINE_multi_string("image", [], "Image file(s) to segment; repeat the flag or separate with commas.")
_PROMPTS = flags.DEFINE_list("prompts", [], "Comma-separated prompts, one label each.")
_BACKGROUND = flags.DEFINE_list("background", [], "Comma-separated prompts averaged into one 'background' label.")
_GROUP = flags.DEFINE_integer("group", 0, "> 0: the number of bottom-up PCA groups, instead of prompts.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the overlays, label maps and shares.")
_MODEL_CONFIG = flags.DEFINE_string("model_config", "", "Training config, for workdirs that do not record one.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Shorter side the model sees; 0: the checkpoint's own.")
_WINDOW = flags.DEFINE_integer("window", 0, "> 0: sliding windows of this side (stride 2/3 of it).")
_TRACEBACK = cli.traceback_flag()


def _image_paths() -> list[str]:
    return [path for value in _IMAGES.value for path in value.split(",") if path]


def _check_flags() -> None:
    """Every flag problem and the output folder, before the model loads."""
    if not _CHECKPOINT.value:
        raise cli.BadInput("Pass --checkpoint=DIR: a training workdir (`make demo` writes workdirs/demo) or a "
                           "converted checkpoint.")
    if not _OUTPUT.value:
        raise cli.BadInput("Pass --output=DIR, the folder for the overlays, label maps and shares.")
    if not _image_paths():
        raise cli.BadInput("Pass at least one --image=PATH.")
    if _GROUP.value < 0:
        raise cli.BadInput(f"--group must be >= 1 (or 0 to segment with --prompts), got {_GROUP.value}.")
    if _GROUP.value and (_PROMPTS.value or _BACKGROUND.value):
        raise cli.BadInput("--group groups bottom-up without prompts; drop --prompts / --background or --group.")
    if not _GROUP.value and not [p for p in _PROMPTS.value if p.strip()]:
        raise cli.BadInput('Pass --prompts="cat,dog,grass" (one label per prompt) or --group=K.')
    if len(_PROMPTS.value) + 1 > 256 or _GROUP.value > 256:
        raise cli.BadInput("At most 255 labels: the label map is an 8-bit PNG.")
    names = [os.path.splitext(os.path.basename(path))[0] for path in _image_paths()]
    if len(set(names)) < len(names):
        raise cli.BadInput(f"--image: two files share a name, their outputs would collide: {sorted(names)}.")
    if os.path.exists(_OUTPUT.value) and not os.path.isdir(_OUTPUT.value):
        raise cli.BadInput(f"--output={_OUTPUT.value} is a file; pass a folder (it is created if missing).")
    try:
        os.makedirs(_OUTPUT.value, exist_ok=True)
    except OSError as error:
        raise cli.BadInput(f"--output={_OUTPUT.value} cannot be created: {error.strerror}.") from None
    if not os.access(_OUTPUT.value, os.W_OK):
        raise cli.BadInput(f"--output={_OUTPUT.value} is not writable.")


def _trained_on(clippy, paths: list[str], images: list) -> None:
    """States the training data; warns about inputs unlike the synthetic demo scenes a demo model knows."""
    data = clippy.data_config
    if data is None:
        return
    if data.get("source") != "synthetic":
        logging.info("The model was trained on %s data.", data.get("source"))
        return
    side = data.synthetic.image_size
    unlike = [p for p, image in zip(paths, images) if image.shape[:2] != (side, side)]
    logging.info("The model was trained on the synthetic demo scenes only (%dx%d textured shapes on textured "
                 "backgrounds, clippy_jax/data/synthetic.py).", side, side)
    if unlike:
        logging.warning("%s: unlike the %dx%d synthetic scenes this model was trained on; its labels there are not "
                        "meaningful (the demo model knows no photographs: use a converted CLIPpy checkpoint).",
                        ", ".join(unlike), side, side)


def _segment(clippy, paths: list[str], images: list) -> int:
    """Segments and writes each image; returns the number that failed (each reported in one line)."""
    import numpy as np
    from PIL import Image

    from clippy_jax.evaluate.render import palette

    prompts = [p.strip() for p in _PROMPTS.value if p.strip()]
    background = [p.strip() for p in _BACKGROUND.value if p.strip()]
    failed = 0
    for path, image in zip(paths, images):
        try:
            if _GROUP.value:
                result = clippy.group(image, num_groups=_GROUP.value, render=True)
                labels, first_color = result.groups, 1
                found = len(np.unique(labels))
                if found < _GROUP.value:
                    logging.warning("%s: only %d of the %d groups hold any pixel; the model's features separate "
                                    "fewer groups here (try --group=%d).", path, found, _GROUP.value, found)
            else:
                result = clippy.segment(image, prompts, background=background, render=True)
                labels, first_color = result.labels, 0 if background else 1
        except (ValueError, MemoryError) as error:
            logging.error("%s: %s", path, error)
            failed += 1
            continue
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
    return failed


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise cli.BadInput(f"unexpected arguments {argv[1:]}: every setting is a flag (--image=..., --prompts=...).")
    _check_flags()
    from clippy_jax.inference import Clippy, read_image  # the model's imports only once the flags are checked

    logs.quiet_libraries()
    logs.start_backends()
    paths, images, unreadable = [], [], 0
    for path in _image_paths():  # unreadable files are reported before the model loads
        try:
            images.append(read_image(path))
            paths.append(path)
        except (OSError, ValueError) as error:
            logging.error("%s", error)
            unreadable += 1
    if not images:
        raise cli.BadInput(f"none of the {unreadable} images could be read.")
    try:
        clippy = Clippy.load(_CHECKPOINT.value, model_config=_MODEL_CONFIG.value, image_size=_IMAGE_SIZE.value,
                             window=_WINDOW.value)
    except (OSError, ValueError) as error:
        raise cli.BadInput(str(error)) from error
    _trained_on(clippy, paths, images)
    failed = unreadable + _segment(clippy, paths, images)
    if failed:
        raise cli.BadInput(f"{failed} of {len(_image_paths())} images could not be segmented (above); the others' "
                         f"results are in {_OUTPUT.value}.")


def run() -> None:
    """The `clippy-segment` console command."""
    cli.run(main, _TRACEBACK)


if __name__ == "__main__":
    run()
