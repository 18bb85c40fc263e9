"""Evaluation of a checkpoint on the paper's benchmarks (see clippy_jax/evaluate/README.md):

    python -m clippy_jax.evaluate --config=configs/eval.py:voc,res=448 --config.init_from=CKPT \
        --config.eval.manual_dir=/data/voc --workdir=OUT

The argument is a comma-separated list of task names (keys of `TASKS`) or groups (keys of `GROUPS`),
and options: `res=N` (input side: resize mode input N x N, Cityscapes N x 2N; classification resize
and crop; default 224), `window=N` and `stride=S` (sliding N x N windows at stride S, default 2N/3,
over images resized to shorter side `res`, for the segmentation and unsupervised tasks).

Protocol switches (clippy_jax/evaluate/README.md, "Protocol switches"; the defaults are the paper's):
`background=prompt|labels` (VOC's background as one label averaging its prompts, or also the 39
stuff labels of kahnchana/clippy mapped to background), `templates=none|photo|FILE` (segmentation
prompt templates: none, "a photo of a/an {}", or a file's templates averaged), `miou=present|all`
(mIoU over the classes present, or over all classes with absent ones at 0), `jaccard_background=in|out`
and `groups=N` (bottom-up grouping). The task `voc_replication` is VOC under kahnchana/clippy's protocol.
"""

import os

import ml_collections

from clippy_jax.evaluate.geometry import CLIP_MEAN, CLIP_STD

GROUPS = {
    "segmentation": ("voc", "coco_object", "coco133", "ade20k", "cityscapes27"),
    "grouping": ("voc_grouping", "cityscapes27_unsupervised"),
    "classification": ("imagenet", "imagenet_v2"),
    "robustness": ("waterbirds",),
}
GROUPS["paper"] = sum(GROUPS.values(), ())


# The options of the argument and their defaults (the paper's protocol).
OPTIONS = dict(res=224, window=0, stride=0, background="prompt", templates="none", miou="present",
               jaccard_background="in", groups=2)
CHOICES = dict(background=("prompt", "labels"), miou=("present", "all"), jaccard_background=("in", "out"))
# background=labels: the extra labels mapped to each dataset's background class.
BACKGROUND_LABELS = {"voc2012_seg": "voc2012_stuff39.txt"}


def tasks(res: int, window: int, stride: int, background: str, templates: str, miou: str, jaccard_background: str,
          groups: int) -> dict[str, dict]:
    """Every task's settings; `kind` names the evaluator (clippy_jax/evaluate/runner.py), which reads
    every setting of its kind from here (`geometry.Geometry.from_config` reads the geometry)."""
    square = dict(input_size=(res, res), window=0, stride=0, short_side=0)  # resize mode
    dense = dict(input_size=(res, res), window=window, stride=stride, short_side=res)
    cityscapes = dict(dense, input_size=(res, 2 * res))  # Cityscapes images are 1024 x 2048
    # prompts "": prompts/<dataset>.txt; background_labels "": none (or a file of extra background labels).
    segmentation = dict(kind="segmentation", prompts="", background_labels="", templates=templates, miou=miou)
    voc_labels = BACKGROUND_LABELS["voc2012_seg"] if background == "labels" else ""
    zero_shot = dict(kind="classification", classes="imagenet_classes.txt", templates="imagenet_templates.txt",
                     resize=res, crop=res, resize_method="bicubic", top_k=(1, 5))  # CLIP's ImageNet protocol
    return dict(
        synthetic_segmentation=dict(kind="synthetic_segmentation"),
        voc=dict(segmentation, dataset="voc2012_seg", background_labels=voc_labels, **dense),
        # kahnchana/clippy's VOC protocol (src/evaluation/): its class names, its 39 stuff labels as
        # background, "a photo of a/an {}", mIoU over all 21 classes (absent ones at 0), 224 x 224 input.
        voc_replication=dict(segmentation, dataset="voc2012_seg", prompts="voc2012_seg_replication.txt",
                             background_labels=BACKGROUND_LABELS["voc2012_seg"], templates="photo", miou="all",
                             **dict(square, input_size=(224, 224))),
        coco_object=dict(segmentation, dataset="coco_object", **dense),
        coco133=dict(segmentation, dataset="coco_panoptic133", **dense),
        ade20k=dict(segmentation, dataset="ade20k_150", **dense),
        cityscapes27=dict(segmentation, dataset="cityscapes27", **cityscapes),
        voc_grouping=dict(kind="grouping", dataset="voc2012_seg", num_groups=groups,
                          exclude_classes=("background",) if jaccard_background == "out" else (), **square),
        cityscapes27_unsupervised=dict(
            kind="unsupervised_segmentation", dataset="cityscapes27", method="kmeans", samples_per_window=64,
            kmeans_iterations=30, seed=0, miou=miou, **cityscapes,
        ),
        imagenet=dict(zero_shot, dataset="imagenet2012_val"),
        imagenet_v2=dict(zero_shot, dataset="imagenet_v2_matched_frequency"),
        waterbirds=dict(kind="waterbirds", dataset="waterbirds", prompts="waterbirds.txt", **square),
    )


def _parse(arg: str) -> tuple[list[str], dict[str, int | str]]:
    names, options = [], dict(OPTIONS)
    for item in filter(None, arg.split(",")):
        key, sep, value = item.partition("=")
        if sep:
            if key not in options:
                raise ValueError(f"Unknown eval config option {key!r}; known: {sorted(options)}.")
            if key in CHOICES and value not in CHOICES[key]:
                raise ValueError(f"Eval config option {key}={value!r}; choose one of {CHOICES[key]}.")
            if isinstance(OPTIONS[key], int) and not value.isdigit():
                raise ValueError(f"Eval config option {key}={value!r} must be a non-negative integer.")
            options[key] = int(value) if isinstance(OPTIONS[key], int) else value
        else:
            names.extend(GROUPS.get(key, (key,)))
    options["stride"] = options["stride"] or options["window"] * 2 // 3
    return names, options


def get_config(arg: str = "voc") -> ml_collections.ConfigDict:
    names, options = _parse(arg)
    all_tasks = tasks(**options)
    unknown = [n for n in names if n not in all_tasks]
    if unknown:
        raise ValueError(f"Unknown evaluation task(s) {unknown}; choose from {sorted(all_tasks)} or {sorted(GROUPS)}.")
    config = ml_collections.ConfigDict()
    config.init_from = ""  # training workdir / checkpoint step, or a converted checkpoint directory
    config.model_config = ""  # for training checkpoints: the training config, e.g. configs/demo.py:size=tiny
    config.tokenizer_path = ""  # overrides the tokenizer of the checkpoint / model config
    # For converted checkpoints; a training checkpoint brings its own data settings.
    config.data = dict(mean=CLIP_MEAN, std=CLIP_STD, tokenizer_path="", max_text_length=64)
    config.mesh = dict(data=-1, fsdp=1, model=1)
    config.eval = dict(
        evaluators=tuple(names),
        tasks=all_tasks,
        batch_size=64,  # global, over all hosts; a multiple of the data-parallel devices
        num_overlays=4,
        manual_dir="",  # where the datasets' official layouts live (clippy_jax/data/eval_datasets/README.md)
        tfds_dir=os.path.expanduser("~/tensorflow_datasets"),  # where the TFRecords are built once
        max_examples=0,  # > 0: only the first examples of each split (quick checks)
        progress=True,
    )
    return config
