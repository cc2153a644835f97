"""TLS contexts whose private key stays on a PKCS#11 token.

Python's `ssl` cannot load a private key from PKCS#11, and pyOpenSSL's bundled OpenSSL has no
engine support. This module is the bridge (design decision 4): the system OpenSSL 3 with libp11's
`pkcs11` engine (Debian: libengine-pkcs11-openssl), attached through ctypes to the `SSL_CTX`
behind a stdlib `ssl.SSLContext` (the very libssl.so.3 that `_ssl` links). The engine hands
OpenSSL an `EVP_PKEY` whose sign operation calls the token; trio's `SSLStream` then does the
handshake and OpenSSL calls the token for every signature. The key never leaves the token.

    ctx = make_context(server=True, key_uri="pkcs11:token=node;object=node-tls",
                       pin=PinSource("node", "EXCHANGED_NODE_PIN", "/etc/exchanged/node.pin"),
                       cert_chain="node-chain.pem", trusted="ca.pem")

What the caller must know:

* **Identity is not checked here.** `check_hostname` is off on both sides: OpenSSL only proves
  that the peer holds a key certified by one of `trusted` (and the EKU fits). After the
  handshake the caller takes `peer_certificate_chain()`, validates it again in Python
  (cryptography's verifier plus the CRL check, design decision 3) and matches the leaf against
  its configured peer table.
* **Signatures block the event loop.** OpenSSL signs inside `do_handshake()`, which trio calls
  on the trio thread: SoftHSM takes well under a millisecond, a real smart card 100-500 ms.
  Keep connections to peers open and resume sessions so that the card signs rarely. A resumed
  TLS 1.3 session (PSK) makes no signature. trio.SSLStream takes no `session=` but forwards
  the attribute: set `stream.session = earlier_stream.session` before `do_handshake()`
  (`node.base.Node.handshake` does; `session_reused` is then True). A resumed session keeps
  the original peer certificate: check its CRL status again on every connection.
* **One engine per process.** libp11's engine ("pkcs11") is process-wide: one PKCS#11 module
  for all TLS keys of a process, fixed at the first `make_context()`, and never finished.
* **The PIN** is verified when the engine first logs in to a token; later contexts for the
  same token reuse that login (PKCS#11 login is per process and token). libp11 keeps the PIN
  in its memory for the life of the process.
* **python-pkcs11 in the same process** (`exchanged.pki.token`): by default the engine runs a
  private instance of the PKCS#11 module (`isolate_module=True`), so Token objects and TLS
  contexts do not disturb each other at all. Sharing python-pkcs11's instance is possible but
  fragile; the comment block below says what was measured.
"""

from __future__ import annotations

import _ssl
import ctypes
import os
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from exchanged.errors import ExchangedError
from exchanged.pki.keys import UnsupportedKey, verify_signature
from exchanged.pki.pin import PinSource
from exchanged.pki.token import default_module
from exchanged.pki.uri import Pkcs11Uri
from exchanged.pki.uri import parse as parse_uri

ENGINE_ID = "pkcs11"
# Where Debian/Ubuntu put libp11's engine; $EXCHANGED_PKCS11_ENGINE overrides.
ENGINE_PATHS = (
    "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/engines-3/pkcs11.so",
    "/usr/lib/engines-3/pkcs11.so",
)
# How long a TLS session this node issued (a TLS 1.3 ticket) may be resumed: a resumed session
# signs nothing, so this bounds how long a peer connects on the strength of an earlier
# handshake rather than its card. OpenSSL's default is 7200 s. Peers are judged on every
# connection all the same (revocation, peer table), resumed or not.
SESSION_SECONDS = 300
# TLS 1.2 suites: ECDHE key exchange with AEAD ciphers only (TLS 1.3 suites are all AEAD).
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
))

