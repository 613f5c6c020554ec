from pathlib import Path

import pytest
import yaml

from medfilip.config import ConfigError, Params, load_params

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "phantom"
    assert params.pixels.image_size > 0


def test_project_params_mention_every_section():
    # params.yaml is the user's documentation of the knobs: every section appears there.
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    import dataclasses

    assert set(raw) == {f.name for f in dataclasses.fields(Params)}


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "pixels:\n  image_sise: 224\n")
    with pytest.raises(ConfigError, match=r"pixels\.image_sise") as err:
        load_params(path)
    assert str(path) in str(err.value)
    assert "image_size" in str(err.value)  # says what is allowed


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        load_params(write(tmp_path, "trian:\n  lr: 1\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("pixels:\n  image_size: big\n", "pixels.image_size"),
        ("pixels:\n  image_size: 22.5\n", "pixels.image_size"),
        ("pixels:\n  on_error: ignore\n", "pixels.on_error"),
        ("data:\n  split:\n    seed: true\n", "data.split.seed"),
        ("data:\n  split:\n    use_source_split: 'yes'\n", "data.split.use_source_split"),
        ("data:\n  source: dicomweb\n", "data.source"),
        ("data:\n  manifest:\n    path: 3\n", "data.manifest.path"),
        ("phantom: 5\n", "phantom"),
    ],
)
def test_wrong_type_names_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(write(tmp_path, text))


def test_split_fractions_must_sum_to_one(tmp_path):
    with pytest.raises(ConfigError, match="data.split"):
        load_params(write(tmp_path, "data:\n  split:\n    train: 0.9\n    val: 0.2\n    test: 0.1\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("extract:\n  max_report_chars: 0\n", "extract.max_report_chars"),  # would empty every report
        ("extract:\n  max_report_chars: -1\n", "extract.max_report_chars"),
        ("extract:\n  max_report_chars: 40\n", "extract.max_report_chars"),  # cuts off the impression
        ("extract:\n  max_failure_fraction: 1.5\n", "extract.max_failure_fraction"),
        ("normalize:\n  top_oov: -1\n", "normalize.top_oov"),
        ("explain:\n  normal_label: ''\n", "explain.normal_label"),
    ],
)
def test_invalid_values_refused_at_load(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_params(path)
    assert str(path) in str(err.value)


def test_int_accepted_for_float_and_defaults_fill_in(tmp_path):
    params = load_params(write(tmp_path, "data:\n  split:\n    train: 1\n    val: 0\n    test: 0\n"))
    assert params.data.split.train == 1.0 and isinstance(params.data.split.train, float)
    assert params.phantom.n_patients == Params().phantom.n_patients


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "data: [unclosed\n"))


def test_cli_params_reports_error(tmp_path, capsys):
    from medfilip.cli import main

    assert main(["params", "--file", str(write(tmp_path, "pixels:\n  workers: two\n"))]) == 2
    assert "pixels.workers" in capsys.readouterr().err


def test_an_extra_evaluation_set_must_name_what_dvc_watches(tmp_path):
    """evaluate-extra depends on ${item.root}/${item.metadata}; without the key DVC cannot even parse dvc.yaml."""
    path = tmp_path / "params.yaml"
    path.write_text("evaluate:\n  datasets:\n    nih:\n      source: manifest\n      root: data/raw/nih\n")
    with pytest.raises(ConfigError, match=r"evaluate.datasets.nih.metadata is required"):
        load_params(path)
    path.write_text("evaluate:\n  datasets:\n    nih:\n      source: manifest\n      root: data/raw/nih\n"
                    "      metadata: labels.csv\n")
    assert load_params(path).evaluate.datasets["nih"].metadata == "labels.csv"
