"""Write the shipped demo set as a BEIR folder: a collection with real text and no negatives.

Every distinct passage of the demo set (positives and negatives) becomes a corpus passage, every question a
query, and each (question, positive) a judgement of grade 1 in ``qrels/train.tsv`` or ``qrels/test.tsv``
by the demo split it comes from. docs/collections.md probes it with mined BM25 negatives:

    python scripts/demo_as_beir.py data/pydocs-beir
    dkacq fit --config configs/probe.yaml --data.source beir --data.path data/pydocs-beir \
              --data.dataset pydocs --data.negatives bm25
"""

import argparse
import gzip
import json
from pathlib import Path

from dkacq.data.examples import DEMO_FILES, EXAMPLE_COLUMNS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    passages: dict[str, str] = {}
    queries: dict[str, str] = {}
    judged: dict[str, dict[tuple[str, str], None]] = {}
    for split, path in DEMO_FILES.items():
        with gzip.open(path, "rt") as file:
            for record in map(json.loads, file):
                for column in EXAMPLE_COLUMNS[1:]:
                    passages.setdefault(record[column], f"p{len(passages)}")
                query = queries.setdefault(record["question"], f"q{len(queries)}")
                judged.setdefault(split, {})[query, passages[record["positive_context"]]] = None
    with open(folder / "corpus.jsonl", "w") as file:
        file.writelines(json.dumps({"_id": i, "title": "", "text": text}) + "\n" for text, i in passages.items())
    with open(folder / "queries.jsonl", "w") as file:
        file.writelines(json.dumps({"_id": i, "text": text}) + "\n" for text, i in queries.items())
    for split, pairs in judged.items():
        with open(folder / "qrels" / f"{split}.tsv", "w") as file:
            file.write("query-id\tcorpus-id\tscore\n")
            file.writelines(f"{query}\t{passage}\t1\n" for query, passage in pairs)
    print(
        f"{folder}: {len(passages)} passages, {len(queries)} queries, judgements {', '.join(f'{s} {len(p)}' for s, p in judged.items())}"
    )


if __name__ == "__main__":
    main()
