"""The controlled vocabulary: loading, its errors, and free text -> canonical category/severity/location."""

from pathlib import Path

import pytest
import yaml

from medfilip.data.phantom_findings import CATEGORIES as PHANTOM_CATEGORIES
from medfilip.data.phantom_findings import LOCATIONS as PHANTOM_LOCATIONS
from medfilip.vocab import (
    DEFAULT_VOCABULARY,
    SEVERITIES,
    VocabularyError,
    load_vocabulary,
    normalize_text,
    plural_forms,
)

CHEXPERT_14 = (
    "no finding", "enlarged cardiomediastinum", "cardiomegaly", "lung opacity", "lung lesion", "pulmonary edema",
    "consolidation", "pneumonia", "atelectasis", "pneumothorax", "pleural effusion", "pleural other", "fracture",
    "support device",
)


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


def test_default_vocabulary_covers_chexpert_phantom_and_openi_findings(vocab):
    assert 40 <= len(vocab.categories) <= 70
    for category in (*CHEXPERT_14, *PHANTOM_CATEGORIES):
        assert category in vocab.categories, category
    for category in ("calcified granuloma", "granuloma", "scarring", "hyperinflation", "degenerative spine",
                     "scoliosis", "hiatal hernia", "mass", "infiltrate", "interstitial markings", "calcinosis",
                     "tortuous aorta", "atherosclerosis", "fibrosis", "bronchiectasis", "cyst",
                     "diaphragm elevation", "osteophyte"):
        assert category in vocab.categories, category
    assert vocab.group_of("consolidation") == vocab.group_of("pneumonia") == "lung opacity"
    assert vocab.group_of("pleural effusion") == "pleural"
    assert not vocab.is_abnormal("no finding") and vocab.is_abnormal("pneumothorax")
    assert len(vocab.groups) < len(vocab.categories) / 2


def test_mention_phrases_hold_no_severity_words(vocab):
    """Severity is read from the words around a mention; a synonym must not swallow one."""
    for category in vocab.categories:
        severity_words = set(vocab.severity_words(category))
        for phrase in vocab.info[category].synonyms:
            words = phrase.split()
            grams = {" ".join(words[i:i + n]) for n in (1, 2, 3, 4) for i in range(len(words) - n + 1)}
            assert not grams & severity_words, (category, phrase)


@pytest.mark.parametrize("text, category", [
    ("pleural effusion", "pleural effusion"),
    ("Pleural Effusions", "pleural effusion"),  # case + plural
    ("pleural efusion", "pleural effusion"),  # misspelling
    ("cardiomegally", "cardiomegaly"),
    ("atelectases", "atelectasis"),
    ("opacities", "lung opacity"),
    ("pneumothoraces", "pneumothorax"),
    ("granulomata", "granuloma"),
    ("calcified granulomas", "calcified granuloma"),
    ("COVID-19", "covid-19"),
    ("covid 19", "covid-19"),
    ("PTX", "pneumothorax"),  # abbreviation
    ("COPD", "emphysema"),
    ("ET tube", "support device"),
    ("vascular congestion", "pulmonary edema"),
    ("airspace disease", "consolidation"),
    ("small left-sided pleural effusion", "pleural effusion"),  # longest known phrase inside a longer text
    ("mild bibasilar subsegmental atelectasis", "atelectasis"),
    ("degenerative changes of the thoracic spine", "degenerative spine"),
    ("  Hiatal   hernia. ", "hiatal hernia"),
])
def test_category_of_free_text(vocab, text, category):
    assert vocab.category_of(text) == category


@pytest.mark.parametrize("text", ["", None, "xyz", "the patient", "heart", "normal size"])
def test_category_of_unknown_is_none(vocab, text):
    assert vocab.category_of(text) is None


def test_every_synonym_and_category_name_maps_to_itself(vocab):
    for category in vocab.categories:
        assert vocab.category_of(category) == category
        for phrase in vocab.info[category].synonyms:
            assert vocab.category_of(phrase) == category, phrase


@pytest.mark.parametrize("text, level", [
    ("mild", "mild"), ("trace", "mild"), ("small", "mild"), ("tiny", "mild"), ("minimal", "mild"),
    ("slightly", "mild"), ("subtle", "mild"), ("borderline", "mild"), ("moderate-sized", "moderate"),
    ("moderately", "moderate"), ("large", "severe"), ("extensive", "severe"), ("massive", "severe"),
    ("markedly", "severe"), ("Severe", "severe"), ("increased", None), ("stable", None), ("", None),
])
def test_severity_of(vocab, text, level):
    assert vocab.severity_of(text) == level


def test_category_severity_words_and_sizes(vocab):
    assert vocab.severity_of("complete", "atelectasis") == "severe"
    assert vocab.severity_of("complete") is None
    assert vocab.severity_of("subsegmental", "atelectasis") == "mild"
    assert vocab.severity_of("8 mm", "nodule") == "mild"
    assert vocab.severity_of("1.6 cm", "nodule") == "moderate"
    assert vocab.severity_of("2.8 cm", "nodule") == "severe"
    assert vocab.severity_of("8 mm", "pleural effusion") is None


def test_change_words_are_kept_apart_from_severity(vocab):
    assert vocab.change_of("increased") == "worsened"
    assert vocab.change_of("interval resolution") == "resolved"
    assert vocab.change_of("unchanged") == "stable"
    assert vocab.change_of("new") == "new"
    assert vocab.severity_of("worsening") is None


