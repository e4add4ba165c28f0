"""The OpenAPI document served at /api/v1/openapi.json: valid, and complete against API.md."""

from __future__ import annotations

from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from service.openapi import openapi_document

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
    ("post", "/api/v1/admin/pickups"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


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
    """Readers must see that /api/v1/admin/* needs the token, and citizen endpoints do not."""
    paths = openapi_document()["paths"]
    for method, path in sorted(CONTRACT_OPERATIONS):
        operation = paths[path][method]
        if path.startswith("/api/v1/admin/"):
            assert operation["security"] == [{"bearerAuth": []}], (method, path)
            assert "401" in operation["responses"], (method, path)
        else:
            assert "security" not in operation, (method, path)
