"""A small client for an OpenAI-compatible vLLM server: completions over token ids, `/tokenize`, weight
reload and prefix-cache reset. Standard library only (urllib, and a bounded thread pool for concurrency).

Every request has a timeout and is retried with exponential backoff when the server cannot be reached or
answers 5xx (a restarting server, an overloaded one); a server that stays down raises `ServerUnavailable`
naming the URL, and the training loop adds the step. A 4xx answer is the request's fault and is raised at
once with the server's message (`ServerRefused`). Nothing here ever fills in, skips or replaces an answer:
a request either returns what the server said or raises.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class ServerUnavailable(ConnectionError):
    """A server that could not be reached, or kept failing, through every retry. An OSError: the command
    line prints it as one `opd:` line."""


class ServerRefused(ValueError):
    """A server that answered a request with a 4xx error: retrying would not help."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RetrySettings:
    timeout_seconds: float = 300.0  # per request: a long generation must fit
    attempts: int = 4  # tries per request, the first included
    backoff_seconds: float = 1.0  # wait before the second try; doubled before each further one


class ServerClient:
    """One server's base URL (`http://host:port`) and the endpoints opd uses."""

    def __init__(self, url: str, retry: RetrySettings = RetrySettings()):
        self.url = url.rstrip("/")
        self.retry = retry
        self._model_name: str | None = None

    # ----------------------------------------------------------------------- endpoints

    def models(self) -> list[dict[str, Any]]:
        """`/v1/models`: the served model(s), each with its `max_model_len`."""
        return self.request("GET", "/v1/models")["data"]

    def tokenize_messages(self, messages: list[dict[str, str]], chat_template_kwargs: dict | None = None) -> list[int]:
        """The server's own rendering of a chat prompt (its chat template, then its tokenizer)."""
        body = {"messages": messages, "add_generation_prompt": True, "add_special_tokens": False,
                "chat_template_kwargs": dict(chat_template_kwargs or {})}
        return list(self.request("POST", "/tokenize", body)["tokens"])

    def tokenize_text(self, text: str, *, add_special_tokens: bool) -> list[int]:
        body = {"prompt": text, "add_special_tokens": add_special_tokens}
        return list(self.request("POST", "/tokenize", body)["tokens"])

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """`/v1/completions` with `body` (the served model's name filled in)."""
        return self.request("POST", "/v1/completions", {"model": self.model_name, **body})

    def reload_weights(self, folder: str) -> None:
        """Load the safetensors in `folder` in place (the server needs VLLM_SERVER_DEV_MODE=1)."""
        self.request("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": folder}})

    def reset_prefix_cache(self) -> None:
        self.request("POST", "/reset_prefix_cache")

    @property
    def model_name(self) -> str:
        if self._model_name is None:
            self._model_name = self.models()[0]["id"]
        return self._model_name

    # ----------------------------------------------------------------------- transport

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """JSON in, JSON out, under the retry settings; raises ServerUnavailable or ServerRefused."""
        data = json.dumps(body).encode() if body is not None else None
        problem = ""
        for attempt in range(self.retry.attempts):
            if attempt:
                time.sleep(self.retry.backoff_seconds * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.retry.timeout_seconds) as response:
                    text = response.read()
                return json.loads(text) if text.strip() else None
            except urllib.error.HTTPError as error:
                detail = _error_message(error.read().decode(errors="replace"))
                if error.code < 500:
                    raise ServerRefused(f"{self.url}{path}: the server refused the request (HTTP {error.code}): "
                                        f"{detail}") from None
                problem = f"HTTP {error.code}: {detail}"
            except (urllib.error.URLError, OSError) as error:  # refused, reset, timed out
                problem = str(getattr(error, "reason", error))
        raise ServerUnavailable(
            f"{self.url}{path}: the server did not answer after {self.retry.attempts} attempts (timeout "
            f"{self.retry.timeout_seconds:g} s each, backoff from {self.retry.backoff_seconds:g} s): {problem}")


def _error_message(text: str) -> str:
    """The message of vLLM's JSON error body, or the start of whatever else came back."""
    try:
        return str(json.loads(text)["error"]["message"])[:500]
    except (ValueError, KeyError, TypeError):
        return text[:500]


def map_bounded(function: Callable[[Item], Result], items: Sequence[Item], concurrency: int) -> list[Result]:
    """`function` over `items` with at most `concurrency` calls in flight, results in order; the first error
    raised by any call is raised here, after every call has ended (no request is left running)."""
    if len(items) <= 1 or concurrency <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items))) as pool:
        futures = [pool.submit(function, item) for item in items]
        errors = [future.exception() for future in futures]
    for error in errors:
        if error is not None:
            raise error
    return [future.result() for future in futures]
