"""The stored probe set a datamodule's options name, and the model that mines its dense negatives.

``data.negatives dense`` ranks the whole corpus with a model's last layer (:mod:`dkacq.data.mining`
searches; this file loads the model, which ``data/`` may not): ``data.collection.dense_model`` (a
preset name, or a hub id or folder read as ``data.encoder auto`` reads it), else the probed model
itself. Mining with each probed model gives each model its own negatives, hence its own test items:
such probe sets are stored apart, in ``probe_set-dense-<digest of the mining model>``, so that the
settings of a study do not rebuild one folder in turn, and the report does not pair their outcomes.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from datasets import DatasetDict

from dkacq.data.collection import COLLECTION_FORMATS, CollectionOptions
from dkacq.data.storage import stored_probe_set
from dkacq.encoders import loading
from dkacq.encoders.model_files import AutoEncoder, similarity_of
from dkacq.encoders.presets import PRESETS, EncoderPreset, named_preset, split_control_label
from dkacq.encoders.text_encoder import REFERENCE_PADDING, TextEncoder, encode_texts
from dkacq.formats.identity import digest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MiningEncoder:
    """A model's last hidden state as a dense mining model (:class:`dkacq.data.mining.VectorEncoder`),
    with the model's own pooling, prefixes, token limits and normalisation. The model is loaded on the
    first text to encode (nothing is loaded when every vector and search is saved already), on the GPU
    when there is one, as the retrieval measures' search is."""

    def __init__(self, preset: EncoderPreset, similarity: str | None = None, dtype: str = "float32"):
        similarity = similarity or similarity_of(preset.query.model, preset.query.revision)
        self.preset, self.similarity, self.dtype = preset, similarity, dtype
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._encoders: tuple[TextEncoder, TextEncoder] | None = None

    @cached_property
    def identity(self) -> dict:
        """What decides the vectors and the ranking: the exact weights of both towers (a hub commit or
        the sha256 of a folder's files), every encoding setting, the dtype and the similarity (its
        value, not where it was read: the same ranking is the same probe set); not the label or the
        preset's name, which only name it."""
        preset = self.preset
        settings = {
            key: value
            for key, value in preset.identity().items()
            if key not in ("name", "label", "attribution_kinds", "attribution_thresholds", "attribution_precision")
        }
        identity = {
            "model": settings,
            "weights": {
                "query": loading.weights_identity(preset.query),
                "passage": loading.weights_identity(preset.passage),
            },
            "layer": "last",
            "dtype": self.dtype,
            "similarity": self.similarity,
        }
        if preset.pooling == "eos_reference":  # the padding is read
            identity["padding"] = REFERENCE_PADDING
        return identity

    def encode(self, texts: list[str], side: Literal["query", "passage"]) -> torch.Tensor:
        if self._encoders is None:
            self._encoders = tuple(
                encoder.to(self.device).eval() for encoder in loading.load_encoders(self.preset, DTYPES[self.dtype])
            )
        encoder = self._encoders[0 if side == "query" else 1]
        return encode_texts(encoder, texts, [encoder.num_hidden_states - 1])[0]

    def release(self) -> None:
        """Drop the loaded model (a probe set is mined once; the model must not stay in memory)."""
        self._encoders = None


def mining_preset(dense_model: str | None, probed: EncoderPreset | None) -> EncoderPreset:
    """The mining model's settings: a preset by name (``<preset>-random`` for its control), else the
    hub id or folder read from its own files; without ``dense_model``, the probed model's (refused where
    there is none, as for attribution's texts)."""
    if dense_model is None:
        if probed is None:
            raise ValueError(
                "data.negatives dense without a probed model needs data.collection.dense_model, the model the "
                "probe set was mined with"
            )
        return probed
    control = split_control_label(dense_model)
    if dense_model in PRESETS or (control is not None and control[0] in PRESETS):
        return named_preset(dense_model)
    return AutoEncoder(dense_model).preset()


def probe_set_miner(
    hparams: Mapping, collection: CollectionOptions, probed: EncoderPreset | None
) -> MiningEncoder | None:
    """The dense mining model these data options ask for (None unless a collection mines ``dense``),
    its settings read before any work."""
    if hparams["negatives"] != "dense" or hparams["source"] not in COLLECTION_FORMATS:
        return None
    preset = mining_preset(collection.dense_model, probed)
    return MiningEncoder(preset, collection.dense_similarity, collection.dense_dtype)


def probe_set_folder(hparams: Mapping, miner: MiningEncoder | None) -> Path:
    """``<cache_dir>/<dataset>/probe_set``, or ``probe_set-dense-<digest>`` for one mining model's."""
    name = "probe_set" if miner is None else f"probe_set-dense-{digest(miner.identity, 12)}"
    return Path(hparams["cache_dir"]) / hparams["dataset"] / name


def load_probe_set(
    hparams: Mapping, collection: CollectionOptions, miner: MiningEncoder | None
) -> tuple[DatasetDict, str]:
    """The stored probe set of these data options (built when missing) and its fingerprint."""
    try:
        return stored_probe_set(
            probe_set_folder(hparams, miner),
            hparams["source"],
            hparams["train_file"],
            hparams["test_file"],
            hparams["hub_id"],
            hparams["path"],
            hparams["dataset_id"],
            hparams["negatives"],
            collection,
            miner,
        )
    finally:
        if miner is not None:
            miner.release()
