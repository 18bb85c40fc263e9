"""python -m clippy_jax.convert --from=KIND --input=PATH --output=DIR [--allow-partial] [--image-pool=NAME]"""

import argparse
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from clippy_jax.convert import IMPORTERS
from clippy_jax.convert.common import save_pretrained, unflatten
from clippy_jax.models.pooling import IMAGE_POOLS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clippy_jax.convert", description=__doc__)
    parser.add_argument("--from", dest="kind", required=True, choices=sorted(IMPORTERS), help="checkpoint kind")
    parser.add_argument("--input", required=True, help="weights file (timm_vit, dino, open_clip_clippy) or folder")
    parser.add_argument("--output", required=True, help="directory to write params/ and model_config.json to")
    parser.add_argument("--allow-partial", action="store_true",
                        help="write the matching keys even if some are missing, unexpected or mis-shaped")
    parser.add_argument("--image-pool", default="max_with_cls", choices=sorted(IMAGE_POOLS),
                        help="open_clip_clippy only: the image pooling recorded in the model config")
    args = parser.parse_args(argv)

    options = dict(image_pool=args.image_pool) if args.kind == "open_clip_clippy" else {}
    converted = IMPORTERS[args.kind](args.input, **options)
    converted.report.check(strict=not args.allow_partial, what=f"{args.input} (--from={args.kind})")
    save_pretrained(args.output, unflatten(converted.params), converted.model_config,
                    source=dict(kind=args.kind, input=os.path.abspath(args.input)))
    count = sum(int(np.prod(v.shape)) for v in converted.params.values())
    print(f"Wrote {len(converted.params)} arrays ({count:,} parameters) to {os.path.abspath(args.output)}")
    print(json.dumps(converted.model_config, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
