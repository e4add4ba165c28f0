"""The OpenAPI document served at /api/v1/openapi.json: valid, and complete against API.md
and against the application's own routes."""

from __future__ import annotations

from pathlib import Path

import orjson
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from allocator.config import Settings
from service.app import create_app
from service.openapi import ROUTES, openapi_document, openapi_json
from service.problems import PROBLEM_CODES

# Every path and method of the contract (API.md), written out by hand from it.
CONTRACT_OPERATIONS = {
    ("get", "/api/v1/rounds"),
    ("get", "/api/v1/rounds/{round_id}"),
    ("get", "/api/v1/rounds/{round_id}/sites"),
    ("post", "/api/v1/rounds/{round_id}/reservations"),
    ("get", "/api/v1/reservations/{reservation_id}"),
    ("delete", "/api/v1/reservations/{reservation_id}"),
    ("put", "/api/v1/admin/sites"),
    ("put", "/api/v1/admin/rounds/{round_id}"),
    ("post", "/api/v1/admin/rounds/{round_id}/batches"),
    ("get", "/api/v1/admin/rounds/{round_id}/stats"),
    ("get", "/api/v1/admin/rounds/{round_id}/fairness"),
    ("post", "/api/v1/admin/pickups"),
    ("post", "/api/v1/admin/desk-tokens"),
    ("delete", "/api/v1/admin/desk-tokens/{token_id}"),
    ("post", "/api/v1/desk/rounds/{round_id}/reservations"),
    ("post", "/api/v1/desk/rounds/{round_id}/entries"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
    # Lottery rounds
    ("post", "/api/v1/rounds/{round_id}/entries"),
    ("get", "/api/v1/entries/{entry_id}"),
    ("delete", "/api/v1/entries/{entry_id}"),
    ("get", "/api/v1/draw-key"),
    ("get", "/api/v1/rounds/{round_id}/draw"),
    ("get", "/api/v1/rounds/{round_id}/draw/entries.csv"),
    ("get", "/api/v1/rounds/{round_id}/draw/stock.csv"),
    ("get", "/api/v1/rounds/{round_id}/draw/results.csv"),
    ("get", "/api/v1/rounds/{round_id}/draw/pass-{n}.csv"),
    ("post", "/api/v1/admin/rounds/{round_id}/draw"),
    ("post", "/api/v1/admin/rounds/{round_id}/draw/next"),
}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# The part of the application the document must describe.
DOCUMENTED_PREFIXES = ("/api/v1/", "/healthz", "/readyz", "/metrics")
# Routes there that are deliberately not in the document: extensions beyond the contract (the
# document describes the contract only), each described in README.md under "Beyond the
# contract". Their errors are problem+json like every other.
DOCUMENTED_EXTENSIONS = {
    ("get", "/api/v1/reservations/{reservation_id}/qr.svg"),  # the pickup code as a QR image
    ("get", "/api/v1/rounds/{round_id}/sites.csv"),  # the open stock feed, CSV
    ("get", "/api/v1/admin/queue"),  # the console's queue depth (it no longer reads /metrics)
    ("get", "/api/v1/admin/desk-tokens"),  # the console's list of desk tokens
    ("get", "/api/v1/desk/me"),  # the console's sign-in: the operator, or a desk of which site
}
README = Path(__file__).resolve().parent.parent / "README.md"


def _documented_operations() -> set[tuple[str, str]]:
    paths = openapi_document()["paths"]
    return {
        (method, path) for path, item in paths.items() for method in item if method in HTTP_METHODS
    }


def test_document_is_valid_openapi_3_1() -> None:
    """Client generators and API tools reject an invalid document, so it must pass the spec."""
    document = openapi_document()
    assert document["openapi"] == "3.1.0"
    validate(document, cls=OpenAPIV31SpecValidator)


def test_every_contract_operation_is_documented() -> None:
    """The contract promises the document describes all of it; a missing endpoint breaks that."""
    missing = CONTRACT_OPERATIONS - _documented_operations()
    assert not missing, f"not documented: {sorted(missing)}"


def test_no_operation_is_documented_beyond_the_contract() -> None:
    """An operation the contract does not list would be a promise the service does not make."""
    extra = _documented_operations() - CONTRACT_OPERATIONS
    assert not extra, f"not in the contract: {sorted(extra)}"


def test_operator_operations_require_the_bearer_token() -> None:
    """Readers must see that /api/v1/admin/* and /api/v1/desk/* need a token, and citizen
    endpoints do not."""
    paths = openapi_document()["paths"]
    for method, path in sorted(CONTRACT_OPERATIONS):
        operation = paths[path][method]
        if path.startswith(("/api/v1/admin/", "/api/v1/desk/")):
            assert operation["security"] == [{"bearerAuth": []}], (method, path)
            assert "401" in operation["responses"], (method, path)
        else:
            assert "security" not in operation, (method, path)


def _application_routes(settings: Settings) -> set[tuple[str, str]]:
    """(method, path template) of every route the application registers under the documented
    prefixes. HEAD is left out: aiohttp adds it to every GET route, answered by the same
    handler, and OpenAPI documents it with the GET."""
    app = create_app(settings)
    out = set()
    for resource in app.router.resources():
        path = resource.canonical
        if not (path.startswith(DOCUMENTED_PREFIXES[0]) or path in DOCUMENTED_PREFIXES[1:]):
            continue
        out |= {(route.method.lower(), path) for route in resource if route.method != "HEAD"}
    return out


def test_every_route_of_the_application_is_documented(settings: Settings) -> None:
    """A route added to the app but not to the document is an endpoint client generators and
    readers never see; it must be documented or listed as an extension on purpose."""
    routes = _application_routes(settings)
    assert ("get", "/api/v1/rounds") in routes  # the walk finds the application's routes
    undocumented = routes - _documented_operations() - DOCUMENTED_EXTENSIONS
    assert not undocumented, f"neither in the document nor listed as extensions: {undocumented}"


def test_listed_extensions_exist_and_are_described_in_the_readme(settings: Settings) -> None:
    """The list of extensions must not outlive its routes, nor hide an undescribed one."""
    missing = DOCUMENTED_EXTENSIONS - _application_routes(settings)
    assert not missing, f"listed as extensions, but the app has no such route: {missing}"
    readme = README.read_text(encoding="utf-8")
    for method, path in sorted(DOCUMENTED_EXTENSIONS):
        assert f"`{method.upper()} {path}`" in readme, path


def test_document_is_built_once_and_served_as_built() -> None:
    """The document is served to every client generator that asks: it is built once per
    process, and what is served is that document."""
    assert openapi_document() is openapi_document()
    assert openapi_json() is openapi_json()
    assert orjson.loads(openapi_json()) == orjson.loads(orjson.dumps(openapi_document()))


def test_every_served_problem_code_is_answered_somewhere() -> None:
    """A code marked served that no operation lists is either dead or undocumented."""
    # answered for any path, outside the routes: a wrong method (the app), and malformed or
    # late requests (the connection layer, service/http.py)
    anywhere = {"method-not-allowed", "bad-request", "request-timeout"}
    listed = {code for route in ROUTES for code in route.problems} | anywhere
    served = {p.code for p in PROBLEM_CODES if p.served}
    assert served == listed
    problem = openapi_document()["components"]["schemas"]["Problem"]
    assert problem["properties"]["code"]["enum"] == [p.code for p in PROBLEM_CODES if p.served]
