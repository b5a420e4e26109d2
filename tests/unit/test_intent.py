"""The text intent classifier: the numpy TF-IDF against scikit-learn's, training, the saved files,
the MiniLM encoder and its checksum, and the linear-probe helpers both classifiers share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.intent import MINILM_SHA256, IntentClassifier, SentenceEncoder, Tfidf, analyze, minilm_dir, sha256
from routing.config import TASKS
from training import linear_probe
from training.intent import DATA, read, train


@pytest.fixture(scope="module")
def tfidf(tmp_path_factory) -> tuple[IntentClassifier, dict, Path]:
    out = tmp_path_factory.mktemp("intent")
    model, metrics = train(encoder="tfidf", out=out)
    return model, metrics, out


def test_the_labelled_file_covers_the_text_tasks():
    texts, tasks = read(DATA)
    counts = {t: tasks.count(t) for t in set(tasks)}
    assert len(texts) >= 300 and len(set(texts)) == len(texts)
    assert set(counts) <= set(TASKS) and len(counts) >= 7 and min(counts.values()) >= 40


def test_numpy_tfidf_equals_scikit_learns():
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts, _ = read(DATA)
    vec = TfidfVectorizer(analyzer=analyze, sublinear_tf=True).fit(texts[:200])
    ours = Tfidf(vec.vocabulary_, vec.idf_)
    probe = texts[200:260] + ["", "zzzz qqqq", "Fix   the\tBUG\n in def f(x):"]
    np.testing.assert_allclose(ours(probe), vec.transform(probe).toarray(), atol=1e-6)


def test_analyze_keeps_words_bigrams_and_character_grams_apart():
    feats = analyze("Fix a bug")
    assert "fix" in feats and "#fix" in feats and "a" not in feats  # a word has two characters or more
    assert "fix bug" in feats and "# a " in feats and "# bug " in feats and "#bug" in feats


def test_training_reports_held_out_figures_and_saves_no_pickle(tfidf):
    model, metrics, out = tfidf
    assert {p.name for p in out.iterdir()} == {"intent.json", "intent.safetensors", "vocabulary.json",
                                                "training.json"}
    assert json.loads((out / "training.json").read_text())["command"].endswith("--encoder tfidf --seed 0")
    n = len(read(DATA)[0])
    assert metrics["n"] + metrics["n_train"] == n and metrics["n"] == pytest.approx(n / 4, abs=4)
    assert metrics["accuracy"] > 0.5  # 0.76 measured; chance is 1/7
    assert np.array(metrics["confusion"]).sum() == metrics["n"]
    saved = json.loads((out / "intent.json").read_text())
    assert saved["metrics"]["accuracy"] == metrics["accuracy"] and saved["labels"] == sorted(saved["labels"])


def test_round_trip_gives_identical_probabilities(tfidf):
    model, _, out = tfidf
    again = IntentClassifier.load(out)
    texts = ["write a haiku about rain", "my loop never ends, why?", "solve this 9x9 grid"]
    np.testing.assert_array_equal(again.probabilities(texts), model.probabilities(texts))
    guess = again.predict(texts[0])
    assert guess.task in model.config.labels and 0 < guess.confidence <= 1


@pytest.mark.parametrize("line, message", [
    ("not json", "1: not JSON"),
    ('{"text": "hi"}', "task None is not one of"),
    ('{"text": "hi", "task": "poetry"}', "task 'poetry' is not one of"),
    ('{"text": "", "task": "reasoning"}', "needs a non-empty string `text`"),
    ('["hi", "reasoning"]', "needs a non-empty string `text`"),
])
def test_bad_records_are_named_by_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read(path)


def test_one_task_is_not_enough(tmp_path: Path):
    path = tmp_path / "one.jsonl"
    path.write_text('{"text": "a", "task": "reasoning"}\n{"text": "b", "task": "reasoning"}\n')
    with pytest.raises(ValueError, match="at least two tasks"):
        read(path)


def test_minilm_is_checked_against_its_sha256(tmp_path: Path):
    assert sha256(minilm_dir() / "model.safetensors") == MINILM_SHA256
    (tmp_path / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ValueError, match="not the expected"):
        SentenceEncoder(tmp_path)


def test_minilm_embeddings_are_unit_vectors_that_know_paraphrases():
    enc = SentenceEncoder(minilm_dir())
    x = enc(["How do I reverse a list in Python?", "Reversing a Python list: how?", "Best beaches in Portugal"])
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert x.shape == (3, 384) and x[0] @ x[1] > x[0] @ x[2] + 0.3


def test_fit_folds_the_scaler_into_the_head():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(3, [1, 10, 0.1], size=(120, 3))
    y = (x @ [1, 0.1, 10] > 9.5).astype(int) + (x[:, 0] > 4)
    weight, bias = linear_probe.fit(x, y, C=1.0, standardize=True)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)).fit(x, y)
    logits = x @ weight.T + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(p / p.sum(1, keepdims=True), ref.predict_proba(x), atol=1e-4)


def test_two_classes_become_two_softmax_rows():
    x = np.array([[0.0], [1.0], [2.0], [3.0]])
    weight, bias = linear_probe.fit(x, np.array([0, 0, 1, 1]), C=1.0, standardize=False)
    logits = x @ weight.T + bias
    assert weight.shape == (2, 1) and (logits.argmax(1) == [0, 0, 1, 1]).all()


def test_report_table_and_figures():
    metrics, table = linear_probe.report(["a", "b"], np.array([0, 0, 1]), np.array([0, 1, 1]))
    assert metrics["accuracy"] == pytest.approx(0.6667, abs=1e-4) and metrics["recall"] == {"a": 0.5, "b": 1.0}
    assert metrics["confusion"] == [[1, 1], [0, 1]]
    assert table.splitlines()[1].split() == ["a", "1", "1"]


def test_the_committed_default_reproduces_its_held_out_accuracy():
    from models.checkpoints import EMBEDDED_DIR, resolve_model

    path = EMBEDDED_DIR / "intent"
    report = json.loads((path / "training.json").read_text())
    assert resolve_model("embedded:intent") == str(path) and report["accuracy"] >= 0.9
    model = IntentClassifier.load(path)
    assert (model.config.encoder, model.config.int8) == ("minilm+tfidf", True)
    texts, tasks = read(DATA)
    y = np.array([model.config.labels.index(t) for t in tasks])
    _, test = linear_probe.split(y, report["test_fraction"], report["seed"])
    pred = model.probabilities([texts[i] for i in test]).argmax(1)
    assert float((pred == y[test]).mean()) == pytest.approx(report["accuracy"], abs=1e-3)

