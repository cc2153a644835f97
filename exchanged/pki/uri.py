"""RFC 7512 `pkcs11:` URIs: parse and format the names of tokens, keys and certificates."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from urllib.parse import quote, unquote_to_bytes

from exchanged.errors import ExchangedError

# RFC 7512 section 2.3: path attributes (';'-separated) and query attributes ('&'-separated).
PATH_ATTRS = (
    "token", "manufacturer", "serial", "model", "library-manufacturer",
    "library-description", "library-version", "slot-description", "slot-manufacturer",
    "slot-id", "object", "type", "id",
)
QUERY_ATTRS = ("pin-source", "pin-value", "module-name", "module-path")
OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")
# Characters RFC 7512 lets stand unescaped in a path/query value (pchar minus the separators).
_SAFE = "-._~!$'()*+,=:@&"


class UriError(ExchangedError):
    code = "bad-uri"


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed `pkcs11:` URI. Text attributes are str; `id` is bytes (it is binary on tokens)."""

    attrs: dict[str, str] = field(default_factory=dict)
    id: bytes | None = None
    query: dict[str, str] = field(default_factory=dict)

    @property
    def token(self) -> str | None:
        return self.attrs.get("token")

    @property
    def object(self) -> str | None:
        return self.attrs.get("object")

    @property
    def type(self) -> str | None:
        return self.attrs.get("type")

    @property
    def module_path(self) -> str | None:
        return self.query.get("module-path")

    @property
    def pin_source(self) -> str | None:
        return self.query.get("pin-source")

    def with_object(self, label: str | None = None, id: bytes | None = None,
                    type: str | None = None) -> Pkcs11Uri:
        attrs = {k: v for k, v in self.attrs.items() if k not in ("object", "type", "id")}
        if label is not None:
            attrs["object"] = label
        if type is not None:
            attrs["type"] = type
        return replace(self, attrs=attrs, id=id)

    def token_only(self) -> Pkcs11Uri:
        """The same token, no object and no secrets: what may be printed or stored."""
        attrs = {k: v for k, v in self.attrs.items() if k not in ("object", "type", "id")}
        query = {k: v for k, v in self.query.items() if k == "module-path"}
        return Pkcs11Uri(attrs=attrs, id=None, query=query)

    def public(self) -> Pkcs11Uri:
        """This URI without pin-value/pin-source: safe for logs and the database."""
        return replace(self, query={k: v for k, v in self.query.items()
                                    if k not in ("pin-value", "pin-source")})

    def __str__(self) -> str:
        parts = []
        for name in PATH_ATTRS:
            if name == "id":
                if self.id is not None:
                    parts.append("id=" + "".join(f"%{b:02X}" for b in self.id))
            elif name in self.attrs:
                parts.append(f"{name}={quote(self.attrs[name], safe=_SAFE.replace('&', ''))}")
        text = "pkcs11:" + ";".join(parts)
        if self.query:
            text += "?" + "&".join(f"{k}={quote(v, safe=_SAFE.replace('&', '') + '/')}"
                                   for k, v in self.query.items())
        return text


def parse(text: str) -> Pkcs11Uri:
    """Parse a `pkcs11:` URI. Unknown path attributes are an error: a typo must not widen a
    match."""
    if not text.startswith("pkcs11:"):
        raise UriError(f"not a pkcs11: URI: {text!r} (expected e.g. pkcs11:token=ca;object=ca-key)")
    body = text[len("pkcs11:"):]
    path, _, query = body.partition("?")
    attrs: dict[str, str] = {}
    key_id: bytes | None = None
    for part in filter(None, path.split(";")):
        name, eq, value = part.partition("=")
        if not eq:
            raise UriError(f"pkcs11: URI attribute without '=': {part!r}")
        if name not in PATH_ATTRS:
            raise UriError(f"unknown pkcs11: URI attribute {name!r} "
                           f"(known: {', '.join(PATH_ATTRS)})")
        if name in attrs or (name == "id" and key_id is not None):
            raise UriError(f"pkcs11: URI attribute {name!r} given twice")
        raw = unquote_to_bytes(value)
        if name == "id":
            key_id = raw
            continue
        try:
            attrs[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UriError(f"pkcs11: URI attribute {name!r} is not UTF-8") from None
    if "type" in attrs and attrs["type"] not in OBJECT_TYPES:
        raise UriError(f"pkcs11: URI type must be one of {', '.join(OBJECT_TYPES)}")
    q: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        name, _, value = part.partition("=")
        if name not in QUERY_ATTRS:
            raise UriError(f"unknown pkcs11: URI query attribute {name!r}")
        q[name] = unquote_to_bytes(value).decode("utf-8", "replace")
    return Pkcs11Uri(attrs=attrs, id=key_id, query=q)
