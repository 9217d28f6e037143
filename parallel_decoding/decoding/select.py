"""Which decoder runs an answer: the eager reference, or the model's fast decoder when compile is on."""

from __future__ import annotations

from .arena import fast_decoder
from .eager import EagerDecoder
from .interface import compile_enabled


def decoder_for(model, compile=False):
    """The eager reference decoder, or the model's fast decoder (reset for a new answer) when compile is on."""
    if compile_enabled(compile, model.device):
        decoder = fast_decoder(model)
        decoder.reset()
        return decoder
    return EagerDecoder(model)
