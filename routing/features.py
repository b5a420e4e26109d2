"""Request features the policy decides on. Built once per request at the edge."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from routing.access import ANONYMOUS, Caller
from routing.config import Modality

QUERY_CHARS = 2000  # the intent classifier reads this much of the query: its cost stays bounded


@dataclass(frozen=True)
class Document:
    text: str
    page: int | None = None


@dataclass(frozen=True)
class Features:
    endpoint: str
    modality: Modality
    tokens: int  # prompt plus documents, counted with the serving tokenizer
    max_new_tokens: int
    pages: int  # distinct pages over the documents; a document without a page counts as one
    text: str  # prompt plus documents, for keyword rules
    task: str | None = None  # explicit task from the request
    backend: str | None = None  # pinned by `model`; None for "auto"
    adapter: str | None = None
    query: str = ""  # what is asked (a chat's last user message), cut to QUERY_CHARS, for the intent classifier
    intent: tuple[str, float] | None = None  # the intent classifier's (task, confidence) for `query`
    caller: Caller = ANONYMOUS  # whose request: its permissions are a hard filter
    outputs: frozenset[str] = frozenset()  # what the answer must carry (routing.config.Output): a hard filter


def split_model(model: str) -> tuple[str | None, str | None]:
    """`auto` -> (None, None); `mamba` -> ("mamba", None); `transformer:sql` -> ("transformer", "sql")."""
    name, _, adapter = model.partition(":")
    return (None if name == "auto" else name), (adapter or None)


def count_pages(documents: Sequence[Document]) -> int:
    pages = {d.page for d in documents if d.page is not None}
    return len(pages) + sum(1 for d in documents if d.page is None)


def text_features(
    *,
    endpoint: str,
    prompt: str,
    documents: Sequence[Document],
    count_tokens: Callable[[str], int],
    max_new_tokens: int,
    model: str = "auto",
    task: str | None = None,
    modality: Modality = "text",
    query: str | None = None,
) -> Features:
    backend, adapter = split_model(model)
    texts = [prompt, *(d.text for d in documents)]
    return Features(
        endpoint=endpoint,
        modality=modality,
        tokens=sum(count_tokens(t) for t in texts if t),
        max_new_tokens=max_new_tokens,
        pages=count_pages(documents),
        text="\n".join(texts),
        task=task,
        backend=backend,
        adapter=adapter,
        query=(prompt if query is None else query)[:QUERY_CHARS],
    )
