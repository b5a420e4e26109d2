"""The embedded default classifier, built once into tmp: accuracy, save/load, batching, decoding."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.classifier import ImageClassifier, decode_image
from training.classifier_default import build, digits_images, tiny_backbone

MB = 8 << 20


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("classifier")
    return out, build(out, seed=0)


@pytest.fixture(scope="module")
def model(built: tuple[Path, dict]) -> ImageClassifier:
    return ImageClassifier.from_pretrained(built[0])


@pytest.fixture(scope="module")
def digits() -> list[Image.Image]:
    images, _ = digits_images()
    return images[:16]


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, with no pixel data: a bomb's header."""
    def chunk(kind: bytes, body: bytes = b"") -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT") + chunk(b"IEND")


def test_build_is_accurate_and_writes_the_layout(built: tuple[Path, dict]):
    out, metrics = built
    assert {p.name for p in out.iterdir()} >= {"backbone", "head.json", "head.safetensors"}
    assert (out / "backbone" / "config.json").exists() and (out / "backbone" / "model.safetensors").exists()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # nothing pickled
    assert (metrics["n_train"], metrics["n"]) == (1347, 450)
    assert metrics["accuracy"] >= 0.8  # 0.896 measured; chance is 0.1
    assert metrics["train_accuracy"] >= metrics["accuracy"] - 0.05
    assert json.loads((out / "training.json").read_text())["accuracy"] == metrics["accuracy"]
    assert np.array(metrics["confusion"]).sum() == 450


def test_backbone_is_seeded(model: ImageClassifier):
    # the head is a deterministic fit (lbfgs, seeded split) on this backbone's embeddings
    saved = model.backbone.state_dict()
    again = tiny_backbone(0).state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert not torch.equal(tiny_backbone(1).embeddings.patch_embeddings.projection.weight,
                           saved["embeddings.patch_embeddings.projection.weight"])


def test_round_trip_gives_identical_probabilities(model: ImageClassifier, digits, tmp_path: Path):
    model.save_pretrained(tmp_path)
    again = ImageClassifier.from_pretrained(tmp_path)
    assert again.classify(digits) == model.classify(digits)  # exact, labels and probabilities
    assert again.info() | {"backbone": None} == model.info() | {"backbone": None}


def test_backbone_override(built: tuple[Path, dict], model: ImageClassifier, digits, tmp_path: Path):
    (tmp_path / "head.json").write_bytes((built[0] / "head.json").read_bytes())
    (tmp_path / "head.safetensors").write_bytes((built[0] / "head.safetensors").read_bytes())
    split = ImageClassifier.from_pretrained(tmp_path, backbone=str(built[0] / "backbone"))
    assert split.info()["backbone"] == str(built[0] / "backbone")
    assert split.classify(digits[:2]) == model.classify(digits[:2])


@pytest.mark.parametrize("change, message", [
    ({"pooling": "max"}, "pooling is 'max'; use 'cls' or 'mean'"),
    ({"embedding_dim": 32}, "do not fit a backbone of width 64"),
    ({"labels": ["a", "b"]}, "2 labels do not fit"),
])
def test_bad_head_fails_at_load(built: tuple[Path, dict], tmp_path: Path, change: dict, message: str):
    head = json.loads((built[0] / "head.json").read_text()) | change
    (tmp_path / "head.json").write_text(json.dumps(head))
    (tmp_path / "head.safetensors").write_bytes((built[0] / "head.safetensors").read_bytes())
    with pytest.raises(ValueError, match=message):
        ImageClassifier.from_pretrained(tmp_path, backbone=str(built[0] / "backbone"))


def test_predictions_are_distributions_led_by_the_label(model: ImageClassifier, digits):
    for pred in model.classify(digits):
        probs = list(pred.probabilities.values())
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert probs == sorted(probs, reverse=True)
        assert pred.label == max(pred.probabilities, key=pred.probabilities.get)
    assert len({p.label for p in model.classify(digits)}) > 3  # not one class for everything


def test_batch_and_single_agree(model: ImageClassifier, digits):
    batch = model.classify(digits, batch_size=16)
    for image, b in zip(digits, batch):
        single = model.classify([image])[0]
        assert single.label == b.label
        for label, p in single.probabilities.items():
            assert p == pytest.approx(b.probabilities[label], abs=1e-5)
    chunked = model.embed(digits, batch_size=5)
    assert torch.allclose(chunked, model.embed(digits), atol=1e-5)
    assert chunked.shape == (16, model.info()["embedding_dim"])
    assert model.classify([]) == [] and model.embed([]).shape == (0, 64)


def test_info_and_pooling_choice(model: ImageClassifier):
    info = model.info()
    assert info["labels"] == [str(i) for i in range(10)]
    assert (info["pooling"], info["embedding_dim"], info["device"]) == ("mean", 64, "cpu")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_accepts_png_and_jpeg(fmt: str):
    src = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 12), mode="L")
    img = decode_image(encode(src, fmt), MB, 1000)
    assert (img.mode, img.size) == ("RGB", (12, 4))


def test_decode_converts_rgba_and_palette():
    for mode in ("RGBA", "P"):
        assert decode_image(encode(Image.new(mode, (3, 3)), "PNG"), MB, 100).mode == "RGB"


