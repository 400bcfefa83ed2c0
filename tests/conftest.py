"""Tiny models built from config, saved as folders, so every test runs offline in seconds."""

import gzip
import json
import os
import random
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from dkacq.encoders.presets import EncoderPreset, ModelSource

WORDS = (
    "the a of to in is was for on with as by at from that this it be are or an which python list dict "
    "function class module value return string file error type object method call data set key name "
    "when what who where how why does first second number time"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def _save_tokenizer(folder, kind: str) -> None:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        specials = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    else:
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
        specials = dict(unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    PreTrainedTokenizerFast(tokenizer_object=backend, **specials).save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    _save_tokenizer(folder, "bert")
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=SPECIALS.index("<s>"),
        eos_token_id=SPECIALS.index("</s>"),
    )
    LlamaModel(config).save_pretrained(folder)
    _save_tokenizer(folder, "llama")
    return folder


@pytest.fixture(scope="session")
def tiny_bert_preset(tiny_bert_dir) -> EncoderPreset:
    source = ModelSource(str(tiny_bert_dir))
    return EncoderPreset(
        "tiny-bert",
        "tiny-bert",
        query=source,
        passage=source,
        pooling="mean",
        query_max_length=16,
        passage_max_length=32,
    )


@pytest.fixture(scope="session")
def tiny_llama_preset(tiny_llama_dir) -> EncoderPreset:
    source = ModelSource(str(tiny_llama_dir))
    return EncoderPreset(
        "tiny-llama",
        "tiny-llama",
        query=source,
        passage=source,
        pooling="eos",
        query_prefix="query: ",
        passage_prefix="passage: ",
        normalize=True,
        query_max_length=16,
        passage_max_length=32,
        attribution_kinds=("gate_proj", "down_proj"),
        attribution_thresholds=(0.01,),
    )


def write_probe_files(folder, num_train: int = 120, num_test: int = 40, seed: int = 0) -> tuple[str, str]:
    """Local JSONL probe files of random word sequences in the probe-example columns."""
    import json
    import random

    rng = random.Random(seed)
    paths = []
    for split, count in (("train", num_train), ("test", num_test)):
        path = folder / f"{split}.jsonl"
        with open(path, "w") as file:
            for _ in range(count):
                texts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(6)]
                keys = ["question", "positive_context"] + [f"negative_context_{k}" for k in range(4)]
                file.write(json.dumps(dict(zip(keys, texts))) + "\n")
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.fixture
def probe_files(tmp_path):
    return write_probe_files(tmp_path)


STOP_WORDS = {"with", "that", "this", "from", "which", "when", "what", "where", "does"}
CONTENT_WORDS = [word for word in WORDS if len(word) > 3 and word not in STOP_WORDS]  # the tiny model's words


def make_collection(num_docs: int = 80, num_queries: int = 16, seed: int = 0) -> dict:
    """Random passages of content words; each query is the first words of one passage (its positive,
    grade 2), with one more passage judged 1 and one judged 0."""
    rng = random.Random(seed)
    docs = {
        f"d{i}": (f"title {i}" if i % 3 else "", " ".join(rng.choices(CONTENT_WORDS, k=14))) for i in range(num_docs)
    }
    queries, qrels = {}, []
    for j in range(num_queries):
        positive, partial, judged_out = rng.sample(sorted(docs), 3)
        queries[f"q{j:02d}"] = " ".join(docs[positive][1].split()[:5])
        qrels += [(f"q{j:02d}", positive, 2), (f"q{j:02d}", partial, 1), (f"q{j:02d}", judged_out, 0)]
    return {"docs": docs, "queries": queries, "qrels": qrels}


def write_beir(folder: Path, collection: dict, gzipped: bool = False, train_queries: set[str] = frozenset()) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzipped else ""
    opener = gzip.open if gzipped else open
    with opener(folder / f"corpus.jsonl{suffix}", "wt") as file:
        for doc, (title, text) in collection["docs"].items():
            file.write(json.dumps({"_id": doc, "title": title, "text": text}) + "\n")
    with opener(folder / f"queries.jsonl{suffix}", "wt") as file:
        for query, text in collection["queries"].items():
            file.write(json.dumps({"_id": query, "text": text, "metadata": {}}) + "\n")
    for split in ("train", "test"):
        rows = [row for row in collection["qrels"] if (row[0] in train_queries) == (split == "train")]
        if rows:
            with opener(folder / "qrels" / f"{split}.tsv{suffix}", "wt") as file:
                file.write("query-id\tcorpus-id\tscore\n")
                file.writelines(f"{q}\t{d}\t{g}\n" for q, d, g in rows)
    return folder


def fit_args(model_dir, data: tuple[str, str], folder, *extra: str) -> list[str]:
    """``dkacq fit`` of the tiny BERT (mean pooling) on local probe files, its cache and run under ``folder``."""
    train, test = data
    return [
        "fit",
        "--data.encoder=bert-mean",
        f"--data.model={model_dir}",
        "--data.dataset=toy",
        "--data.source=local",
        f"--data.train_file={train}",
        f"--data.test_file={test}",
        f"--data.cache_dir={folder / 'cache'}",
        f"--results.run_dir={folder / 'run'}",
        *extra,
    ]


def attribute_args(model_dir, data: tuple[str, str], folder, out: str = "run", steps: int = 2) -> list[str]:
    """``dkacq attribute`` of the tiny BERT on 8 texts of local probe files (2 a batch, ``steps`` IG steps),
    its probe set under ``folder``, its run in ``folder / out``."""
    train, test = data
    return [
        "attribute",
        "--model=bert-mean",
        f"--model.encoder.query.model={model_dir}",
        f"--model.encoder.passage.model={model_dir}",
        f"--model.steps={steps}",
        f"--model.output_dir={folder / out}",
        "--data.dataset=toy",
        "--data.source=local",
        f"--data.train_file={train}",
        f"--data.test_file={test}",
        f"--data.cache_dir={folder / 'cache'}",
        "--data.max_examples=8",
        "--data.batch_size=2",
        "--trainer.enable_progress_bar=false",
    ]


@pytest.fixture(scope="session")
def attributed(tiny_bert_dir, tmp_path_factory) -> tuple[tuple[str, str], Path]:
    """One uninterrupted ``dkacq attribute`` (:func:`attribute_args`), the run that stopped, killed and
    resumed runs must equal: its probe files (for the other runs to share) and its run folder."""
    from dkacq.cli import main

    folder = tmp_path_factory.mktemp("attributed")
    data = write_probe_files(folder, num_train=12, num_test=12)
    main(attribute_args(tiny_bert_dir, data, folder))
    return data, folder / "run"


@contextmanager
def torch_threads(count: int):
    """torch computes on ``count`` threads inside the block, on as many as before after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """For a module's tests of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): they
    gain nothing from threads, and on a busy two-core machine threads slow them tenfold."""
    with torch_threads(1):
        yield


@pytest.fixture
def fork_context(monkeypatch):
    """multiprocessing's fork context, for tests of two processes: a forked child starts at once, where a
    spawned one spends seconds importing torch and Lightning again (``strategy="ddp_fork"`` forks too).

    A forked child that enters the OpenMP pool its parent has used hangs, so while the test runs the parent
    computes on one thread and ``OMP_NUM_THREADS=1`` keeps Lightning from raising the children's count."""
    import multiprocessing

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with torch_threads(1):
        yield multiprocessing.get_context("fork")
