"""`StudioBlocks`: gr.Blocks whose refusals of malformed requests are sentences.

Gradio turns every exception that is not a `gr.Error` into `{"error": null}` (with
`show_error=False`, as it must be here), and its own input checks raise plain exceptions: a request
with too few values, a table sent as `null`, a forged file payload all got no sentence, and the
traceback quoted the whole payload into the log (a 60 MB data URL in 1.4 s; threat model,
finding 9). Three hooks of Gradio 6's Blocks turn them into `gr.Error`s that name the
endpoint and the input, and log one short line instead; a fourth runs a component's own check
on its raw value before Gradio parses it (`check_raw_value`).
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
from gradio.exceptions import ComponentProcessingError
from pydantic import ValidationError

log = logging.getLogger(__name__)

# What Gradio's preprocessing raises on a malformed value (pydantic for file payloads, ValueError
# for paths outside the upload folder, TypeError / KeyError / AttributeError on wrong shapes).
MALFORMED = (ValidationError, ValueError, TypeError, KeyError, AttributeError)


def _endpoint(block_fn: Any) -> str:
    api_name = getattr(block_fn, "api_name", None)
    return f"/{api_name}" if api_name else "this event"


def _label(block: Any, index: int) -> str:
    label = getattr(block, "label", None)
    return f"'{label}' (value {index + 1})" if label else f"value {index + 1}"


RAW_CHECK = "studio_raw_check"  # attribute of a component: a check of its raw JSON value


def check_raw_value(component: Any, check: Any) -> Any:
    """Have `check(raw_value)` run on the component's value as sent, before Gradio parses it (and
    before pydantic builds its model of it): a 23 MB table cost 15 s and +870 MB to parse before
    the row limit could refuse it (threat model, finding 8b). `check` raises gr.Error."""
    setattr(component, RAW_CHECK, check)
    return component


class StudioBlocks(gr.Blocks):
    def validate_inputs(self, block_fn: Any, inputs: list[Any]) -> None:
        needed = len(block_fn.inputs)
        if len(inputs) < needed:
            states = sum(isinstance(block, gr.State) for block in block_fn.inputs)
            hidden = f" ({needed - states} listed on the API page, then null for each of its {states} session states)"
            raise gr.Error(
                f"This request sends {len(inputs)} value(s), and {_endpoint(block_fn)} takes {needed}"
                f"{hidden if states else ''}; gradio_client fills in the defaults."
            )

    @staticmethod
    def _format_processing_error(
        block_fn: Any, index: int, block: Any, value: Any, is_input: bool, original_error: Exception
    ) -> str:
        # Gradio's own message quotes `value` whole; this one names the input and the kind of error.
        side = "sent to" if is_input else "returned by"
        return (
            f"The value {side} {_endpoint(block_fn)} for {_label(block, index)} is not one that input "
            f"takes ({type(original_error).__name__})."
        )

    async def preprocess_data(
        self, block_fn: Any, inputs: list[Any], state: Any, explicit_call: bool = False
    ) -> Any:
        for block, value in zip(block_fn.inputs, inputs, strict=False):
            check = getattr(block, RAW_CHECK, None)
            if check is not None:
                check(value)
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except ComponentProcessingError as error:
            log.info("Refused a request to %s: %s", _endpoint(block_fn), error)
            raise gr.Error(str(error)) from None
        except MALFORMED as error:
            log.info("Refused a request to %s: %s", _endpoint(block_fn), type(error).__name__)
            raise gr.Error(
                f"A value sent to {_endpoint(block_fn)} is not in the form its input takes "
                f"({type(error).__name__}); a file must be one this server gave out (upload it first: "
                "gradio_client's handle_file does)."
            ) from None
