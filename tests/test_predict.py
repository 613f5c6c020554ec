"""``medfilip predict``: zero-shot scores of PNG/JPEG/DICOM files with a tiny model saved offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfilip import cli
from medfilip.config import load_params
from medfilip.knowledge import knowledge_base
from medfilip.model import MedFILIP, ModelConfig, load, load_tokenizer, save
from medfilip.packaged import package_file
from medfilip.pixels import load_image, resize_square, to_uint8
from medfilip.predict import parse_user_class, select_classes
from medfilip.prompts import class_prompts
from medfilip.vocab import load_vocabulary

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"


@pytest.fixture(autouse=True)
def _project_root(monkeypatch):
    # params.yaml names the dictionary and vocabulary relative to the project root.
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    m = MedFILIP(ModelConfig(image_encoder="resnet-small", image_size=32, embed_dim=16))
    return save(m, tmp_path_factory.mktemp("model") / "medfilip", tokenizer=load_tokenizer(m.cfg))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:80, 0:60]  # not square: predict letterboxes like the pixels stage
    body = 120 + 60 * np.sin(xx / 9) * np.cos(yy / 13) + rng.normal(0, 10, xx.shape)
    grey = np.clip(body, 0, 255).astype(np.uint8)
    paths = {"png": folder / "a.png", "jpg": folder / "b.jpg", "corrupt": folder / "x.png",
             "missing": folder / "missing.png"}
    Image.fromarray(grey).save(paths["png"])
    Image.fromarray(np.stack([grey, grey[::-1], grey], axis=-1)).save(paths["jpg"], quality=90)  # RGB JPEG
    paths["corrupt"].write_bytes(b"this is not a PNG \x00\x01\x02" * 10)
    return paths


def _seen_classes() -> list[str]:
    params = load_params(PARAMS)
    explanations, _ = knowledge_base(params.knowledge, load_vocabulary(params.normalize.vocabulary))
    return [c for c, e in explanations.items() if not e.unseen]


def _predict_json(capsys, model_dir: Path, *args) -> tuple[int, dict, str]:
    rc = cli.main(["predict", *map(str, args), "--model", str(model_dir), "--params", str(PARAMS),
                   "--format", "json"])
    out, err = capsys.readouterr()
    return rc, json.loads(out), err


def test_json_scores_every_class_and_reports_bad_images_without_stopping(capsys, model_dir, images):
    rc, doc, err = _predict_json(capsys, model_dir, images["png"], images["missing"], images["jpg"],
                                 images["corrupt"])
    assert rc == 1
    assert doc["model"] == str(model_dir) and doc["prompt"] == "explanation"
    by_path = {entry["path"]: entry for entry in doc["images"]}
    assert list(by_path) == [str(images[k]) for k in ("png", "missing", "jpg", "corrupt")]
    seen = _seen_classes()
    for key in ("png", "jpg"):
        scores = by_path[str(images[key])]["scores"]
        assert sorted(scores) == sorted(seen)
        assert all(-1.0 <= s <= 1.0 for s in scores.values())
        assert list(scores.values()) == sorted(scores.values(), reverse=True)
    for key in ("missing", "corrupt"):
        entry = by_path[str(images[key])]
        assert "scores" not in entry and str(images[key]) in entry["error"]
        assert str(images[key]) in err
    assert "Traceback" not in err


def test_scores_of_an_image_do_not_depend_on_the_other_images(capsys, model_dir, images):
    rc, alone, _ = _predict_json(capsys, model_dir, images["png"])
    assert rc == 0
    rc, together, _ = _predict_json(capsys, model_dir, images["jpg"], images["png"], images["jpg"])
    assert rc == 0
    assert together["images"][1]["scores"] == alone["images"][0]["scores"]


def test_scores_are_the_cosine_of_the_stored_pixels_and_the_prompts(capsys, model_dir, images):
    """Slow obvious twin: decode as the pixels stage does, embed, normalise, dot."""
    classes = ["pneumothorax", "cardiomegaly", "covid-19"]  # covid-19: an unseen class, by name
    rc, doc, _ = _predict_json(capsys, model_dir, images["png"], "--classes", *classes)
    assert rc == 0
    params = load_params(PARAMS)
    explanations, _ = knowledge_base(params.knowledge, load_vocabulary(params.normalize.vocabulary))
    prompts = class_prompts(classes, "explanation", {c: e.text for c, e in explanations.items()}, params.explain)
    model = load(model_dir)
    size = max(params.pixels.image_size, model.cfg.image_size)
    pixels = resize_square(to_uint8(load_image(images["png"])), size)
    image = model.embed_images([pixels])[0].double()
    texts = model.embed_texts(prompts, model.tokenizer).double()
    expected = {c: float(image @ t / (image.norm() * t.norm())) for c, t in zip(classes, texts)}
    got = doc["images"][0]["scores"]
    assert sorted(got) == sorted(classes)
    for c in classes:
        assert got[c] == pytest.approx(expected[c], abs=1e-5)


def test_real_dicom_is_scored(capsys, model_dir):
    dicom = package_file("data_store", "data/RG1_UNCR.dcm")  # pydicom-data, found without the network
    if dicom is None:
        pytest.skip("RG1_UNCR.dcm not found: pip install pydicom-data to run this test")
    rc, doc, err = _predict_json(capsys, model_dir, dicom)
    assert rc == 0, err
    assert sorted(doc["images"][0]["scores"]) == sorted(_seen_classes())


def test_user_class_is_added_with_its_explanation(capsys, model_dir, images):
    rc, doc, _ = _predict_json(capsys, model_dir, images["png"], "--classes", "pneumothorax",
                               "--class", "rib fracture=a sharp lucent line through the cortex of a rib.",
                               "--class", "my thing = a round opacity.", "--prompt", "explanation")
    assert rc == 0
    assert sorted(doc["images"][0]["scores"]) == ["my thing", "pneumothorax", "rib fracture"]


def test_table_prints_each_image_path_and_its_top_classes(capsys, model_dir, images):
    rc = cli.main(["predict", str(images["png"]), str(images["jpg"]), str(images["missing"]),
                   "--model", str(model_dir), "--params", str(PARAMS), "--top", "2", "--prompt", "template"])
    out, err = capsys.readouterr()
    assert rc == 1
    for key in ("png", "jpg", "missing"):
        assert str(images[key]) in out
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 3
    assert [len(b.splitlines()) for b in blocks] == [3, 3, 2]  # path + 2 classes; path + error
    assert "image file not found" in blocks[2] and str(images["missing"]) in err


def test_missing_model_is_one_sentence_naming_the_path(capsys, tmp_path, images):
    missing = tmp_path / "no-model-here"
    rc = cli.main(["predict", str(images["png"]), "--model", str(missing), "--params", str(PARAMS)])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and str(missing) in err
    assert "Traceback" not in err


def test_unknown_class_lists_close_names(capsys, model_dir, images):
    rc = cli.main(["predict", str(images["png"]), "--model", str(model_dir), "--params", str(PARAMS),
                   "--classes", "pneumothrax"])
    _, err = capsys.readouterr()
    assert rc == 1 and "'pneumothrax'" in err and "pneumothorax" in err and "Traceback" not in err


def test_user_class_spec_must_be_name_equals_explanation():
    assert parse_user_class(" rib  fracture = a break. ") == ("rib fracture", "a break.")
    for bad in ("no equals sign", "=only text", "name="):
        with pytest.raises(ValueError, match="name=explanation"):
            parse_user_class(bad)


def test_select_classes_defaults_to_seen_and_lets_a_user_class_override():
    params = load_params(PARAMS)
    explanations, _ = knowledge_base(params.knowledge, load_vocabulary(params.normalize.vocabulary))
    classes, texts = select_classes(explanations, None, [("pneumothorax", "my own words.")])
    assert classes == _seen_classes()  # an existing name is not added twice
    assert "covid-19" not in classes and texts["pneumothorax"] == "my own words."
