"""Log redaction (jaxft/serve/redact.py): e-mails, cards and phones masked in text the server
logs, ordinary numbers kept; the per-request log line shows no body content unless asked.
Tables of real-world forms plus hypothesis properties over generated addresses and numbers."""

import json
import re
import string
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxft.serve.redact import CARD, EMAIL, PHONE, describe_request, luhn_valid, redact

# Test card numbers published by payment processors (Stripe, PayPal, Adyen docs): all Luhn-valid.
PUBLISHED_TEST_CARDS = [
  "4111111111111111", "4012888888881881", "4222222222222", "5555555555554444",
  "5105105105105100", "2223003122003222", "378282246310005", "371449635398431",
  "6011111111111117", "6011000990139424", "3530111333300000", "30569309025904",
  "6200000000000005", "4000056655665556", "6304000000000000",
]


@pytest.mark.parametrize("number", PUBLISHED_TEST_CARDS)
def test_luhn_accepts_published_test_cards_and_rejects_a_changed_digit(number):
  assert luhn_valid(number)
  last = str((int(number[-1]) + 1) % 10)
  assert not luhn_valid(number[:-1] + last)  # any single-digit change breaks the check


@pytest.mark.parametrize("text, expected", [
  # e-mails
  ("write to john.doe@example.com today", f"write to {EMAIL} today"),
  ("<a.b+tag@mail.example.co.uk>.", f"<{EMAIL}>."),
  ("o'brien_99@sub-domain.example.org, x@y.io", f"{EMAIL}, {EMAIL}"),
  ("MAILTO:ADMIN@EXAMPLE.COM", f"MAILTO:{EMAIL}"),
  ("https://x.org/u/bob@example.com?to=ann@example.net&y=1",
   f"https://x.org/u/{EMAIL}?to={EMAIL}&y=1"),
  ("`a!b#c$d%e'f*g+h^i_j~k.l-m@n.io`", f"`{EMAIL}`"),
  ("a/b=@x.org and {=}@x.org", f"a/b{EMAIL} and {EMAIL}"),  # RFC-legal rare characters
  # phones: international
  ("call +44 20 7946 0958 now", f"call {PHONE} now"),
  ("+1-202-555-0173", PHONE),
  ("+1 (202) 555-0173", PHONE),
  ("+49 (0)30 123456 or +49(30)1234567", f"{PHONE} or {PHONE}"),
  ("+33 1 23 45 67 89.", f"{PHONE}."),
  ("+14155550173", PHONE),
  ("+91 98765 43210", PHONE),
  # phones: North American
  ("(202) 555-0173", PHONE),
  ("(202)555-0173", PHONE),
  ("202-555-0173", PHONE),
  ("202.555.0173", PHONE),
  ("202 555 0173", PHONE),
  ("1-800-555-0199", PHONE),
  ("tel:202-555-0173;", f"tel:{PHONE};"),
  # cards
  ("card 4111 1111 1111 1111 exp 12/27", f"card {CARD} exp 12/27"),
  ("4111-1111-1111-1111", CARD),
  ("4111111111111111 cvv 123", f"{CARD} cvv 123"),
  ("4111111111111111 123", f"{CARD} 123"),  # the CVV group is not Luhn-tied: kept
  ("amex 3782 822463 10005", f"amex {CARD}"),
  ("5555-5555 5555-4444", CARD),
  ("order#4222222222222!", f"order#{CARD}!"),
  ("n=6011111111111117", f"n={CARD}"),
  # all three at once
  ("me@x.org / 202-555-0173 / 4111111111111111", f"{EMAIL} / {PHONE} / {CARD}"),
])
def test_masks(text, expected):
  assert redact(text) == expected


@pytest.mark.parametrize("text", [
  "in 2026 we sold 3,000 units at $1,299.99 (about 1 200 000 EUR)",
  "due 2026-12-07, shipped 07/12/2026 at 10:30:15",
  "2026-12-07 2026-12-08 and 2026-12-07T18:17:56Z",
  "user 123456, order #1234567, ticket 98-7654",
  "version 1.2.3, host 192.168.0.1:8000, pi 3.14159265",
  "+5 points, +100 votes, 1+1234567",
  "555-0173 is a local number",  # xxx-xxxx alone: no area code, kept (too like an id)
  "unix time 1765131476, in ms 1765131476000",  # bare runs are never phones
  "4111 1111 1111 1112",  # 16 digits failing Luhn: kept (not a valid card)
  "scores 12 15 18 20 11 13 14 16",  # groups of 1-2 digits never make a card
  "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
  "isbn 978-3-16-148410-0",
  "a@b has no domain, @handle, user@localhost",
  "",
])
def test_keeps_ordinary_text_and_numbers(text):
  assert redact(text) == text


