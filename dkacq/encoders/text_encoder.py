"""Texts to token ids to every hidden state's pooled vector, for one side (queries or passages)."""

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dkacq.encoders.pooling import Pooling, pool


class TextEncoder(nn.Module):
    """A transformer with its tokenizer, text prefix, maximum length and pooling.

    EOS pooling follows Tevatron's RepLlama: the text is truncated to ``max_length - 1`` tokens, the EOS
    id is appended, and the vector is read at the last real token whatever the padding side.
    ``eos_reference`` reproduces the published code instead: the string of the EOS token appended to
    the text, padding to ``max_length`` on the right, and the vector read at the last position.
    """

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        pooling: Pooling,
        prefix: str = "",
        max_length: int = 512,
        normalize: bool = False,
    ):
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.prefix = prefix
        self.max_length = max_length
        self.normalize = normalize

    @property
    def num_hidden_states(self) -> int:
        return self.transformer.config.num_hidden_layers + 1

    @property
    def hidden_size(self) -> int:
        return self.transformer.config.hidden_size

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Unpadded token ids of each text, as the forward pass will see them."""
        texts = [self.prefix + text for text in texts]
        if self.pooling == "eos":
            ids = self.tokenizer(texts, truncation=True, max_length=self.max_length - 1)["input_ids"]
            return [row + [self.tokenizer.eos_token_id] for row in ids]
        if self.pooling == "eos_reference":
            texts = [f"{text} {self.tokenizer.eos_token}" for text in texts]
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def collate(self, ids: list[list[int]]) -> dict[str, Tensor]:
        """Pad token id rows into a batch: to the longest row, or to ``max_length`` for ``eos_reference``."""
        if self.pooling == "eos_reference":
            padding = dict(padding="max_length", max_length=self.max_length)
        else:
            padding = dict(padding="longest")
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", **padding)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        return self.collate(self.token_ids(texts))

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        """Every hidden state, the embedding output first (``num_hidden_states`` of them)."""
        output = self.transformer(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return output.hidden_states

    def pool(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """The pooled vector of one hidden state, before any normalisation."""
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[num_hidden_states, batch, dim]``: every layer's pooled (and, if configured, normalised) vector."""
        pooled = torch.stack([self.pool(h, attention_mask) for h in self.hidden_states(input_ids, attention_mask)])
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
