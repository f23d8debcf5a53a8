import numpy as np
import pytest

from jobs.tasks import classification_metrics, get_task


def test_unknown_task_lists_known_names():
    known = "known: causal-lm, sequence-classification"
    with pytest.raises(ValueError, match=f"unknown task 'seq-cls'; {known}"):
        get_task("seq-cls")


def test_metrics_from_confusion():
    # truth rows, prediction columns: class 0: 3 right 1 wrong; class 1: 2 right; class 2: absent
    confusion = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    metrics = classification_metrics(confusion)
    assert metrics["accuracy"] == pytest.approx(5 / 6)
    f1_class0 = 2 * 3 / (3 + 4)
    f1_class1 = 2 * 2 / (3 + 2)
    assert metrics["macro_f1"] == pytest.approx((f1_class0 + f1_class1) / 2)


def test_postprocess_and_label_ids():
    task = get_task("sequence-classification")
    labels, scores = task.postprocess(np.array([[0.0, 2.0], [3.0, 0.0]]), ["a", "b"])
    assert list(labels) == ["b", "a"]
    assert scores[0] == pytest.approx(np.exp(2) / (1 + np.exp(2)))
    assert list(task.target_ids(np.array(["b", "a"], dtype=object), {"a": 0, "b": 1})) == [1, 0]
    with pytest.raises(ValueError, match="label 'z' is not in the label map"):
        task.target_ids(np.array(["z"], dtype=object), {"a": 0})


def _labels_of(confusion: np.ndarray) -> tuple[list[int], list[int]]:
    """(truth, prediction) of every row a confusion matrix counts."""
    pairs = [(t, p) for (t, p), n in np.ndenumerate(confusion) for _ in range(int(n))]
    return [t for t, _ in pairs], [p for _, p in pairs]


@pytest.mark.parametrize(
    "confusion",
    [
        # class 2 is never the truth in this split, but the model predicts it once: it counts,
        # with an F1 of 0 (0.775 when the mean skipped it, against 0.517)
        [[3, 1, 1], [0, 2, 0], [0, 0, 0]],
        [[3, 1, 0], [0, 2, 0], [0, 0, 0]],  # class 2 neither true nor predicted: left out
        [[0, 4, 0], [0, 2, 0], [0, 1, 5]],  # class 0 true but never predicted
    ],
)
def test_macro_f1_is_scikit_learns(confusion):
    from sklearn.metrics import f1_score  # installed with mlflow, which requires it

    confusion = np.array(confusion)
    truth, predicted = _labels_of(confusion)
    metrics = classification_metrics(confusion)
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert metrics["accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