def test_the_documented_limits():
  """What the module docstring says is not caught, so a change in behaviour is a choice."""
  assert redact("josé@exämple.de") == "josé@exämple.de"  # non-ASCII addresses
  assert redact("0044 20 7946 0958") == "0044 20 7946 0958"  # 00 instead of +
  # Past 15 digits the trailing groups are not the phone's: the phone is masked, they stay.
  assert redact("+1 202 555 0173 2026 12 07") == f"{PHONE} 12 07"


# -- properties ----------------------------------------------------------------------------

NO_DIGITS = st.text(st.characters(blacklist_categories=("Nd",), blacklist_characters="@+"),
                    max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.emails(), st.text(max_size=40))
def test_any_email_in_any_text_is_masked(before, email, after):
  out = redact(f"{before} {email} {after}")
  assert email not in out
  assert EMAIL in out


@st.composite
def luhn_cards(draw):
  """A Luhn-valid 13-19-digit number (random digits + the check digit), written with any
  separator (space, dash or none) between any groups of 3+ digits."""
  n = draw(st.integers(13, 19))
  body = draw(st.text("0123456789", min_size=n - 1, max_size=n - 1))
  check = next(d for d in "0123456789" if luhn_valid(body + d))
  digits = body + check
  cuts, i = [], 0
  while True:
    i = draw(st.integers(i + 3, i + 8))
    if i > n - 3:
      break
    cuts.append(i)
  parts = [digits[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
  seps = draw(st.lists(st.sampled_from([" ", "-", ""]), min_size=len(parts) - 1,
                       max_size=len(parts) - 1))
  return digits, "".join(p + s for p, s in zip(parts, [*seps, ""]))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), luhn_cards(), st.text(max_size=30))
def test_a_luhn_valid_card_with_any_grouping_is_masked(before, card, after):
  digits, written = card
  out = redact(f"{before} {written} {after}")
  assert written not in out and CARD in out


@settings(max_examples=200, deadline=None)
@given(NO_DIGITS, luhn_cards(), NO_DIGITS)
def test_the_whole_card_and_nothing_else_is_replaced(before, card, after):
  assert redact(f"{before} {card[1]} {after}") == f"{before} {CARD} {after}"


@settings(max_examples=200, deadline=None)
@given(st.text("0123456789", min_size=13, max_size=19).filter(lambda d: not luhn_valid(d)))
def test_non_luhn_13_to_19_digit_runs_are_kept(digits):
  assert redact(f"id {digits}.") == f"id {digits}."


@settings(max_examples=300, deadline=None)
@given(NO_DIGITS, st.integers(-999_999, 999_999),
       st.sampled_from(["{:d}", "{:,d}", "${:,d}.99", "{:d}%", "#{:d}", "{:,d} 000"]),
       NO_DIGITS)
def test_numbers_shorter_than_7_digits_are_kept(before, number, form, after):
  text = f"{before}{form.format(number)}{after}"
  if form == "{:,d} 000":  # "123 000": six digits written with a space
    text = f"{before}{form.format(number % 1000)}{after}"
  assert redact(text) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20), st.text("0123456789", min_size=10, max_size=10),
       st.sampled_from(["({}) {}-{}", "({}){}-{}", "{}-{}-{}", "{}.{}.{}", "{} {} {}",
                        "1-{}-{}-{}"]),
       st.text(max_size=20))
def test_north_american_phones_in_every_listed_form_are_masked(before, d, form, after):
  phone = form.format(d[:3], d[3:6], d[6:])
  out = redact(f"{before} {phone} {after}")
  assert phone not in out and (PHONE in out or CARD in out)


@settings(max_examples=200, deadline=None)
@given(st.text("0123456789", min_size=1, max_size=3),
       st.lists(st.text("0123456789", min_size=1, max_size=4), min_size=2, max_size=5),
       st.sampled_from([" ", "-", "."]), st.text(max_size=20))
