"""Captions, answers and chat from a vLLM server (its OpenAI-compatible API); retrieval stays local.

`--backend vllm --vllm-url http://HOST:PORT/v1` swaps the in-process language model for a vLLM
server running the same BLIP-2 checkpoint. The engine builds the prompts whichever backend
it holds (prompts.py, `Engine.build_chat_prompt`), so both backends send the same text; the
image goes along as a PNG data URL in an OpenAI chat message, and vLLM's BLIP-2 model puts the
image tokens in front of the text itself, as transformers' processor does.

The server must render a chat message as its text alone (`--chat-template` with
`blip2_app/vllm_chat_template.jinja`, `--chat-template-content-format string`): BLIP-2
checkpoints have no chat template, and a chat template would change the prompt.

Failures get their own sentence (see the error classes below); requests have bounded timeouts,
and a request that never reached the server is retried a few times before giving up.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import InvalidRequestError, ModelLoadError, UserFacingError
from ..generation import GenerationSettings
from ..registry import ModelEntry
from .base import CheckpointText

if TYPE_CHECKING:
    from ..config import Settings
    from ..engine import PreparedImage, VisionCache
    from . import WeightLoader

log = logging.getLogger(__name__)

CHAT_TEMPLATE = Path(__file__).parent.parent / "vllm_chat_template.jinja"
STATUS_TIMEOUT_S = 5.0  # the Model tab's health check: a down server must not hang the page
BACKOFF_S = 0.5  # first pause between retries; doubles each time
RETRY_STATUS = {502, 503, 504}  # a proxy or a server still starting: worth another try
SERVER_MESSAGE_CHARS = 300

# Decoding knobs vLLM's sampler has no equivalent for: shown disabled in the UI, refused in the API.
UNSUPPORTED_KNOBS: dict[str, str] = {
    "beam": "Beam search is not available with the vLLM backend: choose greedy or nucleus sampling.",
    "num_beams": "Beams: beam search is not available with the vLLM backend.",
    "length_penalty": "Length penalty applies to beam search, which the vLLM backend does not offer.",
    "no_repeat_ngram_size": "No-repeat n-gram size is not supported by vLLM's sampler "
    "(use the repetition penalty instead).",
}


# --------------------------------------------------------------------------- errors
class BackendError(UserFacingError):
    """The vLLM server could not give an answer; the message says why and what to do."""


class BackendUnavailableError(BackendError):
    """No connection to the server, or it dropped the connection."""


class BackendTimeoutError(BackendError):
    """The server took longer than --vllm-timeout-s."""


class BackendResponseError(BackendError):
    """The server answered something the app cannot read (not the OpenAI format)."""


class BackendRequestError(BackendError):
    """The server refused the request (4xx/5xx with its own message)."""


class UnsupportedDecodingError(InvalidRequestError):
    """A decoding setting the vLLM backend does not have."""


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class VLLMOptions:
    """Where the server is and how patient to be with it."""

    url: str  # the OpenAI base URL, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # served model name; None: the server's only model
    timeout_s: float = 60.0  # longest wait for the next byte of a reply
    retries: int = 2  # extra attempts for a request that did not reach the server
    connect_timeout_s: float = 5.0

    @property
    def root(self) -> str:
        """The server root (where /health lives): the URL without its /v1."""
        base = self.url.rstrip("/")
        return base[: -len("/v1")] if base.endswith("/v1") else base


def check_supported(generation: GenerationSettings) -> None:
    """Refuse, with a sentence naming the knob, what vLLM cannot do (rather than ignore it)."""
    if generation.decoding == "beam":
        raise UnsupportedDecodingError(
            UNSUPPORTED_KNOBS["beam"] + " (num_beams and length_penalty belong to beam search.)"
        )
    if generation.no_repeat_ngram_size:
        raise UnsupportedDecodingError(
            f"no_repeat_ngram_size={generation.no_repeat_ngram_size} is not supported by the vLLM backend: "
            "set it to 0 and use repetition_penalty instead."
        )


def sampling_params(generation: GenerationSettings) -> dict[str, Any]:
    """vLLM request fields for `generation` (after `check_supported`)."""
    params: dict[str, Any] = {
        "max_tokens": generation.max_new_tokens,
        "min_tokens": generation.min_new_tokens,
        "repetition_penalty": generation.repetition_penalty,
        "n": generation.num_captions,
    }
    if generation.decoding == "greedy":
        params.update(temperature=0.0, top_p=1.0)
    else:
        params.update(temperature=generation.temperature, top_p=generation.top_p)
    if generation.seed is not None:
        params["seed"] = generation.seed
    return params


def vllm_decoding(generation: GenerationSettings) -> GenerationSettings:
    """A registry default the server can run: beam search becomes greedy, no n-gram blocking."""
    changes: dict[str, Any] = {"no_repeat_ngram_size": 0}
    if generation.decoding == "beam":
        changes.update(decoding="greedy", num_captions=1)
    return dataclasses.replace(generation, **changes)


def png_data_url(image: Any) -> str:
    """A lossless data URL of a decoded (RGB) PIL image: the server sees the same pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- HTTP client
