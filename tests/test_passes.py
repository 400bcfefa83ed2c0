"""Passes that fit the device: the memory model's choice, and out-of-memory recovery, against fixed passes."""

import json
import re

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy
from safetensors.torch import load_file
from test_attribution_run import _data
from transformers import LlamaConfig, LlamaModel

from dkacq.attribution.module import AttributionModule
from dkacq.attribution.passes import AttributionMemoryError, PassMemory, PassPlanner, check_fits, pass_size
from dkacq.cli import console
from dkacq.commands import attribute
from dkacq.encoders.loading import model_config
from dkacq.encoders.memory import SAFETY_MARGIN, weight_bytes


def tiny_llama_memory(tiny_llama_preset) -> PassMemory:
    return PassMemory.of(model_config(tiny_llama_preset.query), torch.float32)


def test_the_stated_model_by_hand(tiny_llama_preset):
    """The tiny Llama: 2 layers, hidden 32, intermediate 64, 2 heads, float32."""
    memory = tiny_llama_memory(tiny_llama_preset)
    assert memory.stated_replica_token_bytes(10) == 2 * 4 * (10 * 32 + 3 * 64 + 2 * 10) == 4256
    assert memory.batch_bytes(3) == 3 * 3 * 32 * 64 * 4 == 73728
    # room for 25 replicas of 10 tokens beside 3 texts, one byte short of 26
    budget = 73728 + 26 * 10 * 4256 - 1
    planner = PassPlanner("auto", 10, memory, torch.device("cpu"), limit_bytes=budget)
    assert planner.replicas(3, 10) == 20  # whole texts of 10 steps each
    planner = PassPlanner("auto", 40, memory, torch.device("cpu"), limit_bytes=budget)
    assert planner.replicas(3, 10) == 25  # below one text's steps: the steps are split
    planner = PassPlanner("auto", 4, memory, torch.device("cpu"), limit_bytes=10**9)
    assert planner.replicas(3, 10) == 12  # never more than the batch's replicas


def test_pass_sizes_are_what_neuron_scores_runs():
    assert [pass_size(r, 5, 3) for r in (1, 4, 5, 9, 10, 14, 15, 16, 100)] == [1, 4, 5, 5, 10, 10, 15, 15, 15]


def test_a_batch_that_cannot_fit_is_refused_in_one_line(tiny_llama_preset):
    planner = PassPlanner("auto", 4, tiny_llama_memory(tiny_llama_preset), torch.device("cpu"), limit_bytes=1000)
    with pytest.raises(
        AttributionMemoryError, match="a batch of 3 texts of 10 tokens needs .* lower data.batch_size"
    ) as error:
        planner.replicas(3, 10)
    assert "\n" not in str(error.value)


def test_running_out_of_memory_with_one_replica_is_one_line(tiny_llama_preset):
    planner = PassPlanner(4, 4, tiny_llama_memory(tiny_llama_preset), torch.device("cpu"))

    def never_fits(replicas: int) -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(AttributionMemoryError, match="even one replica per pass"):
        planner.run(never_fits, 1, 10)
    assert [retry["replicas"] for retry in planner.retries] == [4, 2]


class OutOfMemoryAbove(AttributionModule):
    """Every layer raises ``torch.OutOfMemoryError`` when called on more than ``most_rows`` rows."""

    most_rows = 3
    calls: list[int]

    def build_encoder(self, dtype=torch.float32):
        encoder, partner = super().build_encoder(dtype)
        self.calls = []

        def check(module, args, kwargs):
            rows = args[0].shape[0]
            self.calls.append(rows)
            if rows > self.most_rows:
                raise torch.OutOfMemoryError(f"injected: {rows} rows")

        for layer in encoder.transformer.layers:
            layer.register_forward_pre_hook(check, with_kwargs=True)
        return encoder, partner


def _run(module_class, tmp_path, name, preset, probe_files, **kwargs):
    module = module_class(preset, steps=3, thresholds=[0.01, 0.1], output_dir=str(tmp_path / name), **kwargs)
    trainer = Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False)
    data = _data(tmp_path, probe_files, batch_size=4, max_examples=6)
    trainer.predict(module, datamodule=data, return_predictions=False)
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    widths = [module.text_encoder.tokenize(batch)["input_ids"].shape[1] for batch in data.predict_dataloader()]
    return module, load_file(tmp_path / name / "counts.safetensors"), summary, widths


def assert_same_counts(one: dict, other: dict) -> None:
    assert one.keys() == other.keys()
    for key in one:
        assert torch.equal(one[key], other[key]), key


