"""Texts to token ids to every hidden state's pooled vector, for one side (queries or passages)."""

from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dkacq.encoders.pooling import Pooling, pool

EosReferenceInput = Literal["probing", "attribution"]
"""Which published script's EOS input ``eos_reference`` reproduces: the two differ."""

REFERENCE_PADDING = "own-pad-else-eos"
"""What ``eos_reference`` pads with, in its cache requests: the tokenizer's own pad token, else its EOS
token, as the published code does (caches without it were padded with the unknown token, and are
rebuilt)."""

PUBLISHED_EOS = "</s>"
"""The string the published code appends for EOS pooling (Llama-2's EOS token), whatever the tokenizer."""


class TextEncoder(nn.Module):
    """A transformer with its tokenizer, text prefix, maximum length and pooling (and, with
    ``lowercase``, texts lower-cased with their prefix, as sentence-transformers' ``do_lower_case``).

    EOS pooling follows Tevatron's RepLlama: the text is truncated to ``max_length - 1`` tokens, the EOS
    id is appended, and the vector is read at the last real token whatever the padding side.
    ``eos_reference`` reproduces the published code instead, which reads the last position; its two
    scripts build that input differently (``eos_reference_input``):

    - ``probing`` (``knowledge_consistency/precompute_embeddings.py``): ``prefix + text + " </s>"``,
      truncated and padded to ``max_length``;
    - ``attribution`` (``knowledge_decentralization/compute_attributions.py``): ``prefix + text + "</s>"``
      (no space), truncated at ``max_length`` and padded to the longest text of the batch, so a text's
      numbers depend on its batch (the published batch is 8 texts).

    Both pad with the tokenizer's own pad token or, where it has none, its EOS token, as the published
    code does (dkacq's loader gives such tokenizers the unknown token to pad with otherwise; the padding
    is read, so the id matters). The padding side is the tokenizer's.

    Two more readings of the published attribution code, set by :class:`~dkacq.attribution.module.
    AttributionModule` on its own encoder (never for probing): ``unmasked_mean`` averages every position
    of the padded batch, padding included (``last_hidden_state.mean(dim=1)``), and ``pooler`` (a module
    over the hidden state, BERT's ``tanh(dense(CLS))``) gives the vector as the model's
    ``pooler_output`` does. Readings that depend on the batch's padding (:attr:`pads_to_batch`) pad a
    re-collated part of a batch to the batch's width (:meth:`collate`).
    """

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        pooling: Pooling,
        prefix: str = "",
        max_length: int = 512,
        normalize: bool = False,
        eos_reference_input: EosReferenceInput = "probing",
        lowercase: bool = False,
    ):
        super().__init__()
        if eos_reference_input not in ("probing", "attribution"):
            raise ValueError(f"eos_reference_input must be probing or attribution, got {eos_reference_input!r}")
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.prefix = prefix
        self.max_length = max_length
        self.normalize = normalize
        self.eos_reference_input = eos_reference_input
        self.lowercase = lowercase
        self.unmasked_mean = False
        self.pooler: nn.Module | None = None

    @property
    def num_hidden_states(self) -> int:
        return self.transformer.config.num_hidden_layers + 1

    @property
    def hidden_size(self) -> int:
        return self.transformer.config.hidden_size

    @property
    def pads_to_batch(self) -> bool:
        """Whether a text's vector depends on how far its batch pads it (published attribution readings)."""
        return self.unmasked_mean or (self.pooling == "eos_reference" and self.eos_reference_input == "attribution")

    @property
    def reference_pad_id(self) -> int:
        """The id the published code pads with: the tokenizer's own pad token, else its EOS token."""
        tokenizer = self.tokenizer
        own = tokenizer.init_kwargs.get("pad_token") is not None
        if own or tokenizer.eos_token is None:
            return tokenizer.pad_token_id
        return tokenizer.convert_tokens_to_ids(tokenizer.eos_token)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Unpadded token ids of each text, as the forward pass will see them."""
        texts = [self.prefix + text for text in texts]
        if self.lowercase:
            texts = [text.lower() for text in texts]
        if self.pooling == "eos":
            ids = self.tokenizer(texts, truncation=True, max_length=self.max_length - 1)["input_ids"]
            return [row + [self.tokenizer.eos_token_id] for row in ids]
        if self.pooling == "eos_reference":
            separator = " " if self.eos_reference_input == "probing" else ""
            texts = [f"{text}{separator}{PUBLISHED_EOS}" for text in texts]
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def collate(self, ids: list[list[int]], batch_width: int | None = None) -> dict[str, Tensor]:
        """Pad token id rows into a batch: to the longest row; to ``max_length`` for ``eos_reference`` as
        probed; for readings that depend on the batch's padding (:attr:`pads_to_batch`), to the longest
        row or ``batch_width`` (the width of the batch these rows were taken from), whichever is more."""
        if self.pooling == "eos_reference" and self.eos_reference_input == "probing":
            return self._pad(ids, self.max_length)
        if self.pads_to_batch:
            return self._pad(ids, max([len(row) for row in ids] + [batch_width or 0]))
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding="longest")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def _pad(self, ids: list[list[int]], width: int) -> dict[str, Tensor]:
        """Rows padded to ``width`` with :attr:`reference_pad_id` on the tokenizer's padding side."""
        pad_id, left = self.reference_pad_id, self.tokenizer.padding_side == "left"
        input_ids, attention_mask = [], []
        for row in ids:
            padding = [pad_id] * (width - len(row))
            mask, empty = [1] * len(row), [0] * len(padding)
            input_ids.append(padding + list(row) if left else list(row) + padding)
            attention_mask.append(empty + mask if left else mask + empty)
        return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask)}

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        return self.collate(self.token_ids(texts))

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        """Every hidden state, the embedding output first (``num_hidden_states`` of them)."""
        output = self.transformer(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return output.hidden_states

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """The pooled vector of one hidden state, before any normalisation (with ``pooler`` or
        ``unmasked_mean`` set, the published attribution code's reading of the last hidden state)."""
        if self.pooler is not None:
            return self.pooler(hidden)
        if self.unmasked_mean:
            return hidden.mean(dim=1)
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[num_hidden_states, batch, dim]``: every layer's pooled (and, if configured, normalised) vector."""
        pooled = torch.stack([self.pool(h, attention_mask) for h in self.hidden_states(input_ids, attention_mask)])
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


@torch.inference_mode()
def encode_texts(encoder: TextEncoder, texts: list[str], layers: list[int], batch_size: int = 64) -> Tensor:
    """``[len(layers), len(texts), dim]`` float32 on the CPU, in the order given: the texts are batched
    longest first (so a batch pads little) on the encoder's device."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    device = next(encoder.parameters()).device
    out = torch.empty(len(layers), len(texts), encoder.hidden_size)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {key: value.to(device) for key, value in encoder.tokenize([texts[i] for i in rows]).items()}
        out[:, rows] = encoder(**batch)[layers].float().cpu()
    return out