@dataclass
class ServerStatus:
    """What the Model tab shows about the server (read at the time of asking)."""

    url: str
    healthy: bool
    model: str | None = None
    root: str | None = None
    max_model_len: int | None = None
    latency_ms: float | None = None
    detail: str = ""


@dataclass
class Completion:
    rows: list[list[int]]  # generated token ids per sequence
    prompt_token_ids: list[int] | None  # as the server tokenized it (image tokens included)


class VLLMClient:
    """The few OpenAI-compatible calls the app makes, with bounded timeouts and retries."""

    def __init__(self, options: VLLMOptions, transport: httpx.BaseTransport | None = None):
        self.options = options
        timeout = httpx.Timeout(options.timeout_s, connect=options.connect_timeout_s)
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        self._http = httpx.Client(timeout=timeout, limits=limits, transport=transport)
        self._model = options.model

    def close(self) -> None:
        self._http.close()

    # ----------------------------------------------------------------- messages
    @property
    def url(self) -> str:
        return self.options.url.rstrip("/")

    def _unreachable(self, error: Exception) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"The vLLM server at {self.url} cannot be reached ({_reason(error)}). Check that it is running "
            "(see README, “Scaling out”), or start the app with --backend local."
        )

    def _timed_out(self, seconds: float | None = None) -> BackendTimeoutError:
        seconds = self.options.timeout_s if seconds is None else seconds
        return BackendTimeoutError(
            f"The vLLM server at {self.url} sent nothing for {seconds:g} s and the request "
            "was stopped. It may be overloaded: try again in a moment (--vllm-timeout-s sets the limit)."
        )

    def _malformed(self, what: str) -> BackendResponseError:
        return BackendResponseError(
            f"The vLLM server at {self.url} sent a reply the app cannot read ({what}). Is --vllm-url the "
            "OpenAI-compatible address of a vLLM server (ending in /v1)?"
        )

    def _refused(self, response: httpx.Response) -> BackendRequestError:
        message = _server_message(response)
        status = response.status_code
        if status == 404 and "model" in message.lower():
            return BackendRequestError(
                f"The vLLM server at {self.url} does not serve the model {self._model!r} ({message}). "
                "Set --vllm-model to the name it serves (GET /v1/models lists it)."
            )
        if "chat template" in message.lower():
            return BackendRequestError(
                f"The vLLM server at {self.url} has no usable chat template ({message}). Start it with "
                f"--chat-template {CHAT_TEMPLATE.name} --chat-template-content-format string "
                "(README, “Scaling out”)."
            )
        return BackendRequestError(
            f"The vLLM server at {self.url} refused the request (HTTP {status}: {message})."
        )

    # ----------------------------------------------------------------- plumbing
    def _send(
        self, method: str, url: str, stream: bool = False, quick: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """One request, retried while it cannot connect or the server says it is not ready yet.
        `quick`: a status probe, one attempt with a short timeout."""
        attempts = 1 if quick else self.options.retries + 1
        if quick:
            kwargs["timeout"] = httpx.Timeout(STATUS_TIMEOUT_S)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                request = self._http.build_request(method, url, **kwargs)
                response = self._http.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                if last:
                    raise self._unreachable(error) from error
            except httpx.TimeoutException as error:  # read/write/pool: the server is slow, not gone
                raise self._timed_out(STATUS_TIMEOUT_S if quick else None) from error
            except httpx.TransportError as error:  # reset, protocol error before any reply
                if last:
                    raise self._unreachable(error) from error
            else:
                if response.status_code not in RETRY_STATUS or last:
                    return response
                response.close()
            pause = BACKOFF_S * 2**attempt
            log.warning(
                "vLLM request to %s failed (attempt %d of %d); retrying in %.1f s",
                url,
                attempt + 1,
                attempts,
                pause,
            )
            time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise self._malformed(f"not JSON: {_short(response.text)}") from error

    def served_model(self) -> str:
        """The model name to send: --vllm-model, else the one model the server lists."""
        if self._model:
            return self._model
        models = self.models()
        if len(models) != 1:
            names = ", ".join(m.get("id", "?") for m in models) or "none"
            raise BackendRequestError(
                f"The vLLM server at {self.url} serves {len(models)} models ({names}); "
                "choose one with --vllm-model."
            )
        self._model = str(models[0]["id"])
        return self._model

    def models(self, quick: bool = False) -> list[dict[str, Any]]:
        response = self._send("GET", self.url + "/models", quick=quick)
        if response.status_code != 200:
            raise self._refused(response)
        data = self._json(response)
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list) or not all(isinstance(m, dict) and "id" in m for m in models):
            raise self._malformed("GET /models has no list of models")
        return models

    def status(self) -> ServerStatus:
        """Health, served model and round-trip time, never raising (for the Model tab)."""
        started = time.perf_counter()
        try:
            health = self._send("GET", self.options.root + "/health", quick=True)
            latency = (time.perf_counter() - started) * 1000
            if health.status_code != 200:
                return ServerStatus(
                    self.url, False, latency_ms=latency, detail=f"/health answered HTTP {health.status_code}"
                )
            models = self.models(quick=True)
        except BackendError as error:
            return ServerStatus(self.url, False, detail=str(error))
        chosen = next((m for m in models if m["id"] == self._model), models[0] if models else {})
        return ServerStatus(
            self.url,
            True,
            model=chosen.get("id"),
            root=chosen.get("root"),
            max_model_len=chosen.get("max_model_len"),
            latency_ms=latency,
            detail="healthy",
        )

    def _body(self, prompt: str, image_url: str, params: dict[str, Any], stream: bool) -> dict[str, Any]:
        return {
            "model": self.served_model(),
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            # The template renders the text alone; BOS comes from the tokenizer, as in the local engine.
            "add_special_tokens": True,
            "add_generation_prompt": False,
            "skip_special_tokens": True,
            "stream": stream,
            # Token ids, decoded here by the checkpoint's tokenizer exactly as the local engine
            # decodes its own (the server's streamed text holds back incomplete UTF-8 pieces).
            "return_token_ids": True,
            **params,
        }

    # ----------------------------------------------------------------- generation
    def complete(self, prompt: str, image_url: str, params: dict[str, Any]) -> Completion:
        """Generated token ids, one list per returned sequence (`n` of them), and the prompt's."""
        response = self._send(
            "POST", self.url + "/chat/completions", json=self._body(prompt, image_url, params, False)
        )
        if response.status_code != 200:
            raise self._refused(response)
        data = self._json(response)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise self._malformed("no choices")
        rows = []
        for choice in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
            ids = choice.get("token_ids") if isinstance(choice, dict) else None
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise self._malformed("a choice without token_ids; vLLM 0.10.2 or later is needed")
            rows.append(ids)
        prompt_ids = data.get("prompt_token_ids")
        return Completion(rows, list(prompt_ids) if isinstance(prompt_ids, list) else None)

    def stream(self, prompt: str, image_url: str, params: dict[str, Any]) -> Iterator[list[int]]:
        """New token ids as the server generates them (server-sent events, one chunk each)."""
        body = self._body(prompt, image_url, {**params, "n": 1}, True)
        response = self._send("POST", self.url + "/chat/completions", stream=True, json=body)
        try:
            if response.status_code != 200:
                response.read()
                raise self._refused(response)
            yield from self._events(response)
        finally:
            response.close()

    def _events(self, response: httpx.Response) -> Iterator[list[int]]:
        finished = False
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    finished = True
                    break
                try:
                    event = json.loads(payload)
                except json.JSONDecodeError as error:
                    raise self._malformed(f"an event that is not JSON: {_short(payload)}") from error
                if not isinstance(event, dict):
                    raise self._malformed("an event that is not an object")
                if "error" in event:
                    raise BackendRequestError(
                        f"The vLLM server at {self.url} stopped with an error: {_short(str(event['error']))}"
                    )
                choices = event.get("choices")
                if not isinstance(choices, list):
                    raise self._malformed("an event without choices")
                for choice in choices:
                    if not isinstance(choice, dict):
                        raise self._malformed("a choice that is not an object")
                    ids = choice.get("token_ids")
                    if ids is None:  # the opening chunk (role only) carries no tokens
                        if (choice.get("delta") or {}).get("content"):
                            raise self._malformed("text without token_ids; vLLM 0.10.2 or later is needed")
                        continue
                    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                        raise self._malformed("token_ids that are not a list of numbers")
                    if ids:
                        yield ids
        except httpx.TimeoutException as error:
            raise self._timed_out() from error
        except httpx.TransportError as error:
            raise BackendUnavailableError(
                f"The vLLM server at {self.url} stopped in the middle of the answer ({_reason(error)}). "
                "The part shown may be incomplete; ask again once the server is back."
            ) from error
        if not finished:
            raise BackendUnavailableError(
                f"The vLLM server at {self.url} closed the stream before the answer was complete. "
                "Ask again once the server is back."
            )


