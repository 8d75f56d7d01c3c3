"""PII redaction: every value the security review found slipping through, and the ordinary
numbers that must survive.

Unit tests of :func:`activities.rag.guardrails.redact_pii` (pure text, no servers); the Ask
path that redacts answers end to end is tested in ``tests/test_prompt_injection.py``, and
the audit trail's URIs in ``tests/test_lifecycle.py``.
"""

from __future__ import annotations

import pytest

from activities.rag.guardrails import PII_KINDS, normalize_text, redact_pii

ZWSP = "\u200b"  # zero-width space
ZWJ = "\u200d"  # zero-width joiner
SHY = "\u00ad"  # soft hyphen


def _redacts(text: str, kind: str, value: str, n: int = 1) -> str:
    redacted, counts = redact_pii(text)
    assert value not in redacted, redacted
    assert normalize_text(value) not in redacted, redacted
    assert f"[{kind}]" in redacted, redacted
    assert counts[kind] == n and sum(counts.values()) == n, counts
    assert redact_pii(redacted) == (redacted, dict.fromkeys(PII_KINDS, 0))  # idempotent
    return redacted


# --- the findings, one by one ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("write to jürgen.müller@bücher.de today", "jürgen.müller@bücher.de"),
        ("write to 用户@例子.广告 today", "用户@例子.广告"),
        ("write to josé@correo.españa.es", "josé@correo.españa.es"),
        ("punycode jane@xn--bcher-kva.example.xn--p1ai ok", "jane@xn--bcher-kva.example.xn--p1ai"),
        ("fullwidth at: jane\uff20example.com", "jane\uff20example.com"),
        ("small at: jane\ufe6bexample.com", "jane\ufe6bexample.com"),
        ("all fullwidth: ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ", "ｊａｎｅ＠ｅｘａｍｐｌｅ．ｃｏｍ"),
        (f"hidden: jane{ZWSP}@{ZWSP}example.com", f"jane{ZWSP}@{ZWSP}example.com"),
        (f"soft hyphen: ja{SHY}ne@exam{SHY}ple.com", f"ja{SHY}ne@exam{SHY}ple.com"),
        ("ideographic dot: 用户@例子。广告", "用户@例子。广告"),
    ],
)
def test_internationalised_and_disguised_emails(text: str, value: str) -> None:
    _redacts(text, "EMAIL", value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("iban de89 3704 0044 0532 0130 00, thanks", "de89 3704 0044 0532 0130 00"),
        ("iban de89370400440532013000.", "de89370400440532013000"),
        ("IBAN DE89-3704-0044-0532-0130-00 due", "DE89-3704-0044-0532-0130-00"),
        ("iban gb82-west-1234-5698-7654-32", "gb82-west-1234-5698-7654-32"),
        ("IBAN FR14 2004 1010 0505 0001 3M02 606 is ours", "FR14 2004 1010 0505 0001 3M02 606"),
        ("IBAN DE89 3704 0044 0532 0130 00 1234 is it", "DE89 3704 0044 0532 0130 00"),
        (
            "fullwidth ＤＥ８９３７０４００４４０５３２０１３０００",
            "ＤＥ８９３７０４００４４０５３２０１３０００",
        ),
    ],
)
def test_lowercase_and_grouped_ibans(text: str, value: str) -> None:
    _redacts(text, "IBAN", value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("my SSN is 078051120.", "078051120"),
        ("SSN: 078 05 1120", "078 05 1120"),
        ("social security number: 219.09.9999", "219.09.9999"),
        ("Social Security No. 123456789 on file", "123456789"),
        ("ss# 123 45 6789", "123 45 6789"),
        ("her SSN was 123-45-6789", "123-45-6789"),
        ("written 123-45-6789 alone", "123-45-6789"),
        (f"ssn 078{ZWSP}05{ZWSP}1120", f"078{ZWSP}05{ZWSP}1120"),
    ],
)
def test_ssns_with_and_without_dashes(text: str, value: str) -> None:
    _redacts(text, "ID", value)


@pytest.mark.parametrize(
    "text",
    [
        # Choice: a bare nine-digit number is not an SSN (order, invoice, routing numbers).
        "invoice 078051120 is due",
        "order number 123456789 shipped",
        # Unlabelled: the SSA never issues area 000, 666 or 900-999, group 00 or serial 0000.
        "codes 000-12-3456, 666-12-3456 and 912-34-5678",
        "codes 123-00-4567 or 123-45-0000",
    ],
)
def test_nine_digit_numbers_that_are_not_ssns(text: str) -> None:
    assert redact_pii(text) == (text, dict.fromkeys(PII_KINDS, 0))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("card 4111.1111.1111.1111 exp 12/29", "4111.1111.1111.1111"),
        ("amex 3782.822463.10005", "3782.822463.10005"),
        (f"card 4111{ZWSP}1111{ZWSP}1111{ZWSP}1111 ok", f"4111{ZWSP}1111{ZWSP}1111{ZWSP}1111"),
        (f"card 5555{ZWJ}5555{ZWJ}5555{ZWJ}4444.", f"5555{ZWJ}5555{ZWJ}5555{ZWJ}4444"),
        ("card ４１１１ １１１１ １１１１ １１１１", "４１１１ １１１１ １１１１ １１１１"),
        ("nbsp 4111\u00a01111\u00a01111\u00a01111", "4111\u00a01111\u00a01111\u00a01111"),
    ],
)
def test_cards_with_dots_and_invisible_separators(text: str, value: str) -> None:
    _redacts(text, "CARD", value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("passport number is X1234567", "X1234567"),
        ("Passport No.: C01X00T47 valid", "C01X00T47"),
        ("passport # 533380006", "533380006"),
        ("Reisepass Nr. C01X00T47", "C01X00T47"),
        ("passeport n° 12AB34567", "12AB34567"),
        ("her passport: L898902C3, issued", "L898902C3"),
    ],
)
def test_labelled_passports(text: str, value: str) -> None:
    _redacts(text, "ID", value)


