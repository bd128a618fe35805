"""Settings: one validated dataclass built from command-line flags and BLIP2_* environment variables.

Every flag `--some-flag` has the environment variable `BLIP2_SOME_FLAG`; a flag wins over the
variable, the variable over the default. Handlers never read these: `Settings` is passed in.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from .backends import BACKENDS
from .errors import SettingsError
from .precisions import PRECISIONS, PRESETS

DEFAULT_MODEL = "blip2-opt-2.7b"
PRECISION_CHOICES = ("auto", *PRESETS)
CACHE_EXAMPLES_CHOICES = ("auto", "lazy", "off")
INT8_KERNELS_CHOICES = ("fbgemm", "onednn")  # quantization.INT8_KERNELS (torch-free here)
PACKING_CHOICES = ("background", "startup")  # when dynamic-int8 layers are packed (packing.py)
BACKEND_CHOICES = tuple(BACKENDS)  # --backend: the names in backends.BACKENDS


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    retrieval_model: str = "auto"  # "auto": the model's registry partner; "none": no retrieval
    precision: str = "auto"
    vision_precision: str | None = None
    qformer_precision: str | None = None
    llm_precision: str | None = None
    device: str = "auto"
    models_file: str | None = None
    # Opt-in: the model to start on when `model` cannot be fetched (not on disk, not in the Hugging
    # Face cache, no network), e.g. the bundled "shapes-demo". None: such a start fails, as before.
    fallback_model: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    # Opt-in: serve the public endpoints as MCP tools (Gradio's mcp_server) for agents. Off by
    # default: an agent is one more client, and the model's tools then answer without a browser.
    mcp: bool = False
    concurrency: int = 1
    # Caption and answer requests that arrive together run as one engine batch (batching.py): at
    # most this many (1: one at a time); it starts once none has joined for `batch_wait_ms`, or
    # `batch_max_wait_ms` after the first.
    max_batch_size: int = 8
    batch_wait_ms: float = 100.0
    batch_max_wait_ms: float = 500.0
    # Batch at dynamic-int8 / int8 too, whose results then depend slightly on the batch-mates
    # (activations are quantized per batch); off: at those precisions requests run one at a time.
    batch_quantized: bool = False
    max_queue: int = 16
    cache_entries: int = 256
    cache_mb: int = 512
    max_image_pixels: int = 40_000_000
    max_upload_mb: int = 25
    max_gallery_images: int | None = None  # None: the built-in 200 (ui.sessions.MAX_GALLERY_IMAGES)
    max_galleries: int = 32
    max_chat_turns: int = 50
    # Memory for the chat sessions' cached prefixes (each session's last turn as the language
    # model's keys and values), all sessions together; 0 turns the reuse off. See chat_prefix.py.
    chat_prefix_mb: int = 256
    max_sessions: int = 1000
    # What one client (IP address) may take of the shared limits: see docs/threat-model.md.
    max_upload_request_mb: int = 512
    upload_mb_per_client_hour: int = 2048
    max_pending_per_client: int = 8
    max_new_sessions_per_client: int = 120
    max_galleries_per_client: int = 4
    session_ttl_minutes: float = 360.0
    upload_ttl_minutes: float = 360.0
    available_memory_mb: int | None = None  # None: MemAvailable (or free GPU memory); 0: no check
    threads: int | None = None
    # Where quantized models are kept between starts (weight_cache.py): "auto" (~/.cache/
    # blip2-studio/weights or $BLIP2_WEIGHT_CACHE), a folder, or "off".
    weight_cache: str = "auto"
    # Which of torch's int8 libraries runs dynamic-int8 on CPU: "fbgemm" or "onednn" (faster for
    # the vision encoder on CPUs with AMX, slower to pack and to decode: decision 0010).
    int8_kernels: str = "fbgemm"
    # When dynamic-int8 layers are packed for those kernels (packing.py, decision 0011):
    # "background" (serve at once, unpacked int8 until packed) or "startup" (before serving).
    packing: str = "background"
    # Keep the loading allocator settings while serving: lower memory peaks, slower beam search
    # (measured in benchmarks/results/memory_phases.md; see allocator.py).
    low_memory: bool = False
    # "auto": lazy on a Hugging Face Space (SPACE_ID set), off elsewhere; resolved in from_namespace.
    cache_examples: str = "auto"
    # Where captions, answers and chat are generated: "local" (this process) or "vllm" (a vLLM
    # server's OpenAI-compatible API at vllm_url; retrieval stays local). See backends/vllm.py.
    backend: str = "local"
    vllm_url: str | None = None
    vllm_model: str | None = None
    vllm_timeout_s: float = 60.0
    vllm_retries: int = 2

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_CHOICES:
            raise SettingsError(
                f"precision must be one of {', '.join(PRECISION_CHOICES)}; got {self.precision!r}."
            )
        for name in ("vision_precision", "qformer_precision", "llm_precision"):
            value = getattr(self, name)
            if value is not None and value not in PRECISIONS:
                raise SettingsError(f"{name} must be one of {', '.join(PRECISIONS)}; got {value!r}.")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise SettingsError(f"device must be auto, cpu or cuda[:N]; got {self.device!r}.")
        if not 0 < self.port < 65536:
            raise SettingsError(f"port must be between 1 and 65535; got {self.port}.")
        positive = (
            "concurrency",
            "max_batch_size",
            "max_queue",
            "max_image_pixels",
            "max_upload_mb",
            "max_galleries",
            "max_chat_turns",
            "max_sessions",
            "max_upload_request_mb",
            "upload_mb_per_client_hour",
            "max_pending_per_client",
            "max_new_sessions_per_client",
            "max_galleries_per_client",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1; got {getattr(self, name)}.")
        if self.max_gallery_images is not None and self.max_gallery_images < 1:
            raise SettingsError(f"max_gallery_images must be at least 1; got {self.max_gallery_images}.")
        for name in ("session_ttl_minutes", "upload_ttl_minutes"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):  # also refuses NaN
                raise SettingsError(f"{name} must be a positive number of minutes; got {value}.")
        if self.available_memory_mb is not None and self.available_memory_mb < 0:
            raise SettingsError(
                f"available_memory_mb must be 0 (no check) or more; got {self.available_memory_mb}."
            )
        if not 0 <= self.batch_wait_ms <= 10_000:  # also refuses NaN
            raise SettingsError(f"batch_wait_ms must be from 0 to 10000; got {self.batch_wait_ms}.")
        if not self.batch_wait_ms <= self.batch_max_wait_ms <= 10_000:
            raise SettingsError(
                f"batch_max_wait_ms must be from batch_wait_ms ({self.batch_wait_ms}) to 10000; "
                f"got {self.batch_max_wait_ms}."
            )
        for name in ("cache_entries", "cache_mb", "chat_prefix_mb"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be 0 (off) or more; got {getattr(self, name)}.")
        if self.threads is not None and self.threads < 1:
            raise SettingsError(f"threads must be at least 1; got {self.threads}.")
        if self.int8_kernels not in INT8_KERNELS_CHOICES:
            raise SettingsError(
                f"int8_kernels must be one of {', '.join(INT8_KERNELS_CHOICES)}; got {self.int8_kernels!r}."
            )
        if self.packing not in PACKING_CHOICES:
            raise SettingsError(f"packing must be one of {', '.join(PACKING_CHOICES)}; got {self.packing!r}.")
        if not self.weight_cache.strip():
            raise SettingsError("weight_cache must be auto, off or a folder; got an empty value.")
        if not self.model.strip():
            raise SettingsError("model must not be empty.")
        if self.fallback_model is not None and not self.fallback_model.strip():
            raise SettingsError("fallback_model must not be empty (leave it unset for no fallback).")
        if self.cache_examples not in CACHE_EXAMPLES_CHOICES:
            raise SettingsError(
                f"cache_examples must be one of {', '.join(CACHE_EXAMPLES_CHOICES)}; got {self.cache_examples!r}."
            )
        self._check_backend()

    def _check_backend(self) -> None:
        if self.backend not in BACKEND_CHOICES:
            raise SettingsError(f"backend must be one of {', '.join(BACKEND_CHOICES)}; got {self.backend!r}.")
        if self.backend == "vllm":
            if not self.vllm_url:
                raise SettingsError(
                    "--backend vllm needs --vllm-url, the server's OpenAI address (e.g. http://127.0.0.1:8000/v1)."
                )
            if not self.vllm_url.startswith(("http://", "https://")):
                raise SettingsError(f"vllm_url must start with http:// or https://; got {self.vllm_url!r}.")
        if not 0 < self.vllm_timeout_s <= 3600:  # also refuses NaN
            raise SettingsError(
                f"vllm_timeout_s must be between 0 and 3600 seconds; got {self.vllm_timeout_s}."
            )
        if not 0 <= self.vllm_retries <= 10:
            raise SettingsError(f"vllm_retries must be between 0 and 10; got {self.vllm_retries}.")

    @property
    def precision_overrides(self) -> dict[str, str | None]:
        return {"vision": self.vision_precision, "qformer": self.qformer_precision, "llm": self.llm_precision}

    def server_name(self, on_space: bool = False) -> str | None:
        """The host to bind; None leaves it to GRADIO_SERVER_NAME, which a Hugging Face Space sets
        (a default --host must not override the platform's choice there)."""
        return None if on_space and self.host == Settings.host else self.host

    @classmethod
    def from_sources(
        cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        parser = argparse.ArgumentParser(description="BLIP-2 Studio: captioning, visual chat and retrieval.")
        add_arguments(parser, env if env is not None else os.environ)
        args = parser.parse_args(argv)
        return cls.from_namespace(args, env)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from parsed flags; fields without a flag in `args` (e.g. the CLI's subcommands
        declare only the model flags) still follow their BLIP2_* variable."""
        env = env if env is not None else os.environ
        values = {}
        for f in fields(cls):
            if hasattr(args, f.name):
                values[f.name] = getattr(args, f.name)
            else:
                values[f.name] = _env_value(env, f.name, _kind(f), f.default)
        if values["cache_examples"] == "auto":
            # A Space has many visitors clicking the same examples; a laptop has one.
            values["cache_examples"] = "lazy" if env.get("SPACE_ID") else "off"
        return cls(**values)

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


def _kind(f: dataclasses.Field) -> type:
    if f.type == "bool":
        return bool
    if f.type in ("int", "int | None"):
        return int
    if f.type in ("float", "float | None"):
        return float
    return str


def _env_value(env: Mapping[str, str], name: str, kind: type, default):
    raw = env.get(f"BLIP2_{name.upper()}")
    if raw is None or raw == "":
        return default
    if kind is bool:
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    try:
        return kind(raw)
    except ValueError as error:
        raise SystemExit(f"BLIP2_{name.upper()}={raw!r} is not a valid {kind.__name__}.") from error


def add_arguments(
    parser: argparse.ArgumentParser, env: Mapping[str, str], only: Sequence[str] | None = None
) -> None:
    """Add a flag per Settings field (or the `only` ones), defaulting to its BLIP2_* variable."""
    helps = {
        "model": "registry name, local checkpoint folder or hub id (tiny-random starts offline)",
        "retrieval_model": "retrieval (ITM) model: 'auto' = the model's partner, 'none' = no retrieval",
        "precision": "preset for all components: auto, " + ", ".join(PRESETS),
        "vision_precision": "override for the vision encoder: " + ", ".join(PRECISIONS),
        "qformer_precision": "override for the Q-Former: " + ", ".join(PRECISIONS),
        "llm_precision": "override for the language model: " + ", ".join(PRECISIONS),
        "device": "auto (cuda if present, else cpu), cpu, cuda, cuda:N",
        "models_file": "JSON file with extra registry entries",
        "fallback_model": "model to start on when --model cannot be fetched (offline, not cached), "
        "e.g. shapes-demo, the bundled demo model; a banner then says so on every tab (default: none, "
        "such a start fails)",
        "host": "address to bind (127.0.0.1 keeps the app private to this machine)",
        "port": "port to listen on",
        "share": "create a public gradio.live link (off unless asked)",
        "mcp": "also serve caption, answer and gallery search as MCP tools for agents, at "
        "/gradio_api/mcp/ (off unless asked; every limit still holds)",
        "concurrency": "model requests run at the same time",
        "max_batch_size": "caption and answer requests that arrive together run as one batch of at "
        "most this many (1 = one at a time)",
        "batch_wait_ms": "a batch of caption and answer requests starts once none has joined it "
        "for this long, in milliseconds (0-10000; a lone request waits this long)",
        "batch_max_wait_ms": "... and at the latest this long after its first request arrived, in "
        "milliseconds (batch_wait_ms-10000)",
        "batch_quantized": "batch at the dynamic-int8 and int8 precisions too: faster with many "
        "visitors, but each result then depends slightly on its batch-mates (off: one at a time)",
        "max_queue": "requests waiting at most; more get 'queue full'",
        "cache_entries": "vision-feature cache size in images (0 = off)",
        "cache_mb": "vision-feature cache size in MB",
        "max_image_pixels": "largest image accepted, in pixels (width x height)",
        "max_upload_mb": "largest upload accepted, in MB (a base64 image in a request: the same)",
        "max_gallery_images": "images one session's gallery holds at most (also per request)",
        "max_galleries": "galleries kept in memory at once, all sessions together; the least "
        "recently used one is emptied when a new one needs room",
        "max_chat_turns": "chat turns kept per session (older ones are forgotten)",
        "chat_prefix_mb": "memory for the chat's cached prefixes (each session's last turn, as the "
        "language model's keys and values, so the next turn prefills only the new question), all "
        "sessions together, in MB; the least recently used is dropped first (0 = no reuse)",
        "max_sessions": "sessions whose state (chat, gallery) the server keeps; the oldest is dropped",
        "max_upload_request_mb": "largest upload request (all its files together), in MB",
        "upload_mb_per_client_hour": "upload MB one client (IP address) may send in an hour",
        "max_pending_per_client": "model requests one client may have waiting or running at once",
        "max_new_sessions_per_client": "new sessions (browser tabs, API clients) one client may open "
        "in 10 minutes",
        "max_galleries_per_client": "galleries one client keeps in memory; its own oldest is emptied "
        "first when it indexes another",
        "session_ttl_minutes": "a session's chat and gallery are dropped after this long unused",
        "upload_ttl_minutes": "uploaded files are deleted from the server after this long",
        "available_memory_mb": "memory the model may use, for the check before loading "
        "(default: MemAvailable from /proc/meminfo, or free GPU memory; 0 = no check)",
        "threads": "PyTorch CPU threads (default: PyTorch's choice)",
        "weight_cache": "folder for quantized models, so the next start skips quantizing (about a "
        "quarter of the fp32 checkpoint's size; auto = ~/.cache/blip2-studio/weights; off = none)",
        "int8_kernels": "torch's int8 library for dynamic-int8 on CPU: fbgemm, or onednn (on a CPU "
        "with AMX: the vision encoder 1.1-1.4x faster, so indexing a gallery too, but decoding ~1.2x "
        "slower and twice the memory)",
        "packing": "dynamic-int8 on CPU: background = serve at once while the int8 layers are "
        "packed for the int8 kernels (requests meanwhile run the same int8 weights unpacked, slower; "
        "about 15 s at OPT-2.7B size), startup = pack before serving",
        "low_memory": "keep memory peaks lower while serving (blocks of 1 MB and up are mmapped and "
        "freed at once) at the cost of slower beam search; for machines where every 100 MB counts",
        "cache_examples": "cache the example photos' captions: lazy (first click computes, later "
        "visitors get it at once), off, or auto = lazy on a Hugging Face Space",
        "backend": "where captions, answers and chat are generated: local (this process) or vllm "
        "(a vLLM server at --vllm-url; retrieval stays local)",
        "vllm_url": "the vLLM server's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1",
        "vllm_model": "model name served by vLLM (default: the server's only model)",
        "vllm_timeout_s": "seconds to wait for the vLLM server's next byte before giving up",
        "vllm_retries": "extra attempts for a vLLM request that could not reach the server",
    }
    for f in fields(Settings):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if _kind(f) is bool:
            parser.add_argument(
                flag, action="store_true", default=_env_value(env, f.name, bool, default), help=helps[f.name]
            )
            continue
        kind = _kind(f)
        shown = 200 if f.name == "max_gallery_images" and default is None else default
        parser.add_argument(
            flag,
            type=kind,
            default=_env_value(env, f.name, kind, default),
            help=helps[f.name] + f" [{shown}]",
        )
