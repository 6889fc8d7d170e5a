"""Webhook signatures: valid, tampered, expired, future-dated, unsigned, rotated secrets, several v1."""

import pytest

from app.signature import SignatureError, sign, signature_hex, verify

OLD, NEW = "o" * 32, "n" * 32
BODY = b'{"documents": [{"document_id": "a", "text": "hello"}]}'
NOW = 1_700_000_000


def check(header, body=BODY, secrets=(NEW,), now=NOW):
    return verify(header, body, list(secrets), tolerance_s=300, now=now)


def test_valid_signature_returns_its_timestamp():
    assert check(sign(BODY, NEW, NOW)) == NOW
    assert check(sign(BODY, NEW, NOW - 300)) == NOW - 300  # the edge of the window still passes


@pytest.mark.parametrize("header, reason", [
    (None, "missing"),
    ("", "missing"),
    ("garbage", "malformed"),
    (f"v1={signature_hex(NEW, NOW, BODY)}", "exactly one t"),
    (f"t=abc,v1={signature_hex(NEW, NOW, BODY)}", "exactly one t"),
    (f"t={NOW},t={NOW},v1={signature_hex(NEW, NOW, BODY)}", "exactly one t"),
    (f"t={NOW}", "no v1"),
    (f"t={NOW},v1={'0' * 64}", "does not match"),
    (f"t={NOW},v1=é", "does not match"),
])
def test_malformed_or_wrong_headers_are_refused(header, reason):
    with pytest.raises(SignatureError, match=reason):
        check(header)


def test_tampered_body_or_timestamp_fails():
    header = sign(BODY, NEW, NOW)
    with pytest.raises(SignatureError, match="does not match"):
        check(header, body=BODY.replace(b"hello", b"hellp"))
    forged = header.replace(f"t={NOW}", f"t={NOW + 1}")
    with pytest.raises(SignatureError, match="does not match"):
        check(forged)


@pytest.mark.parametrize("offset", [-301, 301, -86400, 86400])
def test_expired_and_future_dated_signatures_fail(offset):
    with pytest.raises(SignatureError, match="300 s"):
        check(sign(BODY, NEW, NOW + offset))


def test_rotation_any_configured_secret_passes():
    assert check(sign(BODY, OLD, NOW), secrets=(NEW, OLD)) == NOW
    with pytest.raises(SignatureError):
        check(sign(BODY, OLD, NOW), secrets=(NEW,))  # the old secret, once removed, no longer passes


def test_several_v1_values_any_may_match():
    good = signature_hex(NEW, NOW, BODY)
    assert check(f"t={NOW},v1={'f' * 64},v1={good}") == NOW
    assert check(f"t={NOW}, v1={good.upper()}, v0=ignored") == NOW  # spaces, case and unknown keys


def test_no_secret_configured_refuses_everything():
    with pytest.raises(SignatureError, match="no webhook secret"):
        check(sign(BODY, NEW, NOW), secrets=())


# Computed outside this code: printf '%s' "1700000000.$BODY" | openssl dgst -sha256 -hmac "$NEW" -hex
KNOWN_HEADER = "t=1700000000,v1=8a3b621aff79e1800b9b9ac423d1c2fc78e4f05bf3661a4f5f95d16655edd429"


def test_known_answer_vector_is_accepted_and_a_one_bit_change_is_not():
    """HMAC-SHA256 of "<t>.<body>" as README documents it, independent of this module's own sign()."""
    assert sign(BODY, NEW, NOW) == KNOWN_HEADER
    assert check(KNOWN_HEADER) == NOW
    flipped = KNOWN_HEADER[:-1] + format(int(KNOWN_HEADER[-1], 16) ^ 1, "x")  # last hex digit, lowest bit
    with pytest.raises(SignatureError, match="does not match"):
        check(flipped)
    with pytest.raises(SignatureError, match="does not match"):
        check(KNOWN_HEADER, body=bytes([BODY[0] ^ 1]) + BODY[1:])  # one bit of the body
