"""The baseline the product is measured against: Postfix alone against a provider that blocks when pushed.

The provider accepts X messages/s, throttles above that, and after N
throttled attempts blocks for good (5xx). Postfix alone learns nothing from
the throttling replies: it retries at full speed, triggers the block and
bounces most of the mail. The figures are printed (pytest shows them even
with -q); what is asserted is the phenomenon, never a timing.
"""

import pytest

import scenario

MESSAGES = 300
RATE = 5.0  # X, messages/s the provider accepts
BLOCK_AFTER = 30  # throttled attempts that start the block


def run(loopback, capsys, **kw):
    with capsys.disabled():
        print()
        return scenario.provider_run(loopback, **kw)


def check_block_triggered(f, messages):
    assert f.injected == messages
    # Every message reached a final state or is still queued: nothing vanished.
    assert f.delivered + f.bounced + f.still_queued == messages
    # The provider's side and Postfix's side agree on what was delivered.
    assert f.sink["accepted"] == f.delivered
    # The phenomenon: throttled, then pushed into a block that bounced mail.
    assert f.sink["throttled"] >= BLOCK_AFTER
    assert f.sink["block_events"] >= 1
    assert f.sink["first_block"] >= f.sink["first_throttle"]
    assert f.bounced > 0 and f.sink["blocked"] > 0
    # The provider never accepted more than its rate allows in any one-second window.
    assert f.sink["peak_accepts_1s"] <= RATE


def test_baseline_postfix_alone_gmail(loopback, capsys):
    f = run(loopback, capsys, label="baseline: Postfix alone", profile="gmail", messages=MESSAGES, rate=RATE,
            block_after=BLOCK_AFTER, deadline=60)
    check_block_triggered(f, MESSAGES)
    # Most mail bounced: far less than X msg/s reached the provider over the run.
    assert f.delivered < MESSAGES / 2


@pytest.mark.parametrize("profile", ["yahoo", "microsoft"])
def test_baseline_postfix_alone_other_providers(loopback, capsys, profile):
    f = run(loopback, capsys, label="baseline: Postfix alone", profile=profile, messages=100, rate=RATE,
            block_after=BLOCK_AFTER, deadline=60)
    check_block_triggered(f, 100)


def test_baseline_throttle_at_end_of_data(loopback, capsys):
    f = run(loopback, capsys, label="baseline: Postfix alone, 421 after DATA", profile="gmail", messages=100,
            rate=RATE, block_after=BLOCK_AFTER, throttle_at="eod", deadline=60)
    check_block_triggered(f, 100)
