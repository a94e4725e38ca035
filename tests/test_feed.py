"""The worker's feed of held messages (pure, threads only): what is taken, when a message may be acked."""

from __future__ import annotations

import threading

from lorabatch.worker.feed import Feed, Message


def held(feed: Feed, *messages: Message) -> list[threading.Thread]:
    """Hold each message from its own thread, as Celery's threads do."""
    threads = [threading.Thread(target=feed.hold, args=(m,)) for m in messages]
    for t in threads:
        t.start()
        t.join()
    return threads


def test_a_message_is_done_once_every_reference_is_settled():
    """A message is acknowledged only when all its references were claimed or found unclaimable."""
    feed = Feed()
    a = Message("j1", "sft", [0, 1, 2])
    held(feed, a)
    taken = feed.take({"sft": 2})
    assert [idx for _, idx in taken] == [0, 1] and feed.held() == 3
    feed.settle(taken)
    assert not a.done.is_set(), "idx 2 is still pending"
    rest = feed.take({"sft": 5})
    assert not a.done.is_set(), "taken but not settled yet"
    feed.settle(rest)
    assert a.done.is_set() and feed.held() == 0


def test_take_follows_the_plan_per_adapter_and_message_order():
    feed = Feed()
    held(feed, Message("j1", "sft", [0, 1]), Message("j2", "dpo", [0]), Message("j3", "sft", [5, 6]))
    assert feed.waiting() == {"sft": 4, "dpo": 1}
    taken = feed.take({"sft": 3})
    assert [(m.job_id, idx) for m, idx in taken] == [("j1", 0), ("j1", 1), ("j3", 5)]
    assert feed.waiting() == {"sft": 1, "dpo": 1}


def test_suspects_are_not_admitted_with_ordinary_work():
    feed = Feed()
    suspect = Message("j1", "sft", [3, 4], suspect=1)
    held(feed, Message("j1", "sft", [0]), suspect)
    assert feed.waiting() == {"sft": 1}
    assert feed.next_suspect() is suspect
    assert [idx for _, idx in feed.take_message(suspect)] == [3, 4]
    assert feed.next_suspect() is None


def test_shutdown_gives_back_pending_and_refuses_new_messages():
    """give_back closes the feed: pending references are returned for republishing, late messages refused."""
    feed = Feed()
    a, b = Message("j1", "sft", [0, 1]), Message("j2", "sft", [7])
    held(feed, a, b)
    feed.settle(feed.take({"sft": 1}))
    back = feed.give_back()
    assert [(m.job_id, m.pending) for m in back] == [("j1", [1]), ("j2", [7])]
    assert feed.waiting() == {} and feed.take({"sft": 9}) == []
    feed.release(back, requeue=False)
    assert a.done.is_set() and b.done.is_set() and not a.requeue
    assert feed.hold(Message("j3", "sft", [1])) is False


def test_engine_failure_gives_back_everything_even_mid_claim():
    feed = Feed()
    a = Message("j1", "sft", [0, 1, 2])
    held(feed, a)
    feed.take({"sft": 2})  # being claimed when the engine broke: never settled
    back = feed.give_back(everything=True)
    assert [m.pending for m in back] == [[0, 1, 2]]
    feed.release(back, requeue=True)
    assert a.done.is_set() and a.requeue


def test_a_large_message_is_trimmed_to_what_the_worker_should_hold():
    """Big jobs send up to 256 references per message; the feed keeps about two batches, the rest goes back."""
    feed = Feed()
    small, big = Message("j1", "sft", list(range(10))), Message("j2", "sft", list(range(256)))
    held(feed, small, big)
    excess = feed.trim(big, 64)
    assert excess == list(range(54, 256)) and feed.held() == 64
    assert feed.trim(big, 64) == [], "nothing more to trim"
    feed.hold_more(big, excess[:2])
    assert feed.held() == 66
    feed.settle(feed.take({"sft": 66}))
    assert small.done.is_set() and big.done.is_set()


def test_a_large_message_arriving_at_a_full_feed_keeps_an_ordinary_share():
    """A feed already holding its two batches cuts a large message to an ordinary message's 16
    references, never to nothing (which re-enqueued the whole message in a busy loop)."""
    feed = Feed()
    full = [Message("j1", "sft", list(range(i * 16, i * 16 + 16))) for i in range(4)]
    big = Message("j2", "sft", list(range(200)))
    held(feed, *full, big)
    assert feed.held() == 264
    excess = feed.trim(big, 64)
    assert big.pending == list(range(16)) and excess == list(range(16, 200))
    assert not big.done.is_set(), "the message is still held for its 16 references"
    assert feed.trim(big, 64) == [], "a kept share is never cut again"
