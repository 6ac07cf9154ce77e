"""Copy-on-write ahead (netjail.kernel.prefault): what a forked process wrote is seen through
its own pagemap, page runs, the learners' bounded page lists, and the fork server's merge."""

from __future__ import annotations

import ctypes
import mmap
import os

from netjail.kernel import prefault
from netjail.kernel.prefault import HotPages, PageWatch, decode_pages, encode_pages, page_runs

PAGE = prefault.PAGE_SIZE


def test_writable_ranges_are_the_private_writable_mappings_in_pages() -> None:
    maps = (
        "00400000-00401000 r-xp 00000000 fe:00 1 /usr/bin/python3.11\n"
        "00600000-00603000 rw-p 00000000 fe:00 1 /usr/bin/python3.11\n"
        "7f0000000000-7f0000002000 rw-p 00000000 00:00 0\n"
        "7f0000010000-7f0000011000 rw-s 00000000 00:01 2 /dev/zero (deleted)\n"
    )
    assert prefault.writable_ranges(maps) == [
        (0x600000 // PAGE, 0x603000 // PAGE),
        (0x7F0000000000 // PAGE, 0x7F0000002000 // PAGE),
    ]


def test_page_runs_merge_consecutive_pages() -> None:
    assert page_runs([7, 3, 4, 5, 9, 4]) == [(3, 3), (7, 1), (9, 1)]
    assert page_runs([]) == []


def test_page_lists_are_bounded_and_malformed_ones_are_empty() -> None:
    assert decode_pages(encode_pages([1, 2, 3])) == [1, 2, 3]
    assert decode_pages(b"\x01\x02\x03") == []
    assert len(decode_pages(encode_pages(list(range(prefault.MAX_PAGES + 10))))) == (
        prefault.MAX_PAGES
    )
    assert decode_pages(b"\0" * 8 * (prefault.MAX_PAGES + 1)) == []


def _in_child(work: object) -> list[int]:
    """Run ``work`` (a callable returning page numbers) in a fork; its result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(w, encode_pages(work()))  # type: ignore[operator]
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return decode_pages(data)


def test_a_fork_sees_the_pages_it_copied_and_those_copied_ahead_are_not_seen_again() -> None:
    """In a fork, a page written after the watch began is reported as written; a page that
    populate() copied before the watch is not (it was copied ahead, as a standby does)."""
    area = mmap.mmap(-1, 8 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.write(b"x" * (8 * PAGE))  # present in the parent: a fork shares them
    base = ctypes.addressof(ctypes.c_char.from_buffer(area)) // PAGE

    def work() -> list[int]:
        prefault.populate([(base + 5, 1)])
        watch = PageWatch()
        area[2 * PAGE] = 1
        area[5 * PAGE] = 1
        return [page - base for page in watch.written() if base <= page < base + 8]

    assert _in_child(work) == [2]


def test_the_fork_server_merges_two_learners_then_learns_no_more() -> None:
    """Two learners' pages are merged into runs; a learner that sends nothing is forgotten
    (another learns instead); after LEARN_FROM jobs, no standby learns."""
    hot = HotPages()
    fds = []
    for pages in ([10, 11], None, [12, 40]):
        assert hot.wants_learner()
        r, w = os.pipe2(os.O_NONBLOCK)
        hot.add_learner(r, 100 + len(fds))
        assert (r, 100 + len(fds)) in hot.watched()
        if pages is not None:
            os.write(w, encode_pages(pages))
        os.close(w)
        hot.on_readable(r)  # the data (or the EOF)
        hot.on_readable(r)  # the EOF
        fds.append(r)
    assert hot.runs == [(10, 3), (40, 1)]
    assert hot.learned == prefault.LEARN_FROM
    assert not hot.wants_learner()
    assert hot.watched() == []
    for r in fds:
        try:
            os.fstat(r)
        except OSError:
            continue
        raise AssertionError("a learner's pipe was left open")
