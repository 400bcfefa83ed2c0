"""AttributionModule: integrated-gradients neuron scores of a text set, counted per threshold."""

import time
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn

from dkacq.attribution import compile_check
from dkacq.attribution.counting import ActiveNeuronCounts, check_thresholds
from dkacq.attribution.ig import PathRule, neuron_scores
from dkacq.attribution.objectives import Objective, Partners, Similarity, check_objective, objective_function
from dkacq.attribution.passes import GIB, PassMemory, PassPlanner, ReplicasSetting
from dkacq.attribution.targets import Target, find_targets
from dkacq.data.examples import TextSide
from dkacq.encoders.loading import load_encoders, model_config, resolve_model_path, weights_identity
from dkacq.encoders.model_files import AutoEncoder
from dkacq.encoders.presets import PRESETS, EncoderPreset, ModelSource
from dkacq.encoders.text_encoder import TextEncoder
from dkacq.formats.counts import (
    COUNTS_FILE,
    PROGRESS_DIR,
    SUMMARY_FILE,
    PerTextCounts,
    Segment,
    clear_segments,
    join_per_text,
    read_segments,
    sum_segments,
    text_key,
    write_counts,
    write_segment,
    write_summary,
)
from dkacq.formats.identity import differences, plain, recorded_change
from dkacq.formats.provenance import hardware, package_versions

STUDY_MAX_LENGTH = 256
"""The published attribution's token limit, for queries and passages alike."""


class AttributionConflictError(ValueError):
    """An output folder holds attribution results of other settings."""


