"""python -m clippy_jax.convert --from=KIND --input=PATH --output=DIR [--allow-partial] [--image-pool=NAME]
    [--image-depth=N] [--text-depth=N] [--padding=pytorch|same] [--verbose]

Everything is checked before anything is written: the output path, the input file or folder, the
depth of each tower (against the standard model of its width, or --image-depth / --text-depth),
and every key and shape. A failure prints one line and exits 2 (--verbose: the traceback too).
"""

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from clippy_jax.convert import IMPORTERS
from clippy_jax.convert.common import ConvertError, save_pretrained, unflatten
from clippy_jax.models.efficientnet import PADDINGS
from clippy_jax.models.pooling import IMAGE_POOLS
from clippy_jax.models.t5 import T5_1_1_PRESETS, T5_PRESETS
from clippy_jax.models.vit import VIT_PRESETS

FOLDER_KINDS = ("hf_t5", "t5x")
EXIT_FAILED = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clippy_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="kind", required=True, choices=sorted(IMPORTERS), help="checkpoint kind")
    parser.add_argument("--input", required=True, help="weights file (timm_vit, dino, open_clip_clippy) or folder")
    parser.add_argument("--output", required=True, help="directory to write params/ and model_config.json to")
    parser.add_argument("--allow-partial", action="store_true",
                        help="write the matching keys even if some are missing, unexpected or mis-shaped")
    parser.add_argument("--image-pool", default="max_with_cls", choices=sorted(IMAGE_POOLS),
                        help="open_clip_clippy only: the image pooling recorded in the model config")
    parser.add_argument("--image-depth", type=int, help="expected ViT blocks (default: the preset of its width)")
    parser.add_argument("--text-depth", type=int, help="expected T5 blocks (default: the preset of its shapes)")
    parser.add_argument("--padding", choices=PADDINGS,
                        help="timm_efficientnet (required): 'pytorch' (efficientnet_b*), 'same' (tf_efficientnet_b*)")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    return parser


def check_output(path: str) -> None:
    """The output must be a directory (or not exist yet) under a writable parent."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConvertError(f"--output={path} exists and is not a directory; pass a new or existing directory.")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise ConvertError(f"--output={path}: {parent} is not writable.")


def check_input(kind: str, path: str) -> None:
    if kind in FOLDER_KINDS and not os.path.isdir(path):
        raise ConvertError(f"--input={path} is not a folder; --from={kind} reads a checkpoint folder.")
    if kind not in FOLDER_KINDS and not os.path.isfile(path):
        raise ConvertError(f"--input={path} is not a file; --from={kind} reads a weights file.")


def _preset_depth(tower: str, config: dict) -> tuple[int | None, str]:
    """The depth of the standard model with the tower's widths, and its name; (None, '') if none."""
    if tower == "image":
        for name, (width, depth, mlp_dim, heads) in VIT_PRESETS.items():
            if (width, mlp_dim, heads) == (config["width"], config["mlp_dim"], config["num_heads"]):
                return depth, f"ViT-{name}"
        return None, ""
    for variant, presets in (("t5_1_0", T5_PRESETS), ("t5_1_1", T5_1_1_PRESETS)):
        for name, (embed, depth, heads, head_dim, mlp_dim) in presets.items():
            if (embed, heads, head_dim, mlp_dim) == (config["embed_dim"], config["num_heads"], config["head_dim"],
                                                     config["mlp_dim"]):
                return depth, f"T5 {name} ({variant})"
    return None, ""


def check_depths(model_config: dict, expected: dict[str, int | None]) -> None:
    """Each converted tower's depth must be the one expected (`--image-depth` / `--text-depth`, else
    that of the standard model of its widths): a checkpoint missing its last blocks is refused."""
    for tower, given in expected.items():
        config = model_config.get(tower)
        if config is None or "depth" not in config:  # an EfficientNet's layout is matched to its preset
            continue
        want, name = (given, f"--{tower}-depth") if given is not None else _preset_depth(tower, config)
        if want is not None and config["depth"] != want:
            raise ConvertError(f"The {tower} tower has {config['depth']} blocks but {name} has {want}: a truncated "
                               f"or extended checkpoint? Pass --{tower}-depth={config['depth']} to convert a model "
                               "of that depth.")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    check_output(args.output)
    check_input(args.kind, args.input)
    options = {"open_clip_clippy": dict(image_pool=args.image_pool),
               "timm_efficientnet": dict(padding=args.padding)}.get(args.kind, {})
    converted = IMPORTERS[args.kind](args.input, **options)
    check_depths(converted.model_config, dict(image=args.image_depth, text=args.text_depth))
    converted.report.check(strict=not args.allow_partial, what=f"{args.input} (--from={args.kind})")
    save_pretrained(args.output, unflatten(converted.params), converted.model_config,
                    source=dict(kind=args.kind, input=os.path.abspath(args.input)),
                    batch_stats=unflatten(converted.batch_stats))
    count = sum(int(np.prod(v.shape)) for v in converted.params.values())
    print(f"Wrote {len(converted.params)} arrays ({count:,} parameters) to {os.path.abspath(args.output)}")
    print(json.dumps(converted.model_config, indent=2, sort_keys=True))
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    """`main` with one line and exit code 2 for a failure (`--verbose`: the traceback too)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except Exception as error:  # noqa: BLE001 (every failure: one line)
        if "--verbose" in argv:
            raise
        message = str(error)
        print(f"python -m clippy_jax.convert: error: {type(error).__name__}: {message}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(cli())