def test_auto_passes_and_out_of_memory_retries_count_what_fixed_passes_do(tmp_path, probe_files, tiny_llama_preset):
    _, fixed, fixed_summary, widths = _run(
        AttributionModule, tmp_path, "fixed", tiny_llama_preset, probe_files, replicas_per_pass=3
    )
    assert fixed_summary["passes"]["replicas_per_pass"] == 3
    assert fixed_summary["passes"]["out_of_memory_retries"] == []

    # auto, with room for two texts' replicas (6, not 7) in the widest batch of 4 texts
    memory = tiny_llama_memory(tiny_llama_preset)
    tokens = max(widths)
    limit = memory.batch_bytes(4) + 7 * tokens * memory.stated_replica_token_bytes(tokens)
    _, auto, auto_summary, _ = _run(
        AttributionModule, tmp_path, "auto", tiny_llama_preset, probe_files,
        replicas_per_pass="auto", memory_limit_gib=limit / 2**30,
    )  # fmt: skip
    assert_same_counts(auto, fixed)
    passes = auto_summary["passes"]
    assert passes["replicas_per_pass"] == "auto" and passes["budget_bytes"] == int(limit)
    assert "6" in passes["passes_used"] and all(int(size) % 3 == 0 for size in passes["passes_used"])
    assert passes["memory_model"]["calibration"] == 1.0  # measured only on a GPU

    # every layer fails above one text's 3 replicas: 12 -> 6 -> 3, the first batch retried twice
    module, recovered, recovered_summary, _ = _run(
        OutOfMemoryAbove, tmp_path, "recovered", tiny_llama_preset, probe_files, replicas_per_pass=12
    )
    assert_same_counts(recovered, fixed)
    retries = recovered_summary["passes"]["out_of_memory_retries"]
    assert [(retry["batch"], retry["replicas"]) for retry in retries] == [(0, 12), (0, 6)]
    assert recovered_summary["passes"]["passes_used"] == {"3": 2}  # 6 texts in batches of 4 and 2
    assert recovered_summary["num_texts"] == 6 and max(module.calls) > 3


def test_a_run_that_cannot_fit_at_all_is_refused_before_loading(tiny_llama_preset, tiny_llama_dir):
    config = model_config(tiny_llama_preset.query)
    weights = sum(parameter.numel() for parameter in LlamaModel.from_pretrained(tiny_llama_dir).parameters()) * 2
    assert weight_bytes(config, torch.bfloat16) == weights
    memory = PassMemory.of(config, torch.bfloat16)
    beside = memory.batch_bytes(8) + 32 * memory.stated_replica_token_bytes(32)  # 8 texts, one replica of 32 tokens
    enough = weights + -(-beside // (1 - SAFETY_MARGIN)) + 1
    check_fits("tiny-llama", config, torch.bfloat16, 8, 32, torch.device("cuda", 0), int(enough))
    with pytest.raises(AttributionMemoryError, match=r"tiny-llama in bfloat16 cannot be attributed on cuda:0") as error:
        check_fits("tiny-llama", config, torch.bfloat16, 8, 32, torch.device("cuda", 0), int(weights + beside))
    assert "lower data.batch_size or model.max_length" in str(error.value) and "\n" not in str(error.value)


def test_calibrating_on_the_h100_peak_by_hand():
    """The 7B shape's peak measured on an H100 with 40 replicas of 153 tokens, 4 texts (docs/reproduce.md):
    38 GiB, less 12.3 GiB of weights allocated before the batch."""
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    memory = PassMemory.of(config, torch.bfloat16)
    peak = int((38 - 12.307) * 2**30)
    memory.calibrate(peak, replicas=40, texts=4, tokens=153)
    stated = 40 * 153 * 32 * 2 * (10 * 4096 + 3 * 11008 + 32 * 153)
    assert memory.calibration == pytest.approx((peak - 3 * 4 * 4096 * 11008 * 4) / stated, rel=1e-12)
    assert 0.8 < memory.calibration < 0.85
    memory.calibrate(1000, replicas=40, texts=4, tokens=153)  # nothing beyond the accumulators: kept
    assert 0.8 < memory.calibration < 0.85
    memory.calibrate(100 * peak, replicas=40, texts=4, tokens=153)
    assert memory.calibration == 4.0


def test_the_command_refuses_what_cannot_fit_before_loading(tmp_path, probe_files, tiny_llama_dir, monkeypatch, capsys):
    """On a GPU (stood in for: the strategy's device says cuda) with too little free memory."""
    monkeypatch.setattr(SingleDeviceStrategy, "root_device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(attribute, "free_bytes", lambda device: 2**20)
    monkeypatch.setattr(AttributionModule, "build_encoder", lambda *args: pytest.fail("the model was loaded"))
    train, test = probe_files
    with pytest.raises(SystemExit) as stop:
        console(
            ["attribute", "--model", "llama", f"--model.encoder.query.model={tiny_llama_dir}",
             f"--model.encoder.passage.model={tiny_llama_dir}", f"--model.output_dir={tmp_path / 'out'}",
             "--data.dataset=toy", "--data.source=local", f"--data.train_file={train}", f"--data.test_file={test}",
             f"--data.cache_dir={tmp_path / 'cache'}", "--data.text_side=passage"]
        )  # fmt: skip
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"dkacq: error: .* in bfloat16 cannot be attributed on cuda:0: beside its weights \(.* GiB\) a batch of 8 "
        r"texts needs .* GiB and one replica of 256 tokens .* GiB, and 0.0 GiB are left .*lower data.batch_size or "
        r"model.max_length \(docs/reproduce.md\)",
        error,
    )
    assert not (tmp_path / "out").exists()
