"""CLIPpy on Conceptual Captions 12M: 32 epochs (paper appendix E). See `paper.py` for the required paths."""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("paper", os.path.join(os.path.dirname(__file__), "paper.py"))
paper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper)


def get_config(arg: str = ""):
    """`arg`: "pod=NAME", a launch plan of `paper.PODS` (mesh and remat for that pod), and/or "tower=efficientnet"
    (the CNN baseline of appendix F, Tab. 3), e.g. cc12m.py:pod=v4-64."""
    return paper.paper_config(num_examples=12_000_000, epochs=32, **paper.parse_arg(arg))  # appendix E
