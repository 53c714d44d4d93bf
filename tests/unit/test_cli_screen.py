"""The terminal model and output cleaning of the CLI driver (pager residue, echo, escapes)."""

from __future__ import annotations

import re

import pytest

from poller.drivers.cli import Screen, clean_output

MORE = " --More-- "
PAGERS = [re.compile(r" ?--more-- ?$", re.IGNORECASE)]


def render(*chunks: str) -> Screen:
    screen = Screen()
    for chunk in chunks:
        screen.feed(chunk)
    return screen


def test_plain_lines_and_crlf() -> None:
    screen = render("one\r\ntwo\r\nsw1#")
    assert screen.lines == ["one", "two"]
    assert screen.current == "sw1#"
    assert screen.serial == 2


def test_backspace_erase_of_a_pager_keeps_the_indent_of_the_next_line() -> None:
    erase = "\b" * len(MORE) + " " * len(MORE) + "\b" * len(MORE)
    screen = render("line 1\r\n", MORE)
    screen.paged = True
    screen.feed(erase + " indented\r\nx\r\n")
    assert screen.lines == ["line 1", " indented", "x"]


def test_cursor_left_erase_split_across_chunks() -> None:
    pager = "  ---- More ----"
    screen = render("a\r\n", pager)
    screen.paged = True
    screen.feed("\x1b[1")
    screen.feed("6D" + " " * 16 + "\x1b[16D")
    screen.feed("next\r\n")
    assert screen.lines == ["a", "next"]


def test_carriage_return_overwrite_and_erase_line() -> None:
    screen = render("CTRL+C ESC q Quit", "\r", " " * 17, "\r", "b\r\n")
    assert screen.lines == ["b" + " " * 16]
    screen = render("More: <space>", "\r\x1b[K", "short\r\n")
    assert screen.lines == ["short"]


def test_colours_osc_and_control_characters_are_dropped() -> None:
    screen = render("\x1b[1;32mgreen\x1b[0m \x1b]0;title\x07ok\x07\x00\r\n")
    assert screen.lines == ["green ok"]


def test_utf8_split_between_chunks() -> None:
    screen = Screen()
    data = "порт 1\r\n".encode()
    screen.feed_bytes(data[:3])
    screen.feed_bytes(data[3:])
    assert screen.lines == ["порт 1"]


def test_cursor_right_pads_with_spaces() -> None:
    assert render("a\x1b[3Cb\r\n").lines == ["a   b"]


def test_size_counts_committed_and_current() -> None:
    assert render("abc\r\nde").size == 6


@pytest.mark.parametrize(
    ("lines", "command", "expected"),
    [
        (["sw1#show version", "v1", "v2", ""], "show version", "v1\nv2"),
        (["sw1#show  version", "", "v1"], "show version", "v1"),
        (["no echo here", "v1"], "show version", "no echo here\nv1"),
        (["sw1#show x", "v1 --More-- "], "show x", "v1"),
        (["sw1#show empty"], "show empty", ""),
    ],
)
def test_clean_output(lines: list[str], command: str, expected: str) -> None:
    assert clean_output(lines, command, PAGERS) == expected
