"""Expected failures of the stage scripts and the CLI end in a sentence and a non-zero exit, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from medfilip.data.ingest import image_files

ROOT = Path(__file__).resolve().parents[1]
NO_KEY = "MEDFILIP_TEST_KEY_THAT_IS_NOT_SET"
STAGES = sorted(p.stem for p in (ROOT / "pipeline").glob("*.py"))


def _project(tmp_path: Path, **overrides) -> Path:
    """A folder with params.yaml (``section__key`` overrides) and one study, as a stage sees it."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["extract"]["cache"] = str(tmp_path / "llm.sqlite")
    params["llm"]["prompt"] = str(ROOT / params["llm"]["prompt"])
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    interim = tmp_path / "data/interim"
    interim.mkdir(parents=True)
    strings = pa.schema([(c, pa.string()) for c in ("study_id", "patient_id", "split", "report", "findings",
                                                    "impression")])
    pq.write_table(pa.Table.from_pylist([{"study_id": "s1", "patient_id": "p1", "split": "train",
                                          "report": "FINDINGS: Small left pleural effusion.",
                                          "findings": "Small left pleural effusion.", "impression": None}],
                                        schema=strings), interim / "studies.parquet")
    return tmp_path


def _run(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in (NO_KEY, "MEDFILIP_DEBUG")}
    environ.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=300)


def _assert_sentence(proc: subprocess.CompletedProcess, *names: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    for name in names:
        assert name in proc.stderr, proc.stderr
    assert 0 < len(proc.stderr.strip().splitlines()) <= 8, proc.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_names_a_bad_params_key(tmp_path, stage):
    _project(tmp_path, llm__bogus_key=1)
    script = str(ROOT / "pipeline" / f"{stage}.py")
    proc = _run([script, *(["extra"] if stage == "evaluate_extra" else [])], tmp_path)
    _assert_sentence(proc, "llm.bogus_key")


def test_extract_without_its_api_key_names_the_variable(tmp_path):
    _project(tmp_path, llm__provider="openai", llm__model="gpt-test", llm__api_key_env=NO_KEY)
    proc = _run([str(ROOT / "pipeline/extract.py")], tmp_path)
    _assert_sentence(proc, NO_KEY)


def test_pixels_with_a_missing_image_names_the_file(tmp_path):
    _project(tmp_path)
    missing = tmp_path / "images" / "not-there.png"
    images = pa.table({"image_id": ["i1"], "study_id": ["s1"], "path": [str(missing)], "view": ["PA"]})
    pq.write_table(images, tmp_path / "data/interim/images.parquet")
    pq.write_table(image_files(images), tmp_path / "data/interim/image_files.parquet")  # as ingest writes it
    proc = _run([str(ROOT / "pipeline/pixels.py")], tmp_path)
    _assert_sentence(proc, "not-there.png")


def test_a_server_that_does_not_start_is_a_sentence_naming_the_model(tmp_path):
    pytest.importorskip("xllamacpp")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file" * 100)
    _project(tmp_path, llm__provider="llamacpp", llm__llamacpp__gguf=str(bad), llm__llamacpp__startup_timeout_s=60)
    proc = _run([str(ROOT / "pipeline/extract.py")], tmp_path)
    _assert_sentence(proc, "broken.gguf")


def test_a_missing_input_file_says_which_and_how_to_make_it(tmp_path):
    _project(tmp_path)
    (tmp_path / "data/interim/studies.parquet").unlink()
    proc = _run([str(ROOT / "pipeline/extract.py")], tmp_path)
    _assert_sentence(proc, "studies.parquet", "dvc repro")


def test_score_without_a_key_names_the_variable(tmp_path):
    _project(tmp_path, llm__api_key_env=NO_KEY)
    proc = _run(["-m", "medfilip.cli", "score", "--provider", "openai", "--phantom", str(tmp_path)], tmp_path)
    _assert_sentence(proc, NO_KEY)


def test_cli_bad_params_key_is_a_sentence_and_debug_shows_the_traceback(tmp_path):
    _project(tmp_path, pixels__bogus_key=1)
    proc = _run(["-m", "medfilip.cli", "params"], tmp_path)
    _assert_sentence(proc, "pixels.bogus_key")
    debug = _run(["-m", "medfilip.cli", "--debug", "params"], tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "pixels.bogus_key" in debug.stderr
    stage = _run([str(ROOT / "pipeline/pixels.py")], tmp_path, MEDFILIP_DEBUG="1")
    assert stage.returncode != 0 and "Traceback" in stage.stderr


def test_a_bug_keeps_its_traceback():
    from medfilip.errors import for_people

    with pytest.raises(ZeroDivisionError):
        with for_people("stage"):
            1 / 0
