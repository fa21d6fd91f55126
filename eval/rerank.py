"""Re-ranking (the paper's Gemini experiment): a model sees the query and its labelled neighbours.

:class:`Reranker` is the interface: ``rerank(query_image, neighbours, class_names) -> class name``.
:class:`HttpVisionLanguageReranker` sends that prompt to a vision-language model over HTTP in the
widely served chat-completions format (images as data URIs), with a configurable endpoint, model
and key. :func:`rerank_accuracy` runs a re-ranker over queries and reports its accuracy beside the
voting rule it falls back to when the model answers with something that is not a class name.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import urllib.error
import urllib.request
from typing import Protocol

import numpy as np


@dataclasses.dataclass
class Neighbour:
    """One labelled neighbour as the re-ranker sees it: its image (None when it has none), label, similarity."""

    image: bytes | None
    label: str
    similarity: float


class Reranker(Protocol):
    def rerank(self, query_image: bytes | None, neighbours: list, class_names: list) -> str:
        """The class name the re-ranker assigns to the query."""


def build_prompt(neighbours: list, class_names: list) -> str:
    """The text part of the request: the neighbours' labels and similarities, best first, and the classes."""
    lines = ["Classify the first image (the query). The following images are its nearest neighbours in a "
             "labelled memory, most similar first, each with its label and cosine similarity:"]
    lines += [f"{i + 1}. label: {n.label} (similarity {n.similarity:.3f})" for i, n in enumerate(neighbours)]
    lines.append("Answer with exactly one label from this list and nothing else: " + ", ".join(class_names))
    return "\n".join(lines)


def _data_uri(image: bytes) -> str:
    mime = "image/png" if image[:4] == b"\x89PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


class HttpVisionLanguageReranker:
    """A chat-completions endpoint of a vision-language model.

    Args:
        endpoint: full URL of the chat-completions route.
        model: model name sent with each request.
        api_key: bearer token; default from the environment variable named by ``api_key_env``.
    """

    def __init__(self, endpoint: str, model: str, *, api_key: str | None = None,
                 api_key_env: str = "VISMEM_RERANK_API_KEY", timeout_s: float = 60.0):
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"re-ranker endpoint must be an http(s) URL, got {endpoint!r}")
        self.endpoint, self.model, self.timeout_s = endpoint, model, timeout_s
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env, "")

    def request_body(self, query_image, neighbours, class_names) -> dict:
        content = [{"type": "text", "text": build_prompt(neighbours, class_names)}]
        for image in [query_image, *[n.image for n in neighbours]]:
            if image is not None:
                content.append({"type": "image_url", "image_url": {"url": _data_uri(image)}})
        return {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0}

    def rerank(self, query_image, neighbours, class_names) -> str:
        body = json.dumps(self.request_body(query_image, neighbours, class_names)).encode()
        req = urllib.request.Request(self.endpoint, data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"re-ranker at {self.endpoint} answered HTTP {exc.code}: {exc.read()[:200]!r}") from exc
        try:
            return str(answer["choices"][0]["message"]["content"]).strip()
        except (KeyError, IndexError, TypeError) as exc:
            raise RuntimeError(f"re-ranker at {self.endpoint} sent an unexpected answer: {str(answer)[:200]}") from exc


def rerank_accuracy(reranker, query_images, neighbour_lists, truth, fallback, class_names) -> dict:
    """Accuracy of the re-ranker; answers that are not a class name fall back to ``fallback``."""
    index = {c.lower(): i for i, c in enumerate(class_names)}
    preds, invalid = [], 0
    for image, nbs, fb in zip(query_images, neighbour_lists, fallback):
        answer = reranker.rerank(image, nbs, class_names).strip().strip(".").lower()
        if answer in index:
            preds.append(index[answer])
        else:
            invalid += 1
            preds.append(int(fb))
    preds = np.asarray(preds)
    truth = np.asarray(truth)
    return {"accuracy": float((preds == truth).mean()), "fallback_accuracy": float((np.asarray(fallback) == truth).mean()),
            "invalid_answers": invalid, "queries": len(truth)}
