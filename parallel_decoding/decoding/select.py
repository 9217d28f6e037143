"""Which decoder runs an answer: the one the caller holds, else the eager reference, or a new fast decoder when
compile is on."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from .arena import prepare_fast_decoder
from .eager import EagerDecoder
from .interface import Decoder, compile_enabled


def decoder_for(model: PreTrainedModel, compile: Any = False, decoder: Decoder | None = None) -> Decoder:
    """The decoder of a new answer, reset: ``decoder`` when the caller holds one (e.g. a fast decoder whose graphs
    were compiled before, ``arena.prepare_fast_decoder``), else a fast decoder made for this answer when compile is
    on (``interface.compile_enabled``), else the eager reference decoder."""
    if decoder is not None:
        decoder.reset()
        return decoder
    if compile_enabled(compile, model.device):
        return prepare_fast_decoder(model)
    return EagerDecoder(model)
