"""Progress bars iterate what they count exactly once (a second pass over a DataLoader doubles its workers' work)."""

from __future__ import annotations

from vlkit.progress import progress


class CountingIterable:
    def __init__(self, n: int) -> None:
        self.n, self.passes = n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        self.passes += 1
        return iter(range(self.n))


def test_one_pass_whether_the_bar_shows_or_not(capsys):
    for show in (True, False):
        items = CountingIterable(5)
        assert list(progress(items, "counting", show)) == [0, 1, 2, 3, 4]
        assert items.passes == 1
    assert "counting" in capsys.readouterr().err  # the bar was drawn when asked


def test_a_bar_over_something_without_a_length():
    assert list(progress((i * i for i in range(4)), "squares", show=False)) == [0, 1, 4, 9]
