"""Label conventions shared by the dataset builders, the metrics and the figures (no TensorFlow here)."""

IGNORE_LABEL = 255  # pixels excluded from evaluation (void / unlabelled)
