"""The HTTP gateway of a node (`[http] address`): the wire contract over HTTP, its OpenAPI
document and a docs page. See app/http/gateway.py."""

from kaya.app.http.gateway import STATUS, Gateway, serve_gateway, status_for
from kaya.app.http.openapi import docs_html, openapi_document

__all__ = ["STATUS", "Gateway", "docs_html", "openapi_document", "serve_gateway", "status_for"]
