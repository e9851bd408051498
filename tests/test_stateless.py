"""Matching a stateless client's history to the session that holds it, without a model."""

from chatrt.serve.stateless import Conversations
from chatrt.template import Message


def turns(*texts: str) -> list[Message]:
    return [Message(role="user" if n % 2 == 0 else "assistant", content=t) for n, t in enumerate(texts)]


def test_a_history_is_matched_to_the_session_holding_exactly_it_and_claimed_once():
    c = Conversations(capacity=8)
    c.give_back("s1", "sys", turns("hi", "hello"))
    assert c.claim("sys", turns("hi", "hello!")) is None  # one character off: no match
    assert c.claim("other", turns("hi", "hello")) is None  # another system prompt: no match
    assert c.claim("sys", turns("hi", "hello")) == "s1"
    assert c.claim("sys", turns("hi", "hello")) is None  # claimed: a second client forks a new session


def test_a_session_given_back_is_found_under_its_new_transcript_only():
    c = Conversations(capacity=8)
    c.give_back("s1", None, turns("a", "b"))
    assert c.claim(None, turns("a", "b")) == "s1"
    c.give_back("s1", None, turns("a", "b", "c", "d"))
    assert c.claim(None, turns("a", "b")) is None and c.claim(None, turns("a", "b", "c", "d")) == "s1"


def test_beyond_capacity_the_least_recently_used_are_handed_back_to_be_closed():
    c = Conversations(capacity=2)
    assert c.give_back("s1", None, turns("1", "x")) == []
    assert c.give_back("s2", None, turns("2", "x")) == []
    assert c.give_back("s3", None, turns("3", "x")) == ["s1"]
    assert len(c) == 2 and c.claim(None, turns("1", "x")) is None


def test_a_deleted_session_can_no_longer_be_claimed():
    c = Conversations(capacity=4)
    c.give_back("s1", None, turns("a", "b"))
    c.discard("s1")
    assert c.claim(None, turns("a", "b")) is None


def test_a_session_whose_transcript_a_newer_one_holds_too_is_handed_back_to_be_closed():
    """Two clients sent the same first message and got the same greedy reply: only one session can be found
    under that transcript, so the other would stay open, unclaimable, for ever."""
    c = Conversations(capacity=8)
    assert c.give_back("s1", None, turns("a", "b")) == []
    assert c.give_back("s2", None, turns("a", "b")) == ["s1"]
    assert c.give_back("s2", None, turns("a", "b")) == []  # given back again under the same: nothing to close
    assert c.claim(None, turns("a", "b")) == "s2" and len(c) == 0