@pytest.mark.parametrize("text, location", [
    ("left base", "left lower zone"),
    ("at the left lung base", "left lower zone"),
    ("bibasilar", "bilateral lower zone"),
    ("at both lung bases", "bilateral lower zone"),
    ("in both lower lobes", "bilateral lower zone"),
    ("basilar", "lower zone"),
    ("retrocardiac", "left lower zone"),
    ("lingula", "left middle zone"),
    ("right middle lobe", "right middle zone"),
    ("in the left upper lobe", "left upper zone"),
    ("right apical", "right upper zone"),
    ("bilateral perihilar", "bilateral perihilar"),
    ("left and right", "bilateral"),
    ("left-sided", "left"),
    ("bilaterally", "bilateral"),
    ("left lower zone", "left lower zone"),  # canonical strings are fixed points
    ("mediastinum", None),
    ("", None),
])
def test_location_of(vocab, text, location):
    assert vocab.location_of(text) == location


def test_phantom_locations_are_canonical(vocab):
    for location in PHANTOM_LOCATIONS:
        assert vocab.location_of(location) == location


def test_location_detail_per_category(vocab):
    assert vocab.location_of("left costophrenic angle", "pleural effusion") == "left"
    assert vocab.location_of("right apical", "pneumothorax") == "right"
    assert vocab.location_of("left lower lobe", "consolidation") == "left lower zone"
    assert vocab.location_of("left", "cardiomegaly") is None


def test_plural_forms():
    assert "atelectases" in plural_forms("atelectasis")
    assert "opacities" in plural_forms("opacity")
    assert "pleural effusions" in plural_forms("pleural effusion")
    assert "masses" in plural_forms("mass")
    assert "pneumothoraces" in plural_forms("pneumothorax")
    assert normalize_text(" Left-sided  COVID-19, ") == "left sided covid 19"


def test_category_of_reads_phrases_inside_numbered_text(vocab):
    # Its speed is `medfilip bench vocab`'s business, not a timed assertion here.
    texts = [f"{w} {i}" for i, w in enumerate(["small effusion", "cardiomegaly", "blunting"] * 300)]
    found = [vocab.category_of(t) for t in texts]
    assert set(found[0::3]) == {"pleural effusion"} and set(found[1::3]) == {"cardiomegaly"}
    assert set(found[2::3]) == {None}  # "blunting" alone names no category
    assert found == [vocab.category_of(t) for t in texts]  # no state carried between calls


def test_timed_assertions_live_in_benchmarks_not_tests():
    import ast

    from medfilip.bench import BENCHMARKS

    assert "vocab" in BENCHMARKS
    tree = ast.parse(Path(__file__).read_text())
    timed = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("perf_counter", "monotonic")]
    assert not timed, "a wall-clock assertion in tests/test_vocab.py: move it to `medfilip bench`"


# ----------------------------------------------------------------- errors


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "vocabulary.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _minimal(**categories):
    return {
        "categories": categories or {"pneumothorax": {"group": "air", "synonyms": ["ptx"]}},
        "severity": {s: [s] for s in SEVERITIES},
        "change": {"new": ["new"]},
        "locations": {"sides": {"left": ["left"]}, "zones": {"lower": ["base"]}},
    }


def test_minimal_vocabulary_loads(tmp_path):
    v = load_vocabulary(_write(tmp_path, _minimal()))
    assert v.categories == ("pneumothorax",)
    assert v.category_of("PTX") == "pneumothorax"


def test_missing_file_names_it(tmp_path):
    with pytest.raises(VocabularyError, match="nope.yaml"):
        load_vocabulary(tmp_path / "nope.yaml")


def test_malformed_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "categories: [unclosed\n")
    with pytest.raises(VocabularyError, match="vocabulary.yaml.*not valid YAML"):
        load_vocabulary(path)


def test_synonym_claimed_twice_names_both_categories(tmp_path):
    data = _minimal(**{"pneumothorax": {"group": "air", "synonyms": ["ptx", "air"]},
                       "pneumomediastinum": {"group": "air", "synonyms": ["Air"]}})
    with pytest.raises(VocabularyError, match="synonym 'air' is claimed by both") as err:
        load_vocabulary(_write(tmp_path, data))
    assert "categories.pneumothorax" in str(err.value) and "categories.pneumomediastinum" in str(err.value)


@pytest.mark.parametrize("entry, key", [
    ({"synonyms": ["x"]}, "categories.thing.group"),
    ({"group": "g", "synonyms": "x"}, "categories.thing.synonyms"),
    ({"group": "g", "location": "lobe"}, "categories.thing.location"),
    ({"group": "g", "severity": {"huge": ["x"]}}, "categories.thing.severity.huge"),
    ({"group": "g", "size_mm": [20, 10]}, "categories.thing.size_mm"),
    ({"group": "g", "colour": "red"}, "categories.thing.colour"),
])
def test_malformed_category_names_the_key(tmp_path, entry, key):
    with pytest.raises(VocabularyError, match=key.replace(".", r"\.")):
        load_vocabulary(_write(tmp_path, _minimal(thing=entry)))


def test_bad_location_section_names_the_key(tmp_path):
    data = _minimal()
    data["locations"]["sides"]["middle"] = ["mid"]
    with pytest.raises(VocabularyError, match=r"locations\.sides\.middle"):
        load_vocabulary(_write(tmp_path, data))


def test_default_file_is_the_one_in_data():
    assert DEFAULT_VOCABULARY.name == "vocabulary.yaml" and DEFAULT_VOCABULARY.parent.name == "knowledge"
    assert load_vocabulary() is load_vocabulary(DEFAULT_VOCABULARY)  # parsed once
