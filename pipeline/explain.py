"""DVC stage `explain` (IKI): kept findings -> label texts with knowledge-dictionary explanations."""

from pathlib import Path

import pyarrow.parquet as pq

from medfilip.config import load_params
from medfilip.errors import for_people
from medfilip.explain import build_labels
from medfilip.knowledge import knowledge_base
from medfilip.normal import load_normal_statements
from medfilip.reporting import write_json
from medfilip.vocab import load_vocabulary

if __name__ == "__main__":
    with for_people("explain"):  # expected failures: one sentence, exit 1 (MEDFILIP_DEBUG=1: traceback)
        params = load_params()
        explanations, knowledge_report = knowledge_base(params.knowledge, load_vocabulary(params.normalize.vocabulary))
        labels, texts, summary = build_labels(
            pq.read_table("data/processed/triplets.parquet"),
            pq.read_table("data/interim/studies.parquet"),
            pq.read_table("data/interim/extraction_status.parquet"),  # timing-free: see dvc.yaml
            {category: e.text for category, e in explanations.items()},
            params.explain,
            extract=params.extract,  # normal statements are read in the text the extractor saw
            normal_statements=load_normal_statements(params.explain.normal_statements),
        )
        pq.write_table(labels, "data/processed/labels.parquet")
        pq.write_table(texts, "data/processed/texts.parquet")
        write_json(Path("reports/explain.json"), {**summary, "knowledge": knowledge_report})
        print(f"explain: {summary['n_labels']} labels, {summary['n_unique_texts']} unique texts, "
              f"{summary['n_studies_normal_label']} normal studies, unlabelled {summary['unlabelled_by_reason']}")
