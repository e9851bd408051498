"""Matching a stateless client's history to the session that holds it, without a model."""

from chatrt.serve.stateless import Conversations
from chatrt.template import Message


def turns(*texts: str) -> list[Message]:
    return [Message(role="user" if n % 2 == 0 else "assistant", content=t) for n, t in enumerate(texts)]


def test_a_history_is_matched_to_the_session_holding_exactly_it_and_claimed_once():
    c = Conversations(capacity=8)
    c.give_back("t", "s1", "sys", turns("hi", "hello"))
    assert c.claim("t", "sys", turns("hi", "hello!")) is None  # one character off: no match
    assert c.claim("t", "other", turns("hi", "hello")) is None  # another system prompt: no match
    assert c.claim("t", "sys", turns("hi", "hello")) == "s1"
    assert c.claim("t", "sys", turns("hi", "hello")) is None  # claimed: a second client forks a new session


def test_a_session_given_back_is_found_under_its_new_transcript_only():
    c = Conversations(capacity=8)
    c.give_back("t", "s1", None, turns("a", "b"))
    assert c.claim("t", None, turns("a", "b")) == "s1"
    c.give_back("t", "s1", None, turns("a", "b", "c", "d"))
    assert c.claim("t", None, turns("a", "b")) is None and c.claim("t", None, turns("a", "b", "c", "d")) == "s1"


def test_beyond_capacity_the_least_recently_used_are_handed_back_to_be_closed():
    c = Conversations(capacity=2)
    assert c.give_back("t", "s1", None, turns("1", "x")) == []
    assert c.give_back("t", "s2", None, turns("2", "x")) == []
    assert c.give_back("t", "s3", None, turns("3", "x")) == ["s1"]
    assert len(c) == 2 and c.claim("t", None, turns("1", "x")) is None


def test_a_deleted_session_can_no_longer_be_claimed():
    c = Conversations(capacity=4)
    c.give_back("t", "s1", None, turns("a", "b"))
    c.discard("s1")
    assert c.claim("t", None, turns("a", "b")) is None


def test_a_session_whose_transcript_a_newer_one_holds_too_is_handed_back_to_be_closed():
    """Two clients sent the same first message and got the same greedy reply: only one session can be found
    under that transcript, so the other would stay open, unclaimable, for ever."""
    c = Conversations(capacity=8)
    assert c.give_back("t", "s1", None, turns("a", "b")) == []
    assert c.give_back("t", "s2", None, turns("a", "b")) == ["s1"]
    assert c.give_back("t", "s2", None, turns("a", "b")) == []  # given back again under the same: nothing to close
    assert c.claim("t", None, turns("a", "b")) == "s2" and len(c) == 0


def test_a_conversation_is_matched_only_within_its_scope():
    """Two tenants (or two users of one tenant) sending the same history never share a session."""
    c = Conversations(capacity=8)
    c.give_back("acme", "s1", None, turns("a", "b"))
    assert c.claim("beta", None, turns("a", "b")) is None
    assert c.claim("acme", None, turns("a", "b")) == "s1"


def test_the_least_recently_used_idle_session_of_an_owner_is_reclaimed_for_a_new_one():
    c = Conversations(capacity=8)
    c.give_back("t", "acme.1", None, turns("a", "b"))
    c.give_back("t", "beta.1", None, turns("c", "d"))
    c.give_back("t", "acme.2", None, turns("e", "f"))
    assert c.reclaim(lambda sid: sid.startswith("beta.")) == "beta.1"
    assert c.reclaim(lambda sid: sid.startswith("acme.")) == "acme.1" and len(c) == 1
    assert c.reclaim(lambda sid: sid.startswith("beta.")) is None
