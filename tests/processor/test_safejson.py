"""processor.safejson: every document read from the bucket goes through ``load_json``, so its
limits are what stands between a hostile upload and a worker crash far from the read. Each
limit is checked at its edge (the last accepted value and the first refused one), and two
properties cover the rest: values inside the limits come back unchanged, and no input at all
produces anything but the one documented error type."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.errors import JsonLimitError
from processor.safejson import MAX_DEPTH, MAX_INT_DIGITS, check_value, load_json


def nested_lists(levels: int) -> str:
    return "[" * levels + "]" * levels


def nested_dicts(levels: int) -> str:
    return '{"a": ' * (levels - 1) + "{}" + "}" * (levels - 1)


# -- nesting ------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [nested_lists, nested_dicts])
def test_nesting_up_to_the_limit_is_accepted_and_one_more_level_is_not(build: Any) -> None:
    assert load_json(build(MAX_DEPTH)) == json.loads(build(MAX_DEPTH))
    with pytest.raises(JsonLimitError, match=f"nested more than {MAX_DEPTH} levels"):
        load_json(build(MAX_DEPTH + 1))


def test_nesting_past_the_limit_names_where() -> None:
    with pytest.raises(JsonLimitError) as caught:
        load_json(nested_dicts(MAX_DEPTH + 1))
    assert str(caught.value).startswith("a." * (MAX_DEPTH - 1) + "a: is nested")


def test_nesting_deep_enough_to_overflow_the_parser_is_a_limit_error() -> None:
    """``json.loads`` itself recurses: 100 000 levels are a RecursionError there, which must
    reach the caller as the documented error, not as a crash of the worker."""
    with pytest.raises(JsonLimitError, match="nested too deeply"):
        load_json(nested_lists(100_000))
    with pytest.raises(JsonLimitError, match="nested too deeply"):
        load_json(nested_dicts(100_000).encode())


def test_a_smaller_depth_limit_is_obeyed() -> None:
    assert load_json(nested_lists(4), max_depth=4) == [[[[]]]]
    with pytest.raises(JsonLimitError, match="more than 4 levels"):
        load_json(nested_lists(5), max_depth=4)


# -- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("sign", ["", "-"])
def test_integers_up_to_the_digit_limit_are_accepted_and_longer_ones_are_not(sign: str) -> None:
    longest = sign + "9" * MAX_INT_DIGITS
    assert load_json(longest) == int(longest)
    with pytest.raises(JsonLimitError, match=f"{MAX_INT_DIGITS + 1} digits"):
        load_json(sign + "9" * (MAX_INT_DIGITS + 1))


def test_an_integer_too_long_for_python_is_a_limit_error_not_a_value_error() -> None:
    """Python refuses int() of more than 4300 digits with a bare ValueError."""
    with pytest.raises(JsonLimitError, match="digits"):
        load_json('{"seed": ' + "1" * 5000 + "}")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", '{"x": [1, NaN]}'])
def test_nan_and_infinity_literals_are_refused(literal: str) -> None:
    with pytest.raises(JsonLimitError, match="not a number JSON allows"):
        load_json(literal)


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "1" * 400 + ".0"])
def test_floats_that_overflow_to_infinity_are_refused(literal: str) -> None:
    with pytest.raises(JsonLimitError, match="too large"):
        load_json(f'{{"cfg": {literal}}}')


def test_tiny_and_large_finite_floats_are_kept() -> None:
    assert load_json("[1e-400, 1.7976931348623157e308, -0.0]") == [0.0, 1.7976931348623157e308, 0]


def test_check_value_refuses_a_non_finite_float_built_in_code() -> None:
    with pytest.raises(JsonLimitError, match=r"payload\.cfg: is not a finite number"):
        check_value({"payload": {"cfg": math.inf}})
    with pytest.raises(JsonLimitError, match=r"x\[1\]: is not a finite number"):
        check_value({"x": [1.0, math.nan]})


# -- text ---------------------------------------------------------------------------------


def test_an_escaped_lone_surrogate_is_refused_with_its_place() -> None:
    with pytest.raises(JsonLimitError) as caught:
        load_json(b'{"payload": {"prompt": "a \\ud83d b"}}')
    message = str(caught.value)
    assert message.startswith("payload.prompt: holds an unpaired surrogate (\\ud83d)")


def test_a_lone_surrogate_in_a_key_is_refused_too() -> None:
    with pytest.raises(JsonLimitError, match="unpaired surrogate"):
        load_json('{"\\udc00": 1}')


def test_an_escaped_surrogate_pair_is_one_character_and_is_kept() -> None:
    assert load_json('"\\ud83d\\ude00"') == "\U0001f600"


def test_surrogates_encoded_as_bytes_are_not_utf8() -> None:
    """CESU-8 style bytes for a surrogate: no UTF-8 decoder accepts them."""
    with pytest.raises(JsonLimitError, match=r"not UTF-8 text \(byte 0xed at offset 1\)"):
        load_json(b'"\xed\xa0\xbd"')


def test_a_str_holding_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(JsonLimitError, match="unpaired surrogate"):
        load_json('["fine", "\ud800"]')


def test_bytes_that_are_not_utf8_name_the_offset() -> None:
    with pytest.raises(JsonLimitError, match="byte 0xff at offset 3"):
        load_json(b'{"a\xff": 1}')


def test_broken_json_names_line_and_column() -> None:
    with pytest.raises(JsonLimitError, match=r"not valid JSON: .* at line 2 column 7"):
        load_json('{"a": 1,\n "b": }')


# -- valid documents pass unchanged -------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"workflow": "txt2img", "payload": {"seed": 123, "cfg": 7.5, "prompt": "a cat"}}',
        '[null, true, false, 0, -1, 1.5, "", "\\u00e9\\n", {"": []}]',
        '"caf\u00e9 \U0001f600"',
        "  \n 42 \t",
    ],
)
def test_valid_json_is_returned_as_json_loads_returns_it(text: str) -> None:
    assert load_json(text) == json.loads(text)
    assert load_json(text.encode()) == json.loads(text)


# -- properties ---------------------------------------------------------------------------

FINITE = st.floats(allow_nan=False, allow_infinity=False)
INTS = st.integers(min_value=-(10**MAX_INT_DIGITS) + 1, max_value=10**MAX_INT_DIGITS - 1)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
SCALARS = st.none() | st.booleans() | INTS | FINITE | TEXT
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(value=JSON_VALUES, ascii_only=st.booleans())
def test_any_value_within_the_limits_round_trips(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert load_json(text) == value
    assert load_json(text.encode("utf-8")) == value


@settings(max_examples=50, derandomize=True, deadline=None)
@given(levels=st.integers(min_value=1, max_value=MAX_DEPTH), leaf=SCALARS)
def test_any_depth_within_the_limit_round_trips(levels: int, leaf: Any) -> None:
    value: Any = leaf
    for level in range(levels):
        value = [value] if level % 2 else {"k": value}
    assert load_json(json.dumps(value)) == value


# Fragments that steer random bytes into the parser's corners: numbers at the limits, the
# refused constants, escapes of surrogates, and brackets enough to go deep.
FRAGMENTS = st.sampled_from(
    [
        b"[", b"]", b"{", b"}", b'"', b":", b",", b" ", b"\\", b"\\u", b"d83d", b"\\ud800",
        b"NaN", b"Infinity", b"-", b"1e400", b"9" * 70, b"0.5", b"true", b"null",
        b"\xed\xa0\x80", b"\xff", b"\xc3\xa9", b"\xef\xbb\xbf",
    ]
)  # fmt: skip
JUNK = st.binary(max_size=200) | st.lists(FRAGMENTS, max_size=80).map(b"".join)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(data=JUNK)
def test_any_bytes_give_a_value_or_the_documented_error(data: bytes) -> None:
    try:
        load_json(data)
    except JsonLimitError as error:
        assert str(error)  # a message for a person, never empty


@settings(max_examples=200, derandomize=True, deadline=None)
@given(text=st.text(st.characters(codec=None), max_size=60))
def test_any_str_gives_a_value_or_the_documented_error(text: str) -> None:
    """``str`` input skips the UTF-8 decode, so surrogates reach the parser as they are."""
    try:
        load_json(text)
    except JsonLimitError as error:
        assert str(error)
