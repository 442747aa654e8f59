"""Hypothesis strategies for topic names and filters, shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

#: Levels chosen to collide often: empty levels, '$' at the start and inside.
SMALL_LEVELS = st.sampled_from(["a", "b", "", "$s", "a$"])


def topic_names(levels: st.SearchStrategy[str] = SMALL_LEVELS) -> st.SearchStrategy[str]:
    return st.lists(levels, min_size=1, max_size=4).map("/".join).filter(bool)


def topic_filters(levels: st.SearchStrategy[str] = SMALL_LEVELS) -> st.SearchStrategy[str]:
    @st.composite
    def build(draw) -> str:
        parts = draw(st.lists(st.one_of(levels, st.just("+")), max_size=4))
        if draw(st.booleans()):
            parts.append("#")
        return "/".join(parts) or "#"
    return build()
