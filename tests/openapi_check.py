"""Check answers against the OpenAPI document the service serves (``GET /api/v1/openapi.json``).

``ContractCheck.middleware`` is an aiohttp client middleware: given to a test client, it reads
each answer as it arrives (the body stays cached on the response, so the test reads it as
usual), finds the documented operation for the request's method and path, and records what does
not match the document: a status the operation does not list, a media type it does not list, a
listed header that is missing, or a JSON body that does not validate against the schema of that
operation, status and media type (``jsonschema``, Draft 2020-12, with the document's
``$ref``s and RFC 3339 ``date-time`` checked).

Requests that match no documented operation are still checked where the document speaks for
them: a 405 on a documented path against ``components.responses.MethodNotAllowed``, any other
problem+json body against the ``Problem`` schema. Anything else (the pages, the QR image, the
CSV feed: see tests/test_openapi.py's list of extensions) is outside the document.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import ClientRequest, ClientResponse
from aiohttp.client_middlewares import ClientHandlerType
from aiohttp.test_utils import TestClient
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import relevance
from referencing import Registry
from referencing.jsonschema import DRAFT202012

DOCUMENT_URI = "urn:allot:openapi"
PROBLEM_JSON = "application/problem+json"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _is_json(media: str) -> bool:
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _pointer(*parts: str) -> str:
    """A JSON pointer fragment (RFC 6901) into the document."""
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass(frozen=True, slots=True)
class Seen:
    """One answer as the client received it."""

    method: str
    path: str
    status: int
    media: str
    headers: Mapping[str, str]
    body: bytes


class ServedDocument:
    """One OpenAPI document, with a validator per schema it names (compiled once)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = DRAFT202012.create_resource(document)
        self._registry: Registry[Any] = Registry().with_resource(DOCUMENT_URI, resource)
        self._validators: dict[str, Draft202012Validator] = {}
        self._paths: list[tuple[re.Pattern[str], str]] = []
        for template in document["paths"]:
            regex = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template))
            self._paths.append((re.compile(regex), template))
        # A literal path wins over a template that also matches it.
        self._paths.sort(key=lambda pt: pt[1].count("{"))

    def template(self, path: str) -> str | None:
        """The documented path template this request path falls under, if any."""
        return next((t for regex, t in self._paths if regex.fullmatch(path)), None)

    def validator(self, pointer: str) -> Draft202012Validator:
        if pointer not in self._validators:
            self._validators[pointer] = Draft202012Validator(
                {"$ref": DOCUMENT_URI + pointer},
                registry=self._registry,
                format_checker=FORMAT_CHECKER,
            )
        return self._validators[pointer]

    def wrong(self, seen: Seen) -> str | None:
        """What about this answer the document does not allow (None: nothing, or not in it)."""
        template = self.template(seen.path)
        method = seen.method.lower()
        operation = self.document["paths"][template].get(method) if template else None
        if template is None or operation is None:
            if template is not None and seen.status == 405:
                return self._answer(seen, ("components", "responses", "MethodNotAllowed"))
            if seen.media == PROBLEM_JSON:
                return self._body(seen, _pointer("components", "schemas", "Problem"))
            return None
        if str(seen.status) not in operation["responses"]:
            listed = ", ".join(operation["responses"])
            return f"status {seen.status} is not documented (only {listed})"
        return self._answer(seen, ("paths", template, method, "responses", str(seen.status)))

    def _answer(self, seen: Seen, where: tuple[str, ...]) -> str | None:
        answer = self._resolve(where)
        for name, header in answer.get("headers", {}).items():
            if name not in seen.headers:
                return f"header {name} is missing"
            schema = self._resolve_ref(header).get("schema", {})
            if schema.get("type") == "integer":
                value = seen.headers[name]
                if not value.isdigit() or int(value) < schema.get("minimum", 0):
                    return f"header {name}: {value!r} is not a whole number >= {schema['minimum']}"
        content = answer.get("content", {})
        if not content:
            return None if not seen.body else "a body where the document lists none"
        if seen.media not in content:
            return f"media type {seen.media!r} is not documented (only {', '.join(content)})"
        if not _is_json(seen.media):
            return None
        return self._body(seen, _pointer(*where, "content", seen.media, "schema"))

    def _body(self, seen: Seen, pointer: str) -> str | None:
        try:
            body = orjson.loads(seen.body)
        except orjson.JSONDecodeError as exc:
            return f"the body is not JSON: {exc}"
        errors = sorted(
            self.validator(pointer).iter_errors(body), key=lambda e: relevance(e), reverse=True
        )
        wrong = [
            f"at {'/'.join(str(p) for p in e.absolute_path) or '(the body)'}: {e.message}"
            for e in errors
        ]
        status = body.get("status") if isinstance(body, dict) else None
        if seen.media == PROBLEM_JSON and status is not None and status != seen.status:
            wrong.append(f"the problem's status {status!r} is not the answer's")
        return "; ".join(wrong) or None

    def _resolve(self, where: tuple[str, ...]) -> dict[str, Any]:
        node: Any = self.document
        for part in where:
            node = node[part]
        return self._resolve_ref(node)

    def _resolve_ref(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            parts = node["$ref"].removeprefix("#/").split("/")
            node = self._resolve(tuple(p.replace("~1", "/").replace("~0", "~") for p in parts))
        return node


FORMAT_CHECKER = FormatChecker(["date-time"])  # RFC 3339 (rfc3339-validator); others are notes

_documents: dict[bytes, ServedDocument] = {}  # one per distinct document in the session


class ContractCheck:
    """Collects what the answers a test client receives get wrong against the served document."""

    def __init__(self) -> None:
        self.document: ServedDocument | None = None
        self.seen = 0  # answers received
        self.failures: list[str] = []

    async def load(self, client: TestClient[Any, Any]) -> None:
        """Fetch the document from the service itself (once per distinct document)."""
        # On a connection of its own: aiohttp's server decides once per connection whether its
        # access log is enabled, and a test may turn logging on after the client is made.
        r = await client.session.get(
            client.make_url("/api/v1/openapi.json"),
            headers={"Connection": "close"},
            middlewares=(),
        )
        assert r.status == 200, await r.text()
        raw = await r.read()
        if raw not in _documents:
            _documents[raw] = ServedDocument(orjson.loads(raw))
        self.document = _documents[raw]

    def record(self, seen: Seen) -> None:
        assert self.document is not None, "ContractCheck.load was not awaited"
        wrong = self.document.wrong(seen)
        self.seen += 1
        if wrong is not None:
            excerpt = seen.body[:300].decode(errors="replace")
            self.failures.append(
                f"{seen.method} {seen.path} -> {seen.status}: {wrong}\n  {excerpt}"
            )

    async def middleware(
        self, request: ClientRequest, handler: ClientHandlerType
    ) -> ClientResponse:
        response = await handler(request)
        body = await response.read()  # kept on the response: the test's own read gets it again
        self.record(
            Seen(
                method=request.method,
                path=request.url.path,
                status=response.status,
                media=response.content_type,
                headers=response.headers,
                body=body,
            )
        )
        return response

    def assert_clean(self) -> None:
        assert not self.failures, (
            f"{len(self.failures)} answer(s) do not match the served OpenAPI document:\n"
            + "\n".join(self.failures)
        )