def test_passport_machine_readable_zone() -> None:
    mrz = (
        "P<UTOERIKSSON<<ANNA<MARIA<<<<<<<<<<<<<<<<<<<\nL898902C36UTO7408122F1204159ZE184226B<<<<<10"
    )
    redacted, counts = redact_pii(f"scan:\n{mrz}\nend")
    assert "ERIKSSON" not in redacted and "L898902C3" not in redacted
    assert counts["ID"] == 2 and redacted == "scan:\n[ID]\n[ID]\nend"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("login from 203.0.113.42 at noon", "203.0.113.42"),
        ("client 192.168.1.10.", "192.168.1.10"),
        ("from 2001:db8::8a2e:370:7334 at", "2001:db8::8a2e:370:7334"),
        (
            "v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334, blocked",
            "2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        ),
        ("mapped ::ffff:203.0.113.7 seen", "::ffff:203.0.113.7"),
        ("link-local fe80::1ff:fe23:4567:890a%eth0 up", "fe80::1ff:fe23:4567:890a%eth0"),
        ("fullwidth ２０３．０．１１３．４２ too", "２０３．０．１１３．４２"),
    ],
)
def test_ip_addresses(text: str, value: str) -> None:
    _redacts(text, "IP", value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("call +4915112345678 now", "+4915112345678"),
        ("mobile +4915112345678.", "+4915112345678"),
        ("call +44 20 7946 0958 today", "+44 20 7946 0958"),
        ("Paris +33 1 23 45 67 89", "+33 1 23 45 67 89"),
        ("fullwidth ＋４９１５１１２３４５６７８", "＋４９１５１１２３４５６７８"),
    ],
)
def test_international_numbers_are_phones_not_cards(text: str, value: str) -> None:
    _redacts(text, "PHONE", value)


@pytest.mark.parametrize(
    "text",
    [
        "In 2019 and 2020 the price rose from $1,299.99 to $1,499.00 (page 123, pp. 45-67).",
        "ISBN 978-3-16-148410-0 and ISBN 9783161484100.",
        "version 3.11.7, section 1.2.3.4, v2.0.0.1 and Fig. 10.2.3.4 of the spec.",
        "the meeting ran 10:30:45 to 12:00; std::vector and Foo::bar; ::1 is localhost.",
        "an invalid IBAN GB00 WEST 1234 5698 7654 32 and a word like de12 abcd.",
        "tracking 1Z999AA10123456784; 3 +5 = 8; 48.8566, 2.3522.",
        "999.999.999.999 is no address; neither is 1.2.3.",
        "a bare number 5551234567 with no plus and no keyword.",
        "plain text with a soft hyphen: co\u00adoperation and e\u0301 stay as written.",
    ],
)
def test_ordinary_text_is_left_exactly_as_written(text: str) -> None:
    assert redact_pii(text) == (text, dict.fromkeys(PII_KINDS, 0))


def test_normalisation_only_where_something_was_redacted() -> None:
    """Text with nothing to redact comes back byte for byte (snippets shown to users keep
    their own spelling); text with a redaction comes back in the normalised form the
    detectors matched on, so no half-hidden value survives beside the placeholder."""
    text = f"ﬁnal report… for jane{ZWSP}@example.com"
    redacted, counts = redact_pii(text)
    assert redacted == "final report... for [EMAIL]" and counts["EMAIL"] == 1
    assert normalize_text(f"a{ZWSP}b\uff21\U000e0041") == "abA"  # tag characters vanish too


def test_every_kind_in_one_text() -> None:
    text = (
        "Jürgen (jürgen@bücher.de, +4915112345678) paid with 4111.1111.1111.1111 from "
        "iban de89-3704-0044-0532-0130-00; SSN 078 05 1120; passport no. C01X00T47; "
        "last seen at 203.0.113.42."
    )
    redacted, counts = redact_pii(text)
    assert counts == {"EMAIL": 1, "PHONE": 1, "CARD": 1, "IBAN": 1, "ID": 2, "IP": 1}
    assert redacted == (
        "Jürgen ([EMAIL], [PHONE]) paid with [CARD] from iban [IBAN]; SSN [ID]; "
        "passport no. [ID]; last seen at [IP]."
    )