# -- python-pkcs11 and the engine in one process ------------------------------------------------
# Measured with SoftHSM 2.6.1, libp11 0.4.12 (Debian libengine-pkcs11-openssl), python-pkcs11
# 0.10.1 and OpenSSL 3.0.
#
# Shared instance (isolate_module=False): python-pkcs11 and libp11 dlopen the same file, so they
# share one PKCS#11 state: initialisation, sessions and the login of each token.
# * C_Initialize: python-pkcs11 raises on CKR_CRYPTOKI_ALREADY_INITIALIZED, libp11 tolerates it,
#   so python-pkcs11 must go first (`_engine()` calls `exchanged.pki.token.load_module()`).
#   python-pkcs11 passes NULL init args, telling the module that no two threads call it at once
#   (SoftHSM then turns its locks off): never use a Token from a worker thread while a handshake
#   may run.
# * A process that opened the token with python-pkcs11 first can do handshakes with the engine,
#   and python-pkcs11 can sign in between (the engine's C_Login gets
#   CKR_USER_ALREADY_LOGGED_IN, which libp11 accepts, without checking the PIN).
# * But once the engine is logged in, `Token.open()` of that token fails (python-pkcs11 raises
#   UserAlreadyLoggedIn), and `Token.close()` calls C_Logout, which logs the engine out as well:
#   SoftHSM invalidates the private-key handles, every existing context fails its handshakes,
#   and since libp11 0.4.12 caches "logged in" per slot it never logs in again, so new contexts
#   for that token fail too, for the life of the process (`_test_signature` turns this into
#   a clear error).
# * The engine must never be finished: releasing its last functional reference made libp11 call
#   C_Finalize, which broke every python-pkcs11 session (CKR_CRYPTOKI_NOT_INITIALIZED) and
#   crashed the process at exit while an SSL_CTX still held a token key.
#
# Private instance (isolate_module=True, the default): the engine loads a private copy of the
# module (a memfd), which dlopen treats as a different library: its own C_Initialize (with OS
# locking), sessions and login. Token.open()/close() before, during and after handshakes were
# measured not to affect the engine, nor the engine them. To the token this looks like two
# processes using it, which tokens support. Caveat, SoftHSM only: its file locks are POSIX
# locks, which do not exclude each other within one process, so do not generate or store
# objects on a token with python-pkcs11 from another thread while a handshake signs on it.


class TlsKeyError(ExchangedError):
    code = "tls-key"


# -- libssl / libcrypto through ctypes ---------------------------------------------------------

_vp = ctypes.c_void_p
SSL_CTRL_CHAIN_CERT = 89
SSL_CTRL_GET_MIN_PROTO_VERSION = 130
SSL_CTRL_GET_MAX_PROTO_VERSION = 131
OPENSSL_ENGINES_DIR = 5  # OpenSSL_version(): 'ENGINESDIR: "..."'
# SSL_CTX is larger than this in OpenSSL 3.x, and the fields we read lie inside it.
_SSL_CTX_PROBE_BYTES = 1024  # 3.0: 1624 bytes; options at 312, verify_mode at 376
_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


@dataclass(frozen=True)
class _OpenSSL:
    ssl: Any
    crypto: Any


_openssl: _OpenSSL | None = None
_lock = threading.Lock()  # guards the engine: PIN + key loading must not interleave


