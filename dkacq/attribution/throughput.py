"""The progress bar of ``dkacq attribute``: texts attributed and texts per second."""

from dkacq.encoders.extraction import TextProgressBar

PLURALS = {"query": "queries", "passage": "passages"}


class TextThroughputBar(TextProgressBar):
    """TQDM's bar counted in texts (a batch holds several), with the rate in texts per second::

    attributing minilm: queries 100%|██████████| 200/200 [00:41<00:00, 4.85 texts/s]
    """

    def describe(self, trainer, pl_module) -> str:
        if self.description:
            return self.description
        preset, side = getattr(pl_module, "preset", None), getattr(pl_module.hparams, "text_side", None)
        if preset is None or side is None:
            return "attributing"
        return f"attributing {preset.label}: {PLURALS.get(side, side)}"
