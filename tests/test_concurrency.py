"""Two processes on one results table or one cache folder never lose or corrupt anything."""

from pathlib import Path

import pytest

from dkacq.formats.results import ProbeCell, read_rows, upsert_result


def _write_rows(path: str, worker: int, count: int) -> None:
    for layer in range(count):
        cell = ProbeCell("toy", f"model{worker}", "mean", 5, layer, "concat", {"worker": worker, "layer": layer})
        upsert_result(Path(path), cell, {"test_acc": f"{worker}.{layer}"})


@pytest.mark.slow
def test_concurrent_upserts_lose_no_row(tmp_path, fork_context):
    path = tmp_path / "results.csv"
    context = fork_context
    workers = [context.Process(target=_write_rows, args=(str(path), worker, 40)) for worker in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    rows = read_rows(path)
    assert sorted((row["model"], int(row["layer"])) for row in rows) == [
        (f"model{worker}", layer) for worker in range(3) for layer in range(40)
    ]
    assert all(row["test_acc"] == f"{row['model'][-1]}.{row['layer']}" for row in rows)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def _prepare(options: dict, queue) -> None:
    from dkacq.datamodules.probe import ProbeDataModule
    from dkacq.encoders import extraction

    builds = []
    original = extraction.build_cache

    def counting(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    extraction.build_cache = counting
    data = ProbeDataModule(**options)
    data.prepare_data()
    data.layer = 1
    data.setup("fit")
    queue.put((len(builds), data.open().manifest["files"]["layer_01.safetensors"]["sha256"]))


@pytest.mark.slow
def test_two_processes_building_one_cache_build_it_once(tmp_path, probe_files, tiny_bert_dir, fork_context):
    train, test = probe_files
    options = dict(
        encoder="bert-mean",
        model=str(tiny_bert_dir),
        dataset="toy",
        source="local",
        train_file=train,
        test_file=test,
        cache_dir=str(tmp_path / "cache"),
        batch_size=16,
        val_fraction=0.25,
    )
    context = fork_context
    queue = context.Queue()
    workers = [context.Process(target=_prepare, args=(options, queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
        assert worker.exitcode == 0
    results = [queue.get(timeout=5) for _ in workers]
    assert sorted(builds for builds, _ in results) == [0, 1], "the second process waited and reused the cache"
    assert results[0][1] == results[1][1]
    assert not [p for p in (tmp_path / "cache" / "toy").iterdir() if "partial" in p.name]