def test_international_phones_are_masked(cc, groups, sep, after):
  digits = len(cc) + sum(map(len, groups))
  if not 7 <= digits <= 15:
    return
  phone = "+" + cc + sep + sep.join(groups)
  out = redact(f"tel {phone} {after}")
  assert phone not in out and (PHONE in out or CARD in out)


@settings(max_examples=300, deadline=None)
@given(st.text(string.printable, max_size=80))
def test_redacting_twice_changes_nothing_more(text):
  once = redact(text)
  assert redact(once) == once


def test_linear_time_on_large_adversarial_bodies():
  """A log call must not hang a worker on a large body: each input is ~100 KB of what makes
  naive patterns rescan (a base64-like run without '@', digit groups, '+' groups, dotted labels).
  Quadratic scanning of any of them takes a minute; linear takes well under a second."""
  for text in ["Ab0+/=" * 17_000, "/=?&" * 25_000 + "a", "a" * 50_000 + "@" + "b" * 50_000,
               "1 " * 50_000, "1234 " * 20_000, "+1 " * 30_000, "x@" + "a." * 50_000,
               "a." * 50_000 + "@"]:
    start = time.perf_counter()
    redact(text)
    assert time.perf_counter() - start < 5.0, text[:20]


# -- describe_request -----------------------------------------------------------------------

BODY = {"model": "bbc", "prompt": "I am jane@corp.example, card 4111 1111 1111 1111",
        "max_tokens": 16, "messages": [{"role": "user", "content": "ring me: +44 20 7946 0958"}],
        "user_id": 4012888888881881, "temperature": 0.7, "stream": False, "stop": None}


def _body_of(line: str):
  return json.loads(line.split(" body=", 1)[1])


def test_default_line_has_path_size_and_field_names_but_no_content():
  line = describe_request("/v1/completions", BODY, log_bodies=False, redact_bodies=True)
  size = len(json.dumps(BODY, separators=(",", ":"), ensure_ascii=False).encode())
  assert line == (f"/v1/completions bytes={size} fields=model:str[3],prompt:str[48],"
                  "max_tokens:int,messages:list[1],user_id:int,temperature:float,stream:bool,"
                  "stop:null")
  for content in ["bbc", "jane", "4111", "7946", "16", "0.7", "4012"]:
    assert content not in re.sub(r"\[\d+\]", "", line.split(" fields=")[1])


def test_the_default_ignores_redact_bodies_and_lists_at_most_32_fields():
  many = {f"f{i}": i for i in range(40)}
  line = describe_request("/v1/x", many, log_bodies=False, redact_bodies=False)
  assert line.endswith(",f31:int,+8 more") and "f32" not in line
  # Field names are the client's: an address used as a key is masked, long keys are cut.
  line = describe_request("/v1/x", {"bob@x.org": 1, "k" * 100: 2}, log_bodies=False,
                          redact_bodies=False)
  assert "bob" not in line and f"{EMAIL}:int" in line and "k" * 64 + ":int" in line
  assert "k" * 65 not in line


def test_log_bodies_without_redaction_logs_the_exact_body():
  line = describe_request("/v1/completions", BODY, log_bodies=True, redact_bodies=False)
  assert _body_of(line) == BODY


def test_log_bodies_with_redaction_masks_every_string_and_card_like_integer():
  line = describe_request("/v1/chat/completions", BODY, log_bodies=True, redact_bodies=True)
  shown = _body_of(line)
  assert shown["prompt"] == f"I am {EMAIL}, card {CARD}"
  assert shown["messages"] == [{"role": "user", "content": f"ring me: {PHONE}"}]
  assert shown["user_id"] == CARD  # a card sent as a JSON number is masked too
  assert {k: shown[k] for k in ("model", "max_tokens", "temperature", "stream", "stop")} == {
    "model": "bbc", "max_tokens": 16, "temperature": 0.7, "stream": False, "stop": None}
  for secret in ["jane", "4111", "7946", "4012888888881881"]:
    assert secret not in line
  assert line.startswith("/v1/chat/completions bytes=")


def test_no_body_and_a_path_with_personal_data():
  assert describe_request("/v1/models", None, log_bodies=True, redact_bodies=True) == (
    "/v1/models bytes=0")
  assert describe_request("/v1/u/a@b.com", None, log_bodies=False,
                          redact_bodies=False) == f"/v1/u/{EMAIL} bytes=0"