def _declare(lib: Any, name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


def _libs() -> _OpenSSL:
    """libssl and libcrypto exactly as `_ssl` (imported above) loaded them.

    RTLD_NOLOAD: dlopen only hands back a library already in the process, never a second copy.
    """
    global _openssl
    if _openssl is not None:
        return _openssl
    major = ssl.OPENSSL_VERSION_INFO[0]
    if major != 3:
        raise TlsKeyError(f"token-held TLS keys need OpenSSL 3 behind Python's ssl module; this "
                          f"Python uses {ssl.OPENSSL_VERSION}", code="tls-openssl")
    try:
        mode = os.RTLD_NOLOAD | os.RTLD_NOW
        libssl = ctypes.CDLL(f"libssl.so.{major}", mode=mode)
        libcrypto = ctypes.CDLL(f"libcrypto.so.{major}", mode=mode)
    except OSError as e:
        raise TlsKeyError(f"cannot reach the libssl that Python's ssl module uses ({e}); "
                          "token-held TLS keys need a Python linked to the system "
                          "libssl.so.3 (a shared, not static, OpenSSL)",
                          code="tls-openssl") from None
    c = libcrypto
    _declare(c, "OpenSSL_version_num", ctypes.c_ulong)
    _declare(c, "OpenSSL_version", ctypes.c_char_p, ctypes.c_int)
    _declare(c, "ERR_get_error", ctypes.c_ulong)
    _declare(c, "ERR_clear_error", None)
    _declare(c, "ERR_error_string_n", None, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t)
    _declare(c, "ENGINE_by_id", _vp, ctypes.c_char_p)
    _declare(c, "ENGINE_ctrl_cmd_string", ctypes.c_int, _vp, ctypes.c_char_p, ctypes.c_char_p,
             ctypes.c_int)
    _declare(c, "ENGINE_init", ctypes.c_int, _vp)
    _declare(c, "ENGINE_free", ctypes.c_int, _vp)
    _declare(c, "ENGINE_load_private_key", _vp, _vp, ctypes.c_char_p, _vp, _vp)
    _declare(c, "UI_null", _vp)
    _declare(c, "EVP_PKEY_free", None, _vp)
    _declare(c, "d2i_X509", _vp, _vp, ctypes.POINTER(_vp), ctypes.c_long)
    _declare(c, "X509_free", None, _vp)
    _declare(c, "EVP_MD_CTX_new", _vp)
    _declare(c, "EVP_MD_CTX_free", None, _vp)
    _declare(c, "EVP_sha256", _vp)
    _declare(c, "EVP_DigestSignInit", ctypes.c_int, _vp, _vp, _vp, _vp, _vp)
    _declare(c, "EVP_DigestSign", ctypes.c_int, _vp, ctypes.c_char_p,
             ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p, ctypes.c_size_t)
    s = libssl
    _declare(s, "SSL_CTX_get_options", ctypes.c_uint64, _vp)
    _declare(s, "SSL_CTX_get_verify_mode", ctypes.c_int, _vp)
    _declare(s, "SSL_CTX_ctrl", ctypes.c_long, _vp, ctypes.c_int, ctypes.c_long, _vp)
    _declare(s, "SSL_CTX_use_certificate", ctypes.c_int, _vp, _vp)
    _declare(s, "SSL_CTX_use_PrivateKey", ctypes.c_int, _vp, _vp)
    _declare(s, "SSL_CTX_check_private_key", ctypes.c_int, _vp)
    _declare(s, "SSL_CTX_set_timeout", ctypes.c_long, _vp, ctypes.c_long)
    if c.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise TlsKeyError(f"the libcrypto found (0x{c.OpenSSL_version_num():x}) is not the one "
                          f"Python's ssl module uses (0x{ssl.OPENSSL_VERSION_NUMBER:x})",
                          code="tls-openssl")
    _openssl = _OpenSSL(libssl, libcrypto)
    return _openssl


def _errors(lib: _OpenSSL) -> list[str]:
    """Drain this thread's OpenSSL error queue into readable strings."""
    out: list[str] = []
    buf = ctypes.create_string_buffer(256)
    while code := lib.crypto.ERR_get_error():
        lib.crypto.ERR_error_string_n(code, buf, len(buf))
        out.append(buf.value.decode("ascii", "replace"))
    return out


# -- the SSL_CTX behind an ssl.SSLContext, and its self-check -----------------------------------

def _readable(address: int, size: int) -> bool:
    """Whether [address, address+size) can be read, asked of the kernel (EFAULT), not by a crash."""
    if address <= 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    try:
        n = libc.write(w, ctypes.c_void_p(address), ctypes.c_size_t(size))
        return bool(n == size)  # -1 with errno EFAULT: not mapped
    finally:
        os.close(r)
        os.close(w)


def _check_ctx_pointer(context: ssl.SSLContext, pointer: int) -> None:
    """Refuse unless `pointer` is the SSL_CTX behind `context`.

    Reads back through libssl's own getters what the Python API reports (options, verify mode,
    protocol bounds), then flips two harmless option bits through the Python API and checks that
    libssl sees exactly that change on `pointer`, then restores them.
    """
    lib = _libs()
    if not isinstance(context, ssl.SSLContext):
        raise TlsKeyError(f"not an ssl.SSLContext: {type(context).__name__}", code="self-check")
    if not pointer or pointer % ctypes.alignment(_vp) or \
            not _readable(pointer, _SSL_CTX_PROBE_BYTES):
        raise TlsKeyError(f"self-check failed: 0x{pointer or 0:x} is not a readable SSL_CTX; "
                          "this Python's ssl module is laid out differently from what the "
                          "token TLS bridge expects: refusing to attach a key", code="self-check")

    def agree() -> bool:
        if lib.ssl.SSL_CTX_get_options(pointer) != context.options:
            return False
        if lib.ssl.SSL_CTX_get_verify_mode(pointer) & 3 != _VERIFY_MODES[context.verify_mode]:
            return False
        for ctrl, version in ((SSL_CTRL_GET_MIN_PROTO_VERSION, context.minimum_version),
                              (SSL_CTRL_GET_MAX_PROTO_VERSION, context.maximum_version)):
            if version.value > 0 and lib.ssl.SSL_CTX_ctrl(pointer, ctrl, 0, None) != version.value:
                return False
        return True

    flip = ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_ENABLE_MIDDLEBOX_COMPAT
    original = context.options
    ok = agree()
    try:
        context.options = original ^ flip
        ok = ok and agree()
    finally:
        context.options = original
    if not (ok and agree()):
        raise TlsKeyError(f"self-check failed: 0x{pointer:x} is not the SSL_CTX behind this "
                          "ssl.SSLContext (libssl reports other settings than Python set); "
                          "refusing to attach a key", code="self-check")


def ssl_ctx_pointer(context: ssl.SSLContext) -> int:
    """The `SSL_CTX *` behind `context`, self-checked.

    CPython's PySSLContext starts with `PyObject_HEAD` followed by `SSL_CTX *ctx` (so in 3.11,
    and for years before and after); `_check_ctx_pointer` refuses if that ever stops being so.
    """
    if not isinstance(context, ssl.SSLContext):
        raise TlsKeyError(f"not an ssl.SSLContext: {type(context).__name__}", code="self-check")
    pointer = _vp.from_address(id(context) + object.__basicsize__).value or 0
    _check_ctx_pointer(context, pointer)
    return pointer


# -- the engine ---------------------------------------------------------------------------------

@dataclass
class _Engine:
    """libp11's engine, initialised with one PKCS#11 module; kept for the life of the process."""

    pointer: int
    module: str  # the module as configured
    isolated: bool  # the engine runs its own instance of it (a private in-memory copy)
    copy_fd: int | None = None  # the memfd holding that copy, open for the life of the process
    engine_fd: int | None = None  # a renewed engine: the memfd holding its .so's copy


_engine_cache: _Engine | None = None
# Engines whose module instance lost its token (renew_engine): kept, never finished (finishing
# finalises the module, see the notes at the top); the contexts made from them stay dead.
_retired: list[_Engine] = []


def renew_engine() -> None:
    """Forget the process's engine: its private instance of the PKCS#11 module lost the token
    (a card pulled, p11-kit's server gone) and libp11 never initialises a module again in the
    same process. The next `make_context` builds a new engine object from a private copy of
    the engine's own .so (OpenSSL binds one .so once) with a new private copy of the module,
    which initialises afresh. Each renewal keeps a few file descriptors and one library
    mapping for the life of the process. Only for the private instance (the default)."""
    global _engine_cache
    with _lock:
        if _engine_cache is None:
            return
        if not _engine_cache.isolated:
            raise TlsKeyError("the TLS engine shares python-pkcs11's instance of the module "
                              "(isolate_module=False) and cannot be renewed: restart the "
                              "process", code="tls-module")
        _retired.append(_engine_cache)
        _engine_cache = None


def _fresh_engine(lib: _OpenSSL, engine_id: str = ENGINE_ID) -> tuple[int, int]:
    """A new engine object, not registered under its id: libp11's .so loaded from a private
    copy (the dynamic engine refuses to bind the same file twice). (pointer, the copy's fd)."""
    env = os.environ.get("EXCHANGED_PKCS11_ENGINE")
    for path in ((env,) if env else ()) + ENGINE_PATHS:
        if not os.path.exists(path):
            continue
        copy, fd = _private_copy(path)
        lib.crypto.ERR_clear_error()
        dyn = lib.crypto.ENGINE_by_id(b"dynamic")
        for cmd, arg in ((b"SO_PATH", copy.encode()), (b"ID", engine_id.encode()),
                         (b"LIST_ADD", b"0"), (b"LOAD", None)):
            if not dyn or not lib.crypto.ENGINE_ctrl_cmd_string(dyn, cmd, arg, 0):
                detail = "; ".join(_errors(lib)) or "no detail"
                if dyn:
                    lib.crypto.ENGINE_free(dyn)
                os.close(fd)
                raise TlsKeyError(f"cannot load a new instance of the engine {path}: {detail}",
                                  code="no-engine")
        return int(dyn), fd
    raise TlsKeyError("the pkcs11 engine's .so is not found (set EXCHANGED_PKCS11_ENGINE)",
                      code="no-engine")


def _load_engine(lib: _OpenSSL, engine_id: str = ENGINE_ID) -> int:
    """A structural reference to the engine: by id (OpenSSL's ENGINESDIR), else by .so path."""
    lib.crypto.ERR_clear_error()
    e = lib.crypto.ENGINE_by_id(engine_id.encode())
    if e:
        return int(e)
    tried = []
    env = os.environ.get("EXCHANGED_PKCS11_ENGINE")
    for path in ((env,) if env else ()) + ENGINE_PATHS:
        if not os.path.exists(path):
            continue
        tried.append(path)
        lib.crypto.ERR_clear_error()
        dyn = lib.crypto.ENGINE_by_id(b"dynamic")
        if not dyn:
            break
        for cmd, arg in ((b"SO_PATH", path.encode()), (b"ID", engine_id.encode()),
                         (b"LIST_ADD", b"1"), (b"LOAD", None)):
            if not lib.crypto.ENGINE_ctrl_cmd_string(dyn, cmd, arg, 0):
                lib.crypto.ENGINE_free(dyn)
                dyn = None
                break
        if dyn:
            return int(dyn)
    _errors(lib)
    engines_dir = (lib.crypto.OpenSSL_version(OPENSSL_ENGINES_DIR) or b"").decode()
    raise TlsKeyError(f"the OpenSSL engine {engine_id!r} cannot be loaded ({engines_dir}; "
                      f"also tried: {', '.join(tried) or 'no pkcs11.so found'}): install "
                      "libengine-pkcs11-openssl or set EXCHANGED_PKCS11_ENGINE to its pkcs11.so",
                      code="no-engine")


def _private_copy(module: str) -> tuple[str, int]:
    """The module copied into an anonymous memory file, and a path dlopen can load it from.

    dlopen() recognises a library by its file, so loading the copy gives the engine its own
    instance of the module: its own C_Initialize (with OS locking), sessions and login, which
    python-pkcs11 in this process cannot log out and does not see.
    """
    try:
        fd = os.memfd_create("exchanged-tls-pkcs11", os.MFD_CLOEXEC)
        with open(module, "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    except OSError as e:
        raise TlsKeyError(f"cannot make the TLS engine's private instance of {module}: "
                          f"{e.strerror}; pass isolate_module=False to share python-pkcs11's "
                          "instance (see exchanged/transport/tlskey.py)",
                          code="tls-module") from None
    return f"/proc/self/fd/{fd}", fd


def _engine(module: str, isolated: bool) -> _Engine:
    """The process's engine for `module` (call with `_lock` held)."""
    global _engine_cache
    if _engine_cache is not None:
        if (_engine_cache.module, _engine_cache.isolated) != (module, isolated):
            raise TlsKeyError(
                f"TLS keys in this process already use the PKCS#11 module "
                f"{_engine_cache.module} ({'private' if _engine_cache.isolated else 'shared'} "
                f"instance): one module, one way, per process (asked for {module}, "
                f"{'private' if isolated else 'shared'})", code="tls-module")
        return _engine_cache
    from exchanged.pki.token import load_module
    # Shared: python-pkcs11 must C_Initialize first (see the notes at the top). Private: the
    # same call just checks early that the module exists, with the project's usual message.
    load_module(module)
    path, copy_fd = _private_copy(module) if isolated else (module, None)
    lib = _libs()
    engine_fd = None
    if _retired:
        e, engine_fd = _fresh_engine(lib)
    else:
        e = _load_engine(lib)
    lib.crypto.ERR_clear_error()
    # FORCE_LOGIN: libp11 logs in before looking for the key, rather than first looking without
    # a login (a key cached from before a C_Logout could be found and be dead).
    if not lib.crypto.ENGINE_ctrl_cmd_string(e, b"MODULE_PATH", path.encode(), 0) or \
            not lib.crypto.ENGINE_ctrl_cmd_string(e, b"FORCE_LOGIN", None, 0) or \
            not lib.crypto.ENGINE_init(e):
        detail = "; ".join(_errors(lib)) or "no detail"
        lib.crypto.ENGINE_free(e)
        for fd in (copy_fd, engine_fd):
            if fd is not None:
                os.close(fd)
        raise TlsKeyError(f"the pkcs11 engine cannot use the PKCS#11 module {module}: {detail}",
                          code="no-engine")
    # ENGINE_init took a functional reference; the structural one from ENGINE_by_id stays too.
    # Neither is ever released (see the notes at the top: finishing the engine finalises the
    # module). Keys loaded from it are owned by the SSL_CTXs that use them.
    _engine_cache = _Engine(e, module, isolated, copy_fd, engine_fd)
    return _engine_cache


def _load_key(lib: _OpenSSL, engine: _Engine, uri: Pkcs11Uri, pin: str) -> int:
    """ENGINE_load_private_key, the PIN given through ENGINE_ctrl (never argv, never a log)."""
    from exchanged.pki.token import find_token, load_module
    find_token(load_module(engine.module), uri)  # no such token: a clear TokenError (no login)
    pin_buf = ctypes.create_string_buffer(pin.encode("utf-8"))
    try:
        lib.crypto.ERR_clear_error()
        if not lib.crypto.ENGINE_ctrl_cmd_string(engine.pointer, b"PIN", pin_buf, 0):
            raise TlsKeyError(f"the pkcs11 engine refused the PIN: {'; '.join(_errors(lib))}",
                              code="wrong-pin")
    finally:
        ctypes.memset(pin_buf, 0, len(pin_buf))
    # The engine gets the URI without its query (pin-source, module-path): the PIN is set above.
    engine_uri = str(Pkcs11Uri(attrs=uri.attrs, id=uri.id, query={}))
    # UI_null: never prompt on a terminal (a daemon has none); a wrong PIN must just fail.
    pkey = lib.crypto.ENGINE_load_private_key(engine.pointer, engine_uri.encode(),
                                              lib.crypto.UI_null(), None)
    if pkey:
        return int(pkey)
    raise _key_error(uri, _errors(lib), engine)


def _key_error(uri: Pkcs11Uri, errors: list[str], engine: _Engine) -> TlsKeyError:
    text = " ".join(errors).lower()
    token = uri.token or "(any)"
    if "unable to load pkcs#11 module" in text:
        how = (" (its private in-memory copy: a policy forbidding executable memfds? try "
               "isolate_module=False)" if engine.isolated else "")
        return TlsKeyError(f"the pkcs11 engine could not load the PKCS#11 module "
                           f"{engine.module}{how}", code="no-module")
    if "pin incorrect" in text:
        return TlsKeyError(f"wrong PIN for token {token!r} (the token locks after too many "
                           "wrong PINs): check the node's PIN file", code="wrong-pin")
    if "pin locked" in text:
        return TlsKeyError(f"token {token!r} is locked after too many wrong PINs: the security "
                           "officer must unblock it", code="pin-locked")
    if "pin" in text or "login" in text:
        return TlsKeyError(f"cannot log in to token {token!r} for the TLS key: check the PIN "
                           f"({'; '.join(errors)})", code="wrong-pin")
    return TlsKeyError(f"no private key {uri.public()} on token {token!r}: check the key URI "
                       "(`exchanged token list`)", code="no-key")


def _test_signature(lib: _OpenSSL, pkey: int, cert: x509.Certificate, uri: Pkcs11Uri) -> None:
    """Sign a random message with the loaded key (on the token) and verify it with `cert`.

    Proves, before any peer connects, that the token signs with this key and that it is the
    certificate's key (SSL_CTX_check_private_key only compares the public halves).
    """
    message = os.urandom(32)
    sig = ctypes.create_string_buffer(1024)
    siglen = ctypes.c_size_t(len(sig))
    md = lib.crypto.EVP_MD_CTX_new()
    try:
        lib.crypto.ERR_clear_error()
        ok = (md and lib.crypto.EVP_DigestSignInit(md, None, lib.crypto.EVP_sha256(), None, pkey)
              == 1 and lib.crypto.EVP_DigestSign(md, sig, ctypes.byref(siglen), message,
                                                 len(message)) == 1)
    finally:
        lib.crypto.EVP_MD_CTX_free(md)
    if not ok:
        raise TlsKeyError(f"the token did not sign with the TLS key {uri.public()} "
                          f"({'; '.join(_errors(lib)) or 'no detail'}); if this process logged "
                          "the token out (Token.close()), make the context again",
                          code="token-sign")
    public = cert.public_key()
    try:
        verify_signature(public, sig.raw[:siglen.value], message)
    except UnsupportedKey:
        raise TlsKeyError(f"TLS certificates carry EC or RSA keys, not "
                          f"{type(public).__name__}", code="bad-cert") from None
    except InvalidSignature:
        raise TlsKeyError(f"the token key {uri.public()} does not match the certificate "
                          f"{cert.subject.rfc4514_string()}: give the certificate issued for "
                          "this key", code="key-mismatch") from None


# -- certificates into the SSL_CTX --------------------------------------------------------------

def _x509(lib: _OpenSSL, cert: x509.Certificate) -> int:
    der = cert.public_bytes(serialization.Encoding.DER)
    buf = ctypes.create_string_buffer(der, len(der))
    p = _vp(ctypes.addressof(buf))
    x = lib.crypto.d2i_X509(None, ctypes.byref(p), len(der))
    if not x:
        raise TlsKeyError(f"OpenSSL cannot parse the certificate {cert.subject.rfc4514_string()}: "
                          f"{'; '.join(_errors(lib))}", code="bad-cert")
    return int(x)


def _use_chain(lib: _OpenSSL, ctx: int, chain: Sequence[x509.Certificate]) -> None:
    for i, cert in enumerate(chain):
        x = _x509(lib, cert)
        try:
            ok = (lib.ssl.SSL_CTX_use_certificate(ctx, x) if i == 0 else  # takes its own ref
                  lib.ssl.SSL_CTX_ctrl(ctx, SSL_CTRL_CHAIN_CERT, 1, x))   # add1: its own ref
        finally:
            lib.crypto.X509_free(x)
        if not ok:
            raise TlsKeyError(f"OpenSSL refused the certificate {cert.subject.rfc4514_string()}: "
                              f"{'; '.join(_errors(lib))}", code="bad-cert")


def _certs(value: str | os.PathLike[str] | Sequence[x509.Certificate],
           what: str) -> list[x509.Certificate]:
    if isinstance(value, str | os.PathLike):
        try:
            certs = x509.load_pem_x509_certificates(Path(value).read_bytes())
        except OSError as e:
            raise TlsKeyError(f"cannot read the {what} {value}: {e.strerror}",
                              code="bad-cert") from None
        except ValueError:
            raise TlsKeyError(f"the {what} {value} holds no PEM certificate",
                              code="bad-cert") from None
    else:
        certs = list(value)
    if not certs:
        raise TlsKeyError(f"the {what} is empty", code="bad-cert")
    return certs


# -- the public API -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenTlsKey:
    """What make_context attached to a context (as `context.exchanged_token_key`): for logs."""

    key_uri: str  # without PIN or pin-source
    module: str
    isolated: bool
    certificate: x509.Certificate
    _engine: _Engine  # keeps the (process-wide) engine referenced while the context lives


def make_context(*, server: bool, key_uri: str | Pkcs11Uri, pin: PinSource,
                 cert_chain: str | os.PathLike[str] | Sequence[x509.Certificate],
                 trusted: str | os.PathLike[str] | Sequence[x509.Certificate],
                 module: str | None = None, isolate_module: bool = True) -> ssl.SSLContext:
    """A mutual-TLS context whose private key is the token key `key_uri`.

    `cert_chain` is the node's certificate then any intermediates (a PEM file or certificates);
    `trusted` the CA certificates peers must chain to. The PIN comes from `pin` (file, env or
    prompt), never from the URI's pin-value. TLS 1.3 preferred, 1.2 at least (ECDHE + AEAD
    only), no compression, no renegotiation, a peer certificate required on both sides.
    `check_hostname` is off: the caller checks the peer's identity after the handshake against
    its peer table (see `peer_certificate_chain`). `module` is the PKCS#11 module (default: the
    URI's module-path, else $EXCHANGED_PKCS11_MODULE, else SoftHSM); `isolate_module` gives the
    engine its own instance of it (see the notes at the top of this file).

    Before returning, the token signs a test message that is verified against the certificate.
    Errors are ExchangedError subclasses with a code: wrong-pin, pin-locked, no-key, no-token,
    no-module, key-mismatch, no-engine, token-sign, bad-cert, bad-uri, self-check.
    """
    uri = parse_uri(key_uri) if isinstance(key_uri, str) else key_uri
    if uri.type not in (None, "private"):
        raise TlsKeyError(f"the TLS key URI names a {uri.type} object, not a private key",
                          code="bad-uri")
    if uri.object is None and uri.id is None:
        raise TlsKeyError("the TLS key URI names no key: add object=LABEL or id=...",
                          code="bad-uri")
    module = uri.module_path or module or default_module()
    chain = _certs(cert_chain, "certificate chain")
    anchors = _certs(trusted, "trusted CA certificates")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if server:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.check_hostname = False  # identity: the caller's peer table, after the handshake
    context.verify_mode = ssl.CERT_REQUIRED  # on a server: a client certificate is demanded
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata="".join(
        c.public_bytes(serialization.Encoding.PEM).decode() for c in anchors))

    lib = _libs()
    ctx = ssl_ctx_pointer(context)
    lib.ssl.SSL_CTX_set_timeout(ctx, SESSION_SECONDS)
    pin_value = pin.read(uri.pin_source, uri_pin_value="pin-value" in uri.query)
    with _lock:
        engine = _engine(module, isolate_module)
        _use_chain(lib, ctx, chain)
        pkey = _load_key(lib, engine, uri, pin_value)
        del pin_value
        try:
            lib.crypto.ERR_clear_error()
            if not lib.ssl.SSL_CTX_use_PrivateKey(ctx, pkey) or \
                    not lib.ssl.SSL_CTX_check_private_key(ctx):
                detail = "; ".join(_errors(lib))
                raise TlsKeyError(
                    f"the token key {uri.public()} does not match the certificate "
                    f"{chain[0].subject.rfc4514_string()} ({detail}): give the certificate "
                    "issued for this key", code="key-mismatch")
            _test_signature(lib, pkey, chain[0], uri)
        finally:
            lib.crypto.EVP_PKEY_free(pkey)  # the SSL_CTX holds its own reference
    # Settings changed through the Python API after this point are still the same SSL_CTX:
    # check once more that nothing above disturbed what Python believes.
    _check_ctx_pointer(context, ctx)
    context.exchanged_token_key = TokenTlsKey(  # type: ignore[attr-defined]
        str(uri.public()), module, engine.isolated, chain[0], engine)
    return context


def peer_certificate_chain(connection: Any, *, verified: bool = False) -> list[x509.Certificate]:
    """The peer's certificates after the handshake, leaf first, parsed (see `peer_chain_der`).
    A certificate OpenSSL accepted but cryptography cannot parse raises here: code that
    faces peers takes the DER and lets `transport.peers` judge it."""
    return [x509.load_der_x509_certificate(d) for d in peer_chain_der(connection,
                                                                        verified=verified)]


def peer_chain_der(connection: Any, *, verified: bool = False) -> list[bytes]:
    """The peer's certificates after the handshake, leaf first, as DER.

    `connection` is a trio.SSLStream, an ssl.SSLObject or an ssl.SSLSocket. By default the chain
    as the peer sent it (leaf and intermediates: what the caller feeds to its own verifier); with
    `verified=True`, the path OpenSSL built, ending at the trust anchor.
    """
    obj = getattr(connection, "_ssl_object", connection)  # trio.SSLStream keeps it there
    leaf = obj.getpeercert(binary_form=True)
    if not leaf:
        raise TlsKeyError("the peer presented no certificate (is the handshake done?)",
                          code="no-peer-cert")
    name = "get_verified_chain" if verified else "get_unverified_chain"
    getter = getattr(obj, name, None)  # public from Python 3.13
    if getter is None:  # 3.10-3.12: the same method on the private _ssl._SSLSocket
        getter = getattr(getattr(obj, "_sslobj", None), name, None)
    raw = (getter() if getter is not None else None) or []
    ders = [c if isinstance(c, bytes) else c.public_bytes(_ssl.ENCODING_DER) for c in raw]
    if not ders or ders[0] != leaf:
        ders.insert(0, leaf)  # a server's view of the client chain may omit the leaf
    return ders


def openssl_cli_engine(directory: Path, pin_file: str | os.PathLike[str], *,
                       module: str | None = None) -> tuple[Path, Path]:
    """What the `openssl` command needs to use a token key (tests, benchmarks, operators
    checking a node by hand): an OPENSSL_CONF that loads the pkcs11 engine with our module,
    and a copy of the PIN file for the key URI's `pin-source=` — libp11 reads that file
    verbatim, so the copy has no trailing newline. Returns (config path, pin-source path)."""
    directory.mkdir(parents=True, exist_ok=True)
    pin_copy = directory / "engine.pin"
    pin_copy.write_text(Path(pin_file).read_text().rstrip("\r\n"))
    pin_copy.chmod(0o600)
    conf = directory / "openssl-engine.cnf"
    conf.write_text("openssl_conf = openssl_init\n[openssl_init]\nengines = engine_section\n"
                    "[engine_section]\npkcs11 = pkcs11_section\n[pkcs11_section]\n"
                    f"engine_id = pkcs11\nMODULE_PATH = {module or default_module()}\n"
                    "init = 0\n")
    return conf, pin_copy