def published_pooler(source: ModelSource, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """What the published attribution reads for CLS pooling: the ``pooler_output`` of the model that
    ``AutoModel`` builds from the checkpoint, as a module over the last hidden state.

    BERT's pooler (``tanh(dense(CLS))``) where the model has one (bert-base-uncased, MiniLM); None where
    ``pooler_output`` is the CLS vector itself (DPR's encoders) and dkacq's own CLS reading already
    matches. Raises ``ValueError`` for a checkpoint without the pooler's weights (the published code
    would have run on a randomly initialised pooler).
    """
    from transformers import AutoModel

    config = model_config(source)
    if config.model_type == "dpr":  # pooler_output is sequence_output[:, 0], projected where projection_dim > 0
        if getattr(config, "projection_dim", 0):
            raise ValueError(f"model '{source.model}' projects its CLS vector; cls_pooler does not reproduce that")
        return None
    kwargs = {"revision": source.revision} if source.revision else {}
    model, info = AutoModel.from_pretrained(
        resolve_model_path(source.model), config=config, dtype=dtype, output_loading_info=True, **kwargs
    )
    pooler = getattr(model, "pooler", None)
    if pooler is None:
        return None
    missing = [key for key in info["missing_keys"] if "pooler" in key]
    if missing:
        raise ValueError(f"model '{source.model}' has no pooler weights ({', '.join(missing)}); cls_pooler needs them")
    return pooler.eval().requires_grad_(False)


class AttributionModule(LightningModule):
    """Scores every target neuron for each text and counts, per threshold, the texts it is active in.

    Run it with ``Trainer.predict`` (``dkacq attribute``) and ``inference_mode=False``: the scores need
    gradients. The counts are a torchmetrics state summed across devices; rank zero writes
    ``summary.json`` and then ``counts.safetensors`` (each under a temporary name, renamed when
    complete) into ``output_dir`` when the text set is done. The summary records the run's identity
    (weights, texts and every option that changes a count): a folder holding counts of other settings
    is refused before the model is loaded, and counts present under the same identity mean the run is done.
    """

    def __init__(
        self,
        encoder: EncoderPreset = PRESETS["minilm"],
        text_side: TextSide = "query",
        kinds: list[str] | None = None,
        thresholds: list[float] | None = None,
        alpha_rule: PathRule = "reference",
        steps: int = 20,
        max_length: int | None = None,
        replicas_per_pass: ReplicasSetting | None = None,
        memory_limit_gib: float | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_check: bool = True,
        output_dir: str | None = None,
        save_every_n_batches: int = 1,
        unmasked_mean: bool = False,
        cls_pooler: bool = False,
        auto: AutoEncoder | None = None,
        target: Objective = "norm",
        similarity: Similarity | None = None,
    ):
        """
        Args:
            encoder: the encoder setting; ``--model NAME`` fills it from a preset (minilm, repllama, ...).
            auto: a model read from its own files instead of ``encoder`` (``--model.auto.model ID_OR_FOLDER``,
                the options of ``dkacq fit --data.encoder auto``; docs/any-retriever.md).
            text_side: which encoder reads the texts: ``query`` or ``passage`` (set from the data).
            kinds: MLP sub-layers whose output units are the neurons (BERT family: intermediate,
                output; Llama: gate_proj, down_proj, up_proj); default: the preset's.
            thresholds: a neuron is active in a text when its score over the text's largest score
                exceeds the threshold; default: the preset's (0.1 and 0.2; 0.01 for Llama, as studied).
            alpha_rule: ``reference`` (linspace(1e-6, 1, steps), as published) or ``riemann_right``
                (k / steps, the textbook right Riemann sum, as Captum).
            steps: points on the integration path (the study: 20).
            max_length: token limit per text. Given, it is used as is (the published attribution: 256 for
                queries and passages); not given, the preset's limit for the text side, at most 256 (as
                probed: 128 for BERT-family queries, 256 for passages).
            replicas_per_pass: (text, alpha) replicas in one forward and backward pass: a multiple of
                ``steps`` batches that many texts per pass, fewer splits a text's alphas over passes;
                ``auto``: the largest pass that fits the device's memory, from a memory model calibrated
                on the first batch (``dkacq/attribution/passes.py``). Not given: ``auto`` on a GPU, one
                text's ``steps`` on a CPU. Any split gives the same numbers; a pass that runs out of
                memory is retried with half as many (the summary records it).
            memory_limit_gib: the memory attribution's passes may take beyond the loaded model, for
                ``auto`` (default: the device's free memory when the first batch starts, less 15%).
            compile: run every layer of a pass through ``torch.compile`` (``neuron_scores(compile=...)``):
                the same numbers to the compiler's rounding, faster on a GPU once compiled; the first
                batch pays the compilation.
            compile_backend: the ``torch.compile`` backend (inductor; aot_eager compiles in seconds on a CPU).
            compile_check: with ``compile``, score the first batch eagerly too and stop in one line unless
                the two agree (``dkacq/attribution/compile_check.py``); the summary records the outcome.
            output_dir: where counts, summary and figures go; default
                ``runs/attribution/<dataset>-<preset>-<text side>``.
            save_every_n_batches: each process saves what it has counted (and which texts) after this
                many batches, so that a run stopped at any moment resumes from there with the same
                config; 0 saves only at the end. A save costs one write of the counts (a few MB for 7B).
            unmasked_mean: the published code's mean pooling (mean pooling only): the mean over every
                position of the text's padded batch, padding included, so a text's numbers depend on the
                other texts of its batch (``data.batch_size``; the published batch is 8, one process).
            cls_pooler: the published code's CLS vector (CLS pooling only): the model's ``pooler_output``,
                ``tanh(dense(CLS))`` for BERT checkpoints with a pooler (bert-base-uncased), the CLS
                vector itself for DPR's encoders; dkacq reads the CLS hidden state.

            target: what IG explains (:mod:`dkacq.attribution.objectives`): ``norm`` of the pooled final
                vector (the study), ``relevance`` (the score of the text against the other side of its
                example, held fixed: a query's positive passage, a passage's query) or ``margin`` (query
                texts: the positive's score minus the mean score of the example's negatives, all held
                fixed). The attributed encoder is the text side's.
            similarity: the score of ``relevance`` and ``margin``: ``dot``, or ``cosine``; default cosine
                for encoders that normalise their vectors (``encoder.normalize``), dot otherwise.

        ``eos_reference`` pooling reproduces the published attribution script's input (``"</s>"`` appended
        without a space, padding to the longest text of the batch; see
        :class:`~dkacq.encoders.text_encoder.TextEncoder`).
        """
        super().__init__()
        encoder = auto.preset() if auto is not None else encoder
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if memory_limit_gib is not None and memory_limit_gib <= 0:
            raise ValueError(f"memory_limit_gib must be positive, got {memory_limit_gib}")
        if unmasked_mean and encoder.pooling != "mean":
            raise ValueError(f"unmasked_mean is the published mean pooling; the encoder pools by {encoder.pooling}")
        if cls_pooler and encoder.pooling != "cls":
            raise ValueError(f"cls_pooler is the published CLS reading; the encoder pools by {encoder.pooling}")
        if cls_pooler and encoder.random_init:
            raise ValueError("cls_pooler reads a checkpoint's pooler; a random-init control has none")
        check_objective(target, text_side)
        self.save_hyperparameters()
        self.preset = encoder
        self.kinds = list(kinds or encoder.attribution_kinds) or None  # None: the architecture family's own
        self.thresholds = list(check_thresholds(thresholds or encoder.attribution_thresholds))
        self.text_encoder: TextEncoder | None = None
        self.partner_encoder: TextEncoder | None = None
        """The other side's encoder, for the vectors that ``relevance`` and ``margin`` hold fixed."""
        self.targets: list[Target] = []
        self.counts: ActiveNeuronCounts | None = None
        self.run_identity: dict | None = None
        self.segment_name = f"{uuid.uuid4().hex[:12]}"
        self.counted_texts: list[str] = []
        self.text_order: list[str] = []
        """The text key of every text of the set, in order: per-text rows follow it."""
        self.positions: dict[str, int] = {}
        self.earlier: tuple[dict, int] = ({}, 0)
        self.earlier_segments: list[Segment] = []
        self.written = False
        self.started: float | None = None
        self.passes: PassPlanner | None = None
        self.compile_record: dict | None = None

    @property
    def source(self):
        """The weights of the side whose texts are attributed."""
        return self.preset.query if self.hparams.text_side == "query" else self.preset.passage

    @property
    def max_length(self) -> int:
        """The token limit per text: ``max_length`` when given, else the side's preset limit, at most 256."""
        if self.hparams.max_length is not None:
            return int(self.hparams.max_length)
        side_length = (
            self.preset.query_max_length if self.hparams.text_side == "query" else self.preset.passage_max_length
        )
        return min(side_length, STUDY_MAX_LENGTH)

    @property
    def similarity(self) -> Similarity:
        """The score of the ``relevance`` and ``margin`` targets: as given, else as the encoder is used."""
        return self.hparams.similarity or ("cosine" if self.preset.normalize else "dot")

    def objective(self) -> dict:
        """The target and, where it scores, its similarity (part of the identity unless it is ``norm``)."""
        target = self.hparams.target
        return {"target": target} if target == "norm" else {"target": target, "similarity": self.similarity}

    def published_readings(self) -> dict:
        """The published code's readings this run reproduces (empty for dkacq's own)."""
        readings = {}
        if self.hparams.unmasked_mean:
            readings["unmasked_mean"] = True
        if self.hparams.cls_pooler:
            readings["cls_pooler"] = True
        if self.preset.pooling == "eos_reference":
            readings["eos_reference_input"] = "attribution"
        return readings

    def identity(self, data: LightningDataModule | None, precision: str) -> dict:
        """Everything the counts depend on; ``data``, a set-up text data module
        (:class:`dkacq.datamodules.texts.TextDataModule`), gives the hash of its texts."""
        readings = self.published_readings()
        return plain(
            {
                "encoder": self.preset.identity(),
                "weights": weights_identity(self.source),
                "texts": data.fingerprint() if data is not None else None,
                "data": {key: data.hparams[key] for key in ("dataset", "split", "max_examples")}
                if data is not None
                else None,
                "text_side": self.hparams.text_side,
                "kinds": self.kinds,
                "thresholds": self.thresholds,
                "alpha_rule": self.hparams.alpha_rule,
                "steps": self.hparams.steps,
                "max_length": self.max_length,
                "precision": precision,
                **({"published_readings": readings} if readings else {}),
                **({"objective": self.objective()} if self.hparams.target != "norm" else {}),
            }
        )

    @staticmethod
    def finished(folder: Path, identity: dict) -> bool:
        """Whether ``folder`` holds the finished counts of ``identity``; raises when it holds other settings."""
        changed = recorded_change(folder / SUMMARY_FILE, identity)
        if changed is not None:
            raise AttributionConflictError(
                f"{folder} holds attribution counts of other settings ({changed}); "
                f"give model.output_dir another folder, or remove it"
            )
        return (folder / SUMMARY_FILE).exists() and (folder / COUNTS_FILE).exists()

    def on_predict_start(self) -> None:
        self.started = time.perf_counter()

    def setup(self, stage: str) -> None:
        """Check the output folder before the model is loaded, and resume from the texts an interrupted
        run of the same identity counted there (they are left out of the data)."""
        data = self.trainer.datamodule
        self.run_identity = self.identity(data, str(self.trainer.precision))
        self.finished(self.output_path, self.run_identity)
        segments = read_segments(self.output_path)
        for segment in segments:
            if segment.identity != self.run_identity:
                changed = differences(segment.identity or {}, self.run_identity)
                raise AttributionConflictError(
                    f"{self.output_path} holds an unfinished attribution run of other settings ({changed}); "
                    f"give model.output_dir another folder, or remove its {PROGRESS_DIR}/ folder"
                )
        self.earlier = sum_segments(segments)
        self.earlier_segments = segments
        self.text_order = [text_key(text) for text in getattr(data, "texts", None) or []]
        self.positions = {key: position for position, key in enumerate(self.text_order)}
        if data is not None and segments:
            data.exclude({key for segment in segments for key in segment.texts})

    def configure_model(self) -> None:
        if self.text_encoder is not None:
            return
        self.text_encoder, self.partner_encoder = self.build_encoder(self.weights_dtype(str(self.trainer.precision)))
        self.targets = find_targets(self.text_encoder.transformer, self.kinds)
        self.counts = ActiveNeuronCounts(self.targets, self.thresholds, text_capacity=len(self.text_order) or None)

    @staticmethod
    def weights_dtype(precision: str) -> torch.dtype:
        """The dtype the model is loaded in under Lightning's ``precision``."""
        return torch.bfloat16 if "bf16" in precision else torch.float32

    def pass_planner(self) -> PassPlanner:
        """Sizes of the passes (made at the first batch, when the model is on its device):
        ``replicas_per_pass``, or the memory model's choice (``auto``)."""
        setting = self.hparams.replicas_per_pass
        if setting is None:
            setting = "auto" if self.device.type == "cuda" else self.hparams.steps
        transformer = self.text_encoder.transformer
        memory = PassMemory.of(transformer.config, next(transformer.parameters()).dtype)
        limit = self.hparams.memory_limit_gib
        return PassPlanner(
            setting, self.hparams.steps, memory, self.device, None if limit is None else int(limit * GIB)
        )

    def build_encoder(self, dtype: torch.dtype = torch.float32) -> tuple[TextEncoder, TextEncoder | None]:
        """The text side's encoder as this run reads it: its token limit, and the published readings the
        options ask for (``eos_reference`` with the attribution script's input); and the other side's,
        for a target that scores against it (None for ``norm``)."""
        query, passage = load_encoders(self.preset, dtype=dtype)
        encoder, partner = (query, passage) if self.hparams.text_side == "query" else (passage, query)
        encoder.max_length = self.max_length
        encoder.eos_reference_input = "attribution"
        encoder.unmasked_mean = bool(self.hparams.unmasked_mean)
        if self.hparams.cls_pooler:
            encoder.pooler = published_pooler(self.source, dtype)
        if self.hparams.target == "norm":
            return encoder, None
        partner.max_length = min(partner.max_length, STUDY_MAX_LENGTH)
        return encoder, partner.eval().requires_grad_(False)

    def partners(self, texts: list[str]) -> Partners:
        """The fixed vectors of each text's example under the unscaled model: its partner's, and for
        ``margin`` its negatives' (pooled last hidden states, unnormalised; the target normalises them
        for cosine)."""
        positives, negatives = self.trainer.datamodule.partners(texts)

        def vectors(encoder: TextEncoder, items: list[str]) -> torch.Tensor:
            batch = {key: value.to(self.device) for key, value in encoder.tokenize(items).items()}
            with torch.no_grad():
                hidden = encoder.transformer(**batch).last_hidden_state
                return encoder.pool(hidden, batch["attention_mask"]).float()

        positive = vectors(self.partner_encoder, positives)
        if self.hparams.target != "margin":  # margin: query texts (check_objective), negatives of the partner side
            return Partners(positive)
        drawn = vectors(self.partner_encoder, sum(negatives, []))
        return Partners(positive, drawn.view(len(texts), -1, drawn.shape[-1]))

    def predict_step(self, texts: list[str], batch_idx: int) -> int:
        """Score a batch of texts and count its active neurons; returns the number of texts."""
        batch = {key: value.to(self.device) for key, value in self.text_encoder.tokenize(texts).items()}
        objective = objective_function(
            self.hparams.target, self.similarity, self.partners(texts) if self.hparams.target != "norm" else None
        )

        def score(replicas_per_pass: int, compile: bool | str) -> dict:
            with torch.enable_grad():
                return neuron_scores(
                    self.text_encoder,
                    batch,
                    self.targets,
                    self.hparams.alpha_rule,
                    self.hparams.steps,
                    replicas_per_pass,
                    compile=compile,
                    objective=objective,
                )

        def checked_score(replicas_per_pass: int) -> dict:
            """The scores, compiled if asked; the first compiled batch checked against the eager path."""
            if not self.hparams.compile:
                return score(replicas_per_pass, False)
            scores = score(replicas_per_pass, self.hparams.compile_backend)
            if self.compile_record is None:
                check = "off"
                if self.hparams.compile_check:
                    tolerance = compile_check.TOLERANCE[next(self.text_encoder.parameters()).dtype]
                    check = compile_check.compare(score(replicas_per_pass, False), scores, self.thresholds, tolerance)
                self.compile_record = {"backend": self.hparams.compile_backend, "check": check}
            return scores

        if self.passes is None:
            self.passes = self.pass_planner()
        scores = self.passes.run(checked_score, len(texts), batch["input_ids"].shape[1])
        keys = [text_key(text) for text in texts]
        self.counts.update(scores, [self.positions[key] for key in keys] if self.counts.text_capacity else None)
        self.counted_texts += keys
        every = self.hparams.save_every_n_batches
        if every and (batch_idx + 1) % every == 0:
            self.save_progress()
        return len(texts)

    def save_progress(self) -> None:
        """This process's counts and texts so far, as its progress segment in the output folder."""
        local = self.counts.local()
        per_text = None
        if local.per_text is not None:
            rows = torch.tensor([self.positions[key] for key in self.counted_texts], dtype=torch.int64)
            per_text = {key: table.cpu().index_select(0, rows) for key, table in local.per_text.items()}
        segment = Segment(local.counts, local.num_texts, self.counted_texts, self.run_identity, per_text)
        write_segment(self.output_path, f"{self.segment_name}-rank{self.global_rank}", segment)

    def per_text_counts(self, counts) -> PerTextCounts | None:
        """This run's per-text rows (summed over processes) and those of the segments it resumed from, in
        the order of the text set; None when some segment predates per-text tables."""
        if counts.per_text is None:
            return None
        counted = counts.counted.cpu()
        if (counted > 1).any():
            raise RuntimeError("a text was counted more than once")
        rows = counted.nonzero().flatten()
        current = PerTextCounts(
            [self.text_order[row] for row in rows.tolist()],
            {key: table.cpu().index_select(0, rows) for key, table in counts.per_text.items()},
        )
        parts = [current, *(segment.per_text_counts() for segment in self.earlier_segments)]
        if any(part is None for part in parts):
            return None
        joined = join_per_text(parts)
        present = set(joined.texts)
        return joined.ordered([key for key in self.text_order if key in present])

    def output_path_for(self, data: LightningDataModule | None) -> Path:
        if self.hparams.output_dir:
            return Path(self.hparams.output_dir)
        dataset = data.hparams.dataset if data is not None else "texts"
        target = "" if self.hparams.target == "norm" else f"-{self.hparams.target}"
        return Path("runs/attribution") / f"{dataset}-{self.preset.name}-{self.hparams.text_side}{target}"

    @property
    def output_path(self) -> Path:
        return self.output_path_for(self.trainer.datamodule)

    def on_predict_epoch_end(self) -> None:
        self.write_results()

    def write_results(self) -> None:
        """Sum the counts over processes and earlier segments, write summary and counts, drop the segments.

        Lightning runs no epoch hooks over an empty text set, which is what a run resumed after its last
        text was counted sees: ``dkacq attribute`` then calls this itself (:attr:`written` tells).
        """
        if self.hparams.save_every_n_batches:
            self.save_progress()
        counts = self.counts.compute()
        self.written = True
        if not self.trainer.is_global_zero:
            return
        earlier, earlier_texts = self.earlier
        for key, count in earlier.items():
            counts.counts[key] = counts.counts[key] + count.to(counts.counts[key].device)
        counts.num_texts += earlier_texts
        per_text = self.per_text_counts(counts)
        folder = self.output_path
        write_summary(folder, self.summary(counts))
        write_counts(folder, counts.counts, counts.num_texts, per_text)
        clear_segments(folder)

    def speed(self, texts: int) -> dict:
        """How fast this run (not the interrupted runs it resumed) attributed its texts, and on what."""
        seconds = time.perf_counter() - self.started if self.started is not None else 0.0
        return {
            "texts": texts,
            "wall_seconds": seconds,
            "texts_per_second": texts / seconds if seconds > 0 else None,
            "precision": str(self.trainer.precision),
            **hardware(self.device, self.trainer.world_size),
        }

    def summary(self, counts) -> dict:
        """Everything needed to trace and reproduce the counts."""
        preset, data = self.preset, self.trainer.datamodule
        data_hparams = dict(data.hparams) if data is not None else {}
        kinds = {}
        for target in self.targets:
            entry = kinds.setdefault(
                target.kind, {"side": target.side, "num_layers": 0, "num_neurons": target.num_neurons}
            )
            entry["num_layers"] += 1
        return {
            "model": preset.label,
            "preset": preset.name,
            "encoder": asdict(preset),
            "pooling": preset.pooling,
            "dataset": data_hparams.get("dataset"),
            "data": data_hparams,
            "split": data_hparams.get("split"),
            "text_side": self.hparams.text_side,
            **self.objective(),
            "alpha_rule": self.hparams.alpha_rule,
            "steps": self.hparams.steps,
            "thresholds": self.thresholds,
            "kinds": kinds,
            "num_texts": int(counts.num_texts),
            "max_length": self.text_encoder.max_length,
            "published_readings": self.published_readings(),
            "precision": str(self.trainer.precision),
            "dtype": str(next(self.text_encoder.transformer.parameters()).dtype).removeprefix("torch."),
            "devices": self.trainer.world_size,
            "speed": self.speed(int(counts.num_texts) - self.earlier[1]),
            "passes": self.passes.record() if self.passes is not None else None,
            "compile": self.compile_record,
            "versions": package_versions(),
            "identity": self.run_identity,
        }
