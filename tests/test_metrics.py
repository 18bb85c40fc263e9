"""Evaluation metrics against independent references: sklearn / float64 numpy for mIoU, brute force for
Jaccard similarity and Hungarian matching, and a two-process merge across hosts."""

import itertools
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sklearn.metrics

from clippy_jax.evaluate import metrics
from tests.helpers import REPO

C = 6


def _random_maps(rng: np.random.Generator, shape=(5, 17, 23)) -> tuple[np.ndarray, np.ndarray]:
    """(labels with ~20% ignored pixels and class 5 absent, predictions that never predict class 4)."""
    labels = rng.integers(0, C - 1, shape)
    labels[rng.random(shape) < 0.2] = metrics.IGNORE_LABEL
    predictions = np.where(rng.random(shape) < 0.5, labels % C, rng.integers(0, C - 2, shape))
    predictions[predictions == metrics.IGNORE_LABEL] = 0
    return labels, predictions


def test_confusion_miou_and_per_class_iou_match_sklearn():
    rng = np.random.default_rng(0)
    labels, predictions = _random_maps(rng)
    confusion = None
    for i in range(len(labels)):  # merged image by image, as the evaluators do
        update = metrics.ConfusionMatrix.from_model_output(predictions=predictions[i], labels=labels[i], num_classes=C)
        confusion = update if confusion is None else confusion.merge(update)
    valid = labels != metrics.IGNORE_LABEL
    reference = sklearn.metrics.confusion_matrix(labels[valid], predictions[valid], labels=range(C))
    np.testing.assert_array_equal(confusion.compute(), reference)

    miou, iou = metrics.iou_from_confusion(confusion.compute())
    expected = sklearn.metrics.jaccard_score(labels[valid], predictions[valid], labels=range(C), average=None,
                                             zero_division=0)
    np.testing.assert_allclose(iou[: C - 1], expected[: C - 1], rtol=1e-12)
    assert np.isnan(iou[5]) and not np.isnan(iou[4])  # class 5: in neither map; class 4: only in the labels
    # float64 numpy: IoU_c = |pred = c and label = c| / |pred = c or label = c| over valid pixels.
    per_class = [
        np.sum((predictions == c) & (labels == c) & valid) / np.sum(((predictions == c) | (labels == c)) & valid)
        for c in range(C - 1)
    ]
    assert miou == pytest.approx(np.mean(per_class), rel=1e-12)
    assert metrics.pixel_accuracy(confusion.compute()) == pytest.approx(np.mean(predictions[valid] == labels[valid]))


def test_confusion_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="Labels must be < 3"):
        metrics.ConfusionMatrix.from_model_output(predictions=np.zeros(2), labels=np.asarray([0, 3]), num_classes=3)


def test_top_k_accuracy_with_mask():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 20))
    labels = rng.integers(0, 20, 50)
    mask = rng.random(50) < 0.8
    for k in (1, 5):
        accuracy = metrics.Accuracy.from_model_output(logits=logits[:25], labels=labels[:25], k=k, mask=mask[:25])
        accuracy = accuracy.merge(
            metrics.Accuracy.from_model_output(logits=logits[25:], labels=labels[25:], k=k, mask=mask[25:])
        )
        rank = (logits > logits[np.arange(50), labels][:, None]).sum(axis=1)
        assert accuracy.compute() == pytest.approx(np.mean(rank[mask] < k))


def test_group_accuracy():
    correct = np.asarray([1, 0, 1, 1, 0, 1], bool)
    groups = np.asarray([0, 0, 1, 3, 3, 3])
    accuracy = metrics.GroupAccuracy.from_model_output(correct=correct, groups=groups, num_groups=4).compute()
    np.testing.assert_allclose(accuracy, [0.5, 1.0, np.nan, 2 / 3])


def _brute_force_jaccard(groups: np.ndarray, labels: np.ndarray, exclude=()) -> list[float]:
    pixels = [(i, j) for i in range(labels.shape[0]) for j in range(labels.shape[1]) if labels[i, j] != 255]
    out = []
    for segment in sorted({labels[p] for p in pixels} - set(exclude)):
        s = {p for p in pixels if labels[p] == segment}
        best = 0.0
        for group in {groups[p] for p in pixels}:
            g = {p for p in pixels if groups[p] == group}
            best = max(best, len(s & g) / len(s | g))
        out.append(best)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_segment_jaccard_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, (7, 9))
    labels[rng.random(labels.shape) < 0.15] = 255
    groups = rng.integers(0, 3, (7, 9))
    np.testing.assert_allclose(metrics.segment_jaccard(groups, labels), _brute_force_jaccard(groups, labels))
    np.testing.assert_allclose(metrics.segment_jaccard(groups, labels, exclude=(0,)),
                               _brute_force_jaccard(groups, labels, exclude=(0,)))


def test_segment_jaccard_perfect_and_merged_groups():
    labels = np.asarray([[0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_allclose(metrics.segment_jaccard(labels + 7, labels), [1.0, 1.0])
    np.testing.assert_allclose(metrics.segment_jaccard(np.zeros_like(labels), labels), [0.5, 0.5])


@pytest.mark.parametrize(("classes", "clusters", "seed"), [(5, 5, 0), (4, 4, 1), (3, 6, 2)])
def test_hungarian_matching_equals_brute_force(classes, clusters, seed):
    confusion = np.random.default_rng(seed).integers(0, 100, (classes, clusters))
    matched = metrics.hungarian_match(confusion)
    best = max(itertools.permutations(range(clusters), classes),
               key=lambda p: confusion[np.arange(classes), list(p)].sum())
    assert confusion[np.arange(classes), matched].sum() == confusion[np.arange(classes), list(best)].sum()
    assert len(set(matched.tolist())) == classes


def test_metrics_merge_across_two_hosts(tmp_path):
    """Two JAX processes each hold half of the data; the merged metrics equal the single-host ones."""
    rng = np.random.default_rng(3)
    labels, predictions = _random_maps(rng, (4, 9, 11))
    np.savez(tmp_path / "data.npz", labels=labels, predictions=predictions)
    script = textwrap.dedent(f"""
        import sys
        import jax
        import numpy as np
        from clu import metrics as clu_metrics
        from clippy_jax.evaluate import metrics
        jax.distributed.initialize("127.0.0.1:{{port}}", num_processes=2, process_id=int(sys.argv[1]))
        data = np.load("{tmp_path}/data.npz")
        half = slice(2 * jax.process_index(), 2 * jax.process_index() + 2)
        confusion = metrics.ConfusionMatrix.from_model_output(
            predictions=data["predictions"][half], labels=data["labels"][half], num_classes={C})
        average = clu_metrics.Average.from_model_output(values=np.arange(3.0) + 10 * jax.process_index())
        confusion, average = metrics.merge_across_hosts(confusion), metrics.merge_across_hosts(average)
        np.save("{tmp_path}/out_%d.npy" % jax.process_index(), confusion.compute())
        print("average", float(average.compute()))
    """)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, "-c", script.format(port=port), str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    single = metrics.ConfusionMatrix.from_model_output(predictions=predictions, labels=labels, num_classes=C)
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"out_{i}.npy"), single.compute())
        assert "average 6.0" in outputs[i][0]  # mean of 0, 1, 2, 10, 11, 12
