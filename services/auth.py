"""API keys from `GENSERVE_API_KEYS_FILE`: one key per line, the key itself or
`sha256:<hex>` of it (so a Kubernetes Secret need not hold the keys in clear).

Keys are kept only as SHA-256 digests and compared in constant time against every
digest (a miss costs as much as a hit). The file is re-read when its modification time,
size or inode changes, at most once a second, so keys rotate without a restart; a file
that cannot be read, is malformed or holds no key (caught half-written, or truncated by
mistake) keeps the keys last read, and says so in the log, rather than locking every
client out; at start-up each of these is an error. Keys are never logged: a key's id is the first 12 hex digits
of its digest, enough to tell keys apart in logs and metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger("genserve")

_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
RELOAD_CHECK_S = 1.0


def key_id(digest: bytes) -> str:
    return digest.hex()[:12]


def parse_keys(text: str, source: str = "keys file") -> list[bytes]:
    """Lines -> SHA-256 digests. Blank lines and `#` comments are skipped."""
    digests = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower().startswith("sha256:"):
            hexdigest = line[7:].strip().lower()
            if not _HEX_DIGEST.match(hexdigest):
                raise ValueError(f"{source} line {number}: sha256: must be followed by 64 hex digits")
            digests.append(bytes.fromhex(hexdigest))
        else:
            digests.append(hashlib.sha256(line.encode()).digest())
    return digests


class KeyStore:
    def __init__(self, path: Path, clock=None, variable: str = "GENSERVE_API_KEYS_FILE"):
        self.path = Path(path)
        self.variable = variable
        self._clock = clock or (lambda: time.monotonic())
        self._digests: list[bytes] = []
        self._stamp: tuple | None = None
        self._checked = float("-inf")
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if not force and stamp == self._stamp:
                return
            self._stamp = stamp  # this version is judged once, good or bad
            digests = parse_keys(self.path.read_text(), str(self.path))
            if not digests:
                raise ValueError(f"{self.path} holds no keys")
        except (OSError, ValueError) as exc:
            if force:
                raise ValueError(f"{self.variable}: {exc}") from None
            log.error("API keys file %s could not be re-read (%s); keeping the %d keys read before",
                      self.path, exc, len(self._digests))
            return
        self._digests = digests
        log.info("API keys: %d keys from %s (ids %s)", len(digests), self.path,
                 ", ".join(key_id(d) for d in digests))

    def identify(self, presented: str) -> str | None:
        """The key id of a valid key, None otherwise."""
        now = self._clock()
        if now - self._checked >= RELOAD_CHECK_S:
            self._checked = now
            self._reload()
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known in self._digests:  # no early exit: the time does not tell which key matched
            if hmac.compare_digest(digest, known):
                found = known
        return None if found is None else key_id(found)


def presented_keys(raw_headers: list[tuple[bytes, bytes]]) -> list[str]:
    """Every key a request presents: `Authorization: Bearer <key>` (as OpenAI clients send)
    and `X-API-Key: <key>`, each header as often as it is given."""
    keys = []
    for name, value in raw_headers:
        name, text = name.lower(), value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, key = text.partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                keys.append(key.strip())
        elif name == b"x-api-key" and text:
            keys.append(text)
    return keys
