"""``--model.compile``: the compiled path from the command line, with its check against the eager path."""

import json

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file
from test_attribution_run import _data

from dkacq.attribution.compile_check import CompiledMismatchError, compare
from dkacq.attribution.module import AttributionModule
from dkacq.cli import console


def test_compare_by_hand():
    eager = {"a": torch.tensor([[4.0, 2.0, 0.4]]), "b": torch.tensor([[0.8, 0.3]])}  # normalised: 1, .5, .1 | .2, .075
    close = {"a": torch.tensor([[4.0, 2.0, 0.4 - 4e-5]]), "b": torch.tensor([[0.8 + 2e-4, 0.3]])}
    record = compare(eager, close, thresholds=[0.1, 0.2], tolerance=1e-4)
    # 2e-4 / 4: within the tolerance; 0.4 - 4e-5 leaves neuron a[2] just below 0.1, where it was not above
    # anyway (0.1 is not > 0.1); b[0] at 0.20005 turns active at 0.2, within the tolerance of it: excused
    assert record["largest_difference"] == pytest.approx(5e-5, rel=1e-3)
    assert record["activity_differences"] == 0
    assert record["activity_differences_within_tolerance_of_a_threshold"] == 1

    far = {"a": torch.tensor([[4.0, 2.0, 0.4]]), "b": torch.tensor([[0.8, 1.2]])}  # b[1]: 0.075 -> 0.3
    with pytest.raises(CompiledMismatchError, match=r"largest difference 2\.25e-01 .* 2 neurons change") as error:
        compare(eager, far, thresholds=[0.1, 0.2], tolerance=1e-4)
    assert "\n" not in str(error.value)


NOISY = {"on": False}


@torch._dynamo.register_backend(name="dkacq_test_switchable")
def switchable_backend(graph, example_inputs):
    """Dynamo's graphs run as traced; with ``NOISY["on"]`` a wrong compiler: every floating-point output of
    a graph 1% off. One backend for the right and the wrong graphs, so the layers are traced once."""

    def run(*args):
        outputs = graph(*args)
        if not NOISY["on"]:
            return outputs
        return type(outputs)(o * 1.01 if torch.is_tensor(o) and o.is_floating_point() else o for o in outputs)

    return run


def _run(tmp_path, probe_files, preset, name, **kwargs):
    module = AttributionModule(preset, steps=3, thresholds=[0.1, 0.2], output_dir=str(tmp_path / name), **kwargs)
    trainer = Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False)
    trainer.predict(module, datamodule=_data(tmp_path, probe_files, max_examples=4), return_predictions=False)
    return load_file(tmp_path / name / "counts.safetensors"), json.loads((tmp_path / name / "summary.json").read_text())


def test_compiled_runs_count_what_eager_runs_do_and_a_wrong_graph_stops(
    tmp_path, probe_files, tiny_bert_preset, capsys
):
    """The compiled path's numbers themselves are checked against the oracles in test_gpu_benchmark.py."""
    eager, eager_summary = _run(tmp_path, probe_files, tiny_bert_preset, "eager")
    backend = "dkacq_test_switchable"
    compiled, summary = _run(tmp_path, probe_files, tiny_bert_preset, "compiled", compile=True, compile_backend=backend)
    assert eager.keys() == compiled.keys()
    for key in eager:
        assert torch.equal(eager[key], compiled[key]), key
    assert eager_summary["compile"] is None
    check = summary["compile"]["check"]
    assert summary["compile"]["backend"] == backend and check["tolerance"] == 1e-4
    assert check["largest_difference"] < 1e-6 and check["activity_differences"] == 0

    NOISY["on"] = True
    try:
        _, unchecked = _run(
            tmp_path, probe_files, tiny_bert_preset, "unchecked", compile=True, compile_backend=backend,
            compile_check=False,
        )  # fmt: skip
        assert unchecked["compile"] == {"backend": backend, "check": "off"}
        stopped = _stopped_run(tmp_path, probe_files, tiny_bert_preset, backend)
    finally:
        NOISY["on"] = False
    assert stopped.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dkacq: error: the compiled attribution differs from the eager one on the first batch")
    assert not (tmp_path / "noisy" / "counts.safetensors").exists()


def _stopped_run(tmp_path, probe_files, preset, backend) -> SystemExit:
    """``dkacq attribute --model.compile true`` with ``backend``, which must stop."""
    train, test = probe_files
    with pytest.raises(SystemExit) as stop:
        console(
            [
                "attribute", "--model", "bert-mean", f"--model.encoder.query.model={preset.query.model}",
                f"--model.encoder.passage.model={preset.query.model}", "--model.steps=3",
                "--model.compile=true", f"--model.compile_backend={backend}",
                f"--model.output_dir={tmp_path / 'noisy'}", "--data.dataset=toy", "--data.source=local",
                f"--data.train_file={train}", f"--data.test_file={test}", f"--data.cache_dir={tmp_path / 'cache'}",
                "--data.max_examples=2", "--trainer.enable_progress_bar=false",
            ]
        )  # fmt: skip
    return stop.value
