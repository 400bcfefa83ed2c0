"""Pooling against hand-computed values, and on tiny models against each text encoded alone."""

import pytest
import torch

from dkacq.encoders.loading import load_encoders
from dkacq.encoders.pooling import pool

HIDDEN = torch.tensor(
    [
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]],
        [[9.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]],
    ]
)


@pytest.mark.parametrize(
    "mask, cls, mean, eos",
    [
        # right padding: row 0 has 3 real tokens, row 1 has 2
        ([[1, 1, 1, 0], [1, 1, 0, 0]], [[1, 2], [9, 1]], [[3, 4], [5.5, 2]], [[5, 6], [2, 3]]),
        # left padding: row 0 has 3 real tokens, row 1 has 2; CLS is the first real token
        ([[0, 1, 1, 1], [0, 0, 1, 1]], [[3, 4], [4, 5]], [[5, 6], [5, 6]], [[7, 8], [6, 7]]),
    ],
)
def test_pooling_by_hand(mask, cls, mean, eos):
    mask = torch.tensor(mask)
    assert torch.equal(pool(HIDDEN, mask, "cls"), torch.tensor(cls, dtype=torch.float))
    assert torch.equal(pool(HIDDEN, mask, "mean"), torch.tensor(mean, dtype=torch.float))
    assert torch.equal(pool(HIDDEN, mask, "eos"), torch.tensor(eos, dtype=torch.float))
    assert torch.equal(pool(HIDDEN, mask, "eos_reference"), HIDDEN[:, -1])
    assert torch.equal(pool(HIDDEN, mask, "lasttoken"), torch.tensor(eos, dtype=torch.float))


@pytest.mark.parametrize(
    "mask, maximum, sqrt_len, weighted",
    [
        # right padding; weights 1, 2, 3 from the first real token
        (
            [[1, 1, 1, 0], [1, 1, 0, 0]],
            [[5, 6], [9, 3]],
            [[9 / 3**0.5, 12 / 3**0.5], [11 / 2**0.5, 4 / 2**0.5]],
            [[(1 + 6 + 15) / 6, (2 + 8 + 18) / 6], [(9 + 4) / 3, (1 + 6) / 3]],
        ),
        # left padding: the same weights, counted from the first real token
        (
            [[0, 1, 1, 1], [0, 0, 1, 1]],
            [[7, 8], [6, 7]],
            [[15 / 3**0.5, 18 / 3**0.5], [10 / 2**0.5, 12 / 2**0.5]],
            [[(3 + 10 + 21) / 6, (4 + 12 + 24) / 6], [(4 + 12) / 3, (5 + 14) / 3]],
        ),
    ],
)
def test_sentence_transformers_poolings_by_hand(mask, maximum, sqrt_len, weighted):
    mask = torch.tensor(mask)
    torch.testing.assert_close(pool(HIDDEN, mask, "max"), torch.tensor(maximum, dtype=torch.float))
    torch.testing.assert_close(pool(HIDDEN, mask, "mean_sqrt_len"), torch.tensor(sqrt_len, dtype=torch.float))
    torch.testing.assert_close(pool(HIDDEN, mask, "weightedmean"), torch.tensor(weighted, dtype=torch.float))


def test_unknown_pooling_is_one_line():
    with pytest.raises(ValueError, match="unknown pooling 'min'") as error:
        pool(HIDDEN, torch.ones(2, 4), "min")
    assert "\n" not in str(error.value)


TEXTS = ["the python list", "a class is an object with a method that does what it is", "data"]


def _alone(encoder, text):
    """The hidden states of one text with no padding at all: the oracle for batched pooling."""
    batch = encoder.tokenize([text])
    return encoder.hidden_states(**batch), batch["input_ids"][0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_eos_pooling_reads_appended_eos_on_tiny_llama(tiny_llama_preset, side):
    encoder, _ = load_encoders(tiny_llama_preset, dtype=torch.float64)
    encoder.tokenizer.padding_side = side
    batch = encoder.tokenize(TEXTS)
    pooled = encoder(**batch)
    for row, text in enumerate(TEXTS):
        states, ids = _alone(encoder, text)
        assert ids[-1] == encoder.tokenizer.eos_token_id
        assert ids[0] == encoder.tokenizer.bos_token_id
        for layer, hidden in enumerate(states):
            expected = torch.nn.functional.normalize(hidden[0, -1], dim=0)
            # rotary angles are computed in float32, so shifted positions agree to ~1e-9, not 1e-15
            torch.testing.assert_close(pooled[layer, row], expected, rtol=1e-6, atol=1e-6)


def test_eos_appended_after_truncation(tiny_llama_preset):
    encoder, _ = load_encoders(tiny_llama_preset)
    long_text = " ".join(["python"] * 100)
    ids = encoder.token_ids([long_text])[0]
    assert len(ids) == encoder.max_length
    assert ids[-1] == encoder.tokenizer.eos_token_id
    assert ids[-2] != encoder.tokenizer.eos_token_id


def test_reference_eos_reads_the_last_padded_position(tiny_llama_preset):
    from dataclasses import replace

    encoder, _ = load_encoders(
        replace(tiny_llama_preset, pooling="eos_reference", normalize=False), dtype=torch.float64
    )
    batch = encoder.tokenize(TEXTS)
    assert batch["input_ids"].shape[1] == encoder.max_length
    states = encoder.hidden_states(**batch)
    torch.testing.assert_close(encoder(**batch)[-1], states[-1][:, -1])
    assert (batch["attention_mask"][:, -1] == 0).any(), "short texts end in padding, the published defect"


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_bert_pooling_with_right_padding(tiny_bert_preset, pooling):
    from dataclasses import replace

    encoder, _ = load_encoders(replace(tiny_bert_preset, pooling=pooling), dtype=torch.float64)
    pooled = encoder(**encoder.tokenize(TEXTS))
    for row, text in enumerate(TEXTS):
        states, _ = _alone(encoder, text)
        for layer, hidden in enumerate(states):
            expected = hidden[0, 0] if pooling == "cls" else hidden[0].mean(dim=0)
            torch.testing.assert_close(pooled[layer, row], expected, rtol=1e-9, atol=1e-9)