def _reason(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return _short(text, 160)


def _short(text: str, limit: int = SERVER_MESSAGE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _server_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _short(response.text or response.reason_phrase)
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and "message" in error:
            return _short(str(error["message"]))
        if "message" in data:
            return _short(str(data["message"]))
        if "detail" in data:
            return _short(str(data["detail"]))
    return _short(json.dumps(data))


# --------------------------------------------------------------------------- the backend
class VLLMBackend(CheckpointText):
    """Text generated by a vLLM server. The checkpoint's processor (tokenizer, to measure prompts
    and decode answers) and config are read here; the weights live on the server. The registry
    entry carries decoding defaults the server can run (`vllm_decoding`)."""

    name = "vllm"
    loaded = None  # no weights in this process: a retrieval model loads its own vision encoder

    def __init__(
        self,
        entry: ModelEntry,
        processor: Any,
        config: Any,
        client: VLLMClient,
        notes: list[str] | None = None,
        load_seconds: float = 0.0,
    ):
        self.entry = entry
        self.processor = processor
        self.config = config
        self.client = client
        self.notes = list(notes or [])
        self.load_seconds = load_seconds

    @property
    def device(self) -> str:
        return f"vLLM server {self.client.url}"

    def bind(self, vision: VisionCache) -> None:
        pass  # the server computes the image tokens itself

    def scored_ids(
        self, image: PreparedImage, prompt: str, generation: GenerationSettings
    ) -> list[tuple[list[int], float]]:
        """vLLM has no beam search here (check_supported), so no beam's k best to score."""
        raise UnsupportedDecodingError(
            "Scored top-k answers come from beam search, which the vLLM backend does not run: "
            "use /answer for one answer, or start the app with --backend local."
        )

    def unsupported_knobs(self) -> dict[str, str]:
        return dict(UNSUPPORTED_KNOBS)

    def report(self) -> dict[str, Any]:
        status = self.client.status()
        return {
            "backend": self.name,
            "name": self.entry.name,
            "checkpoint": self.entry.checkpoint,
            "family": self.entry.family.name,
            "device": self.device,
            "server": dataclasses.asdict(status),
            "unsupported": sorted(k for k in UNSUPPORTED_KNOBS if k != "beam"),
            "notes": list(self.notes),
        }

    def generate_ids(
        self, images: Sequence[PreparedImage], prompts: Sequence[str], generation: GenerationSettings
    ) -> list[list[list[int]]]:
        check_supported(generation)
        params = sampling_params(generation)
        return [
            [self.trim(row) for row in self.client.complete(prompt, png_data_url(image.image), params).rows]
            for image, prompt in zip(images, prompts, strict=True)
        ]

    def stream_ids(
        self, image: PreparedImage, prompt: str, generation: GenerationSettings
    ) -> Generator[list[int], None, None]:
        """The server's stream; closing this iterator closes the HTTP response (`VLLMClient.stream`),
        which vLLM takes as the client going away and stops generating."""
        check_supported(generation)
        yield from self.client.stream(prompt, png_data_url(image.image), sampling_params(generation))

    def close(self) -> None:
        self.client.close()


def open_backend(entry: ModelEntry, settings: Settings, load_weights: WeightLoader) -> VLLMBackend:
    """`--backend vllm`: the checkpoint's processor here, the weights on the server (checked now)."""
    assert settings.vllm_url is not None  # Settings refuses --backend vllm without it
    options = VLLMOptions(
        url=settings.vllm_url,
        model=settings.vllm_model,
        timeout_s=settings.vllm_timeout_s,
        retries=settings.vllm_retries,
    )
    return connect(entry, options)


def connect(
    entry: ModelEntry, options: VLLMOptions, transport: httpx.BaseTransport | None = None
) -> VLLMBackend:
    """The checkpoint's processor and config loaded here,
    the server checked once (health and model), so a wrong URL fails at start-up with one sentence."""
    import transformers

    from ..loading import checkpoint_location

    family = entry.family
    if family.architecture != "Blip2ForConditionalGeneration" or not family.decoder_only:
        raise ModelLoadError(
            f"The vLLM backend serves BLIP-2 checkpoints with a decoder-only language model (OPT); "
            f"{entry.name} is {family.name}, which vLLM cannot run. Start it with --backend local."
        )
    started = time.perf_counter()
    location = checkpoint_location(entry)
    try:
        processor = getattr(transformers, family.processor).from_pretrained(location)
        config = transformers.AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as error:
        raise ModelLoadError(
            f"Could not read the processor of {entry.name} from {location}: {error}"
        ) from error
    client = VLLMClient(options, transport=transport)
    try:
        status_model = client.served_model()
    except BackendError as error:
        client.close()
        raise ModelLoadError(f"Cannot use the vLLM backend: {error}") from error
    notes = [f"Text generation runs on the vLLM server {client.url} (model {status_model!r})."]
    served = next((m for m in client.models() if m.get("id") == status_model), {})
    root = str(served.get("root") or status_model)
    if Path(root).name != Path(location).name and root != entry.checkpoint:
        notes.append(
            f"The server's model ({root}) does not look like this app's checkpoint ({location}); "
            "both must be the same checkpoint or prompts and answers will not match."
        )
    local_entry = dataclasses.replace(
        entry, decoding=vllm_decoding(entry.decoding), answer_decoding=vllm_decoding(entry.answer_decoding)
    )
    return VLLMBackend(local_entry, processor, config, client, notes, time.perf_counter() - started)
