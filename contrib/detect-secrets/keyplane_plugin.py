"""detect-secrets plugin for keyplane tokens.

    detect-secrets scan --plugin contrib/detect-secrets/keyplane_plugin.py \
        --disable-filter detect_secrets.filters.heuristic.is_indirect_reference

That filter, on by default, drops every line that looks like a call or an index on either side of
`=` or `:` (`client = Client(token="aether_...")`, `os.environ.get("X", "aether_...")`), which is
where hard-coded tokens most often are; the checksum keeps look-alikes out without it.

Finds the three keyplane token formats and reports only those whose CRC32 checksum holds, so a
string that merely looks like a token (a truncated one, a typo, a made-up example) is not
reported. The format is keyplane's public contract (crates/core/src/token.rs):

    aether_  + 48 random hex + 8 hex CRC32                      API token         (63 chars)
    hbx_sa_  + 16 hex public id + "_" + 48 hex + 8 hex CRC32    service account   (80 chars)
    kprobot_ + 48 random hex + 8 hex CRC32                      robot secret      (64 chars)

All hex is lowercase. The CRC32 (IEEE, as zlib computes it) covers every character before it,
prefix included, and is written as 8 hex digits, big-endian.

A token found this way can be revoked by anyone, without credentials:

    curl -X POST https://keyplane.example/v1/credentials/revoke \\
         -H 'Content-Type: application/json' -d '{"credentials": ["aether_..."]}'
"""
import re
import zlib

from detect_secrets.plugins.base import RegexBasedDetector

_CHECKSUM_HEX = 8

# Not inside a longer word on either side: a token is never preceded or followed by another
# identifier character, except where an escape ends just before it (`\n` in a JSON log line,
# `%3D` in a URL-encoded one).
_TOKEN = re.compile(
    r'(?:(?<![A-Za-z0-9_])|(?<=\\[nrt])|(?<=%[0-9A-Fa-f]{2}))'
    r'(aether_[0-9a-f]{56}|hbx_sa_[0-9a-f]{16}_[0-9a-f]{56}|kprobot_[0-9a-f]{56})'
    r'(?![A-Za-z0-9_])',
)


def has_valid_checksum(token: str) -> bool:
    """Whether the token's last 8 hex digits are the CRC32 of everything before them."""
    covered, checksum = token[:-_CHECKSUM_HEX], token[-_CHECKSUM_HEX:]
    return '%08x' % zlib.crc32(covered.encode('ascii')) == checksum


class KeyplaneTokenDetector(RegexBasedDetector):
    """Scans for keyplane API tokens, service-account tokens and robot secrets."""

    secret_type = 'keyplane token'

    denylist = [_TOKEN]

    def analyze_string(self, string):
        # The regex finds the shape; the checksum, which detect-secrets has no setting for, keeps
        # look-alikes out before they become findings.
        for match in super().analyze_string(string):
            if has_valid_checksum(match):
                yield match
