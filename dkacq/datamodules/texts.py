"""TextDataModule: the distinct questions or positive passages of a probe set's split, for attribution."""

import hashlib
from typing import Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from dkacq.data.collection import CollectionOptions, collection_options
from dkacq.data.examples import EXAMPLE_COLUMNS, TEXT_COLUMNS, TextSide
from dkacq.data.mining import NegativeSource
from dkacq.data.storage import ProbeSource, check_dataset_name
from dkacq.datamodules.probe_sets import load_probe_set, probe_set_miner
from dkacq.formats.counts import text_key


def _texts_as_list(texts: list[str]) -> list[str]:
    return texts


class TextDataModule(LightningDataModule):
    """Each distinct text of one side of a split once, in file order, as batches of strings."""

    def __init__(
        self,
        dataset: str = "demo",
        source: ProbeSource = "demo",
        train_file: str | None = None,
        test_file: str | None = None,
        hub_id: str | None = None,
        path: str | None = None,
        dataset_id: str | None = None,
        negatives: NegativeSource = "file",
        collection: CollectionOptions | None = None,
        split: Literal["train", "test"] = "test",
        text_side: TextSide = "query",
        max_examples: int | None = 1000,
        batch_size: int = 8,
        cache_dir: str = ".cache/dkacq",
        max_examples_of: Literal["texts", "rows"] = "texts",
    ):
        """
        Args:
            dataset: the data set's name in outputs (nq, msmarco, demo, ...).
            source: demo, dpr, msmarco, published, local, beir, trec or ir_datasets, as for probing.
            train_file: the train split's file, where the source needs one.
            test_file: the test split's file.
            hub_id: a Hugging Face data set id for msmarco or published.
            path, dataset_id, negatives, collection: a collection's folder, ir_datasets id and mining,
                as for probing (the stored probe set is shared with it; dense negatives need
                collection.dense_model, the model they were mined with).
            split: the split whose texts are attributed (the study: test).
            text_side: ``query`` (questions, for a query encoder) or ``passage`` (positive passages).
            max_examples: stop after this many distinct texts (the study: 1,000); all when not given.
            max_examples_of: what ``max_examples`` counts: ``texts``, distinct texts (dkacq: exactly
                ``max_examples`` texts where the split has them), or ``rows``, the split's first
                ``max_examples`` rows, whose distinct texts are attributed (the published code, which takes
                the rows first and drops repeated texts after, so fewer texts where rows repeat one).
            batch_size: texts per batch; each text is replicated once per alpha step and target layer
                group, so memory grows with batch_size x steps x tokens.
            cache_dir: folder of stored probe sets, shared with probing.
        """
        super().__init__()
        if max_examples is not None and max_examples < 1:
            raise ValueError(f"max_examples must be at least 1, got {max_examples}")
        if max_examples_of not in ("texts", "rows"):
            raise ValueError(f"max_examples_of must be texts or rows, got {max_examples_of!r}")
        check_dataset_name(dataset, source)
        self.collection = collection_options(collection)
        self.save_hyperparameters()
        self.miner = probe_set_miner(self.hparams, self.collection, None)
        self.texts: list[str] = []
        self.remaining: list[str] = []
        self.examples: dict[str, tuple[str, list[str]]] = {}

    def prepare_data(self) -> None:
        load_probe_set(self.hparams, self.collection, self.miner)

    def setup(self, stage: str | None = None) -> None:
        probe_set, _ = load_probe_set(self.hparams, self.collection, self.miner)
        split = probe_set[self.hparams.split]
        column = list(split[TEXT_COLUMNS[self.hparams.text_side]])
        limit = self.hparams.max_examples
        if self.hparams.get("max_examples_of", "texts") == "rows":
            self.texts = list(dict.fromkeys(column[:limit]))
        else:
            self.texts = list(dict.fromkeys(column))[:limit]
        self.remaining = self.texts
        partner = TEXT_COLUMNS["passage" if self.hparams.text_side == "query" else "query"]
        negatives = list(zip(*(split[column] for column in EXAMPLE_COLUMNS[2:])))
        self.examples = {}
        for text, other, drawn in zip(column, split[partner], negatives):
            self.examples.setdefault(text, (other, list(drawn)))
        if not self.texts:
            raise ValueError(
                f"no {self.hparams.text_side} texts in the {self.hparams.split} split of {self.hparams.dataset}"
            )

    def partners(self, texts: list[str]) -> tuple[list[str], list[list[str]]]:
        """For each text, the other side of the first example it is in (a query's positive passage, a
        positive passage's query) and that example's negative passages: what the ``relevance`` and
        ``margin`` attribution targets score the text against."""
        return [self.examples[text][0] for text in texts], [self.examples[text][1] for text in texts]

    def exclude(self, keys: set[str]) -> None:
        """Leave out the texts whose :func:`~dkacq.formats.counts.text_key` is in ``keys`` (counted
        already by an interrupted run); :meth:`fingerprint` still names the whole text set."""
        self.remaining = [text for text in self.texts if text_key(text) not in keys]

    def fingerprint(self) -> str:
        """A content hash of the texts to attribute, in order (``setup`` must have run)."""
        hashed = hashlib.sha256()
        for text in self.texts:
            hashed.update(text.encode() + b"\0")
        return hashed.hexdigest()[:16]

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.remaining, batch_size=self.hparams.batch_size, collate_fn=_texts_as_list)