@pytest.mark.parametrize("data, limits, message", [
    (b"hello, not an image", (MB, 100), "not a PNG or JPEG image"),
    (encode(Image.new("RGB", (4, 4)), "GIF"), (MB, 100), "not a PNG or JPEG image"),
    (encode(Image.new("RGB", (4, 4)), "BMP"), (MB, 100), "not a PNG or JPEG image"),
    (b"\0" * 101, (100, 100), "image is 101 bytes; the limit is 100"),
    (encode(Image.new("RGB", (20, 10)), "PNG"), (MB, 199), "image has 200 pixels; the limit is 199"),
    (png_header(5000, 5000), (MB, 4096 * 4096), "image has 25000000 pixels; the limit is 16777216"),
    (png_header(20000, 20000), (MB, 4096 * 4096), r"image has more than \d+ pixels; the limit is 16777216"),
    (encode(Image.new("RGB", (64, 64)), "PNG")[:60], (MB, 4096), "PNG image could not be decoded"),
])
def test_decode_rejects(data: bytes, limits: tuple[int, int], message: str):
    with pytest.raises(ValueError, match=message):
        decode_image(data, *limits)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree: 20 digits each of 0, 1 and 7, PNG and JPEG, plus a file that is no image."""
    root = tmp_path_factory.mktemp("images")
    images, y = digits_images()
    for label in (0, 1, 7):
        (root / f"digit{label}").mkdir()
        for k, i in enumerate(np.flatnonzero(y == label)[:20]):
            fmt = "PNG" if k % 2 else "JPEG"
            images[i].resize((32, 32)).save(root / f"digit{label}" / f"{k}.{fmt.lower()}", format=fmt)
    (root / "digit0" / "notes.txt").write_text("not an image")
    return root


def test_training_on_an_image_folder(built: tuple[Path, dict], folder: Path, tmp_path: Path):
    from training.classifier import main

    metrics = main(str(folder), str(tmp_path), str(built[0]), "cls", 0.25, 0, "cpu")
    assert (metrics["n"], metrics["n_train"]) == (15, 45)  # stratified: 5 of each label held out
    assert metrics["accuracy"] >= 0.8 and metrics["pooling"] == "cls"  # 0, 1 and 7 are easy apart
    assert np.array(metrics["confusion"]).shape == (3, 3)
    model = ImageClassifier.from_pretrained(tmp_path)
    assert model.info()["labels"] == ["digit0", "digit1", "digit7"] and model.info()["pooling"] == "cls"
    assert json.loads((tmp_path / "training.json").read_text())["accuracy"] == metrics["accuracy"]
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pkl"))
    # the backbone was taken from the given classifier directory, unchanged
    again = ImageClassifier.from_pretrained(built[0])
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                  again.backbone.state_dict().values()))


def test_image_folder_needs_two_labels_of_two_images(tmp_path: Path):
    from training.classifier import image_folder

    (tmp_path / "only").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "only" / "a.png")
    with pytest.raises(ValueError, match="at least two label folders"):
        image_folder(tmp_path)
    with pytest.raises(ValueError, match="at least two label folders"):
        image_folder(tmp_path / "missing")


def test_a_pooling_the_head_was_not_fitted_on_fails_at_start(built: tuple[Path, dict]):
    from deployments.config import ClassifierBackend
    from deployments.dinov2 import ClassifierServer

    cap = {"modalities": ["image"], "max_context": 1, "tasks": {"image_classification": 1.0}}
    cfg = ClassifierBackend(name="d", kind="classifier", model=str(built[0]), capability=cap, pooling="cls")
    with pytest.raises(ValueError, match="fitted on 'mean' embeddings"):
        ClassifierServer(cfg)


def test_committed_default_is_pretrained_and_its_held_out_accuracy_is_reproduced():
    from training import linear_probe
    from models.checkpoints import EMBEDDED_DIR, resolve_model

    path = EMBEDDED_DIR / "tiny-dinov2"
    report = json.loads((path / "training.json").read_text())
    assert resolve_model("embedded:tiny-dinov2") == str(path)
    assert report["pretrain_steps"] > 0 and report["accuracy"] >= 0.9 and report["command"]
    model = ImageClassifier.from_pretrained(path)
    images, y = digits_images()
    _, test = linear_probe.split(y, 0.25, report["seed"])  # the held-out quarter, never seen in pretraining
    pred = np.array([int(p.label) for p in model.classify([images[i] for i in test])])
    assert float((pred == y[test]).mean()) == pytest.approx(report["accuracy"], abs=1e-3)


def test_pretraining_views_and_a_few_steps(tmp_path: Path):
    from training.classifier_default import pretrain, views

    digits = torch.rand(8, 8, 8)
    g = torch.Generator().manual_seed(0)
    v = views(digits, g)
    assert v.shape == (8, 3, 32, 32) and not torch.equal(v, views(digits, g))  # two draws differ
    backbone = tiny_backbone(0)
    before = backbone.embeddings.patch_embeddings.projection.weight.clone()
    losses = pretrain(backbone, digits, steps=2, seed=0, pooling="mean", batch=4)
    assert len(losses) == 2 and all(np.isfinite(losses)) and not backbone.training
    assert not torch.equal(before, backbone.embeddings.patch_embeddings.projection.weight)
