"""One measured run: a private Postfix against one provider sink, figures from both sides.

The baseline (Postfix alone) and the later run with the sidecar wired in use
the same function, so their printed figures compare like for like: pass the
sidecar's main.cf/master.cf text through ``configure``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import Any, Callable

import pfx
import sink


@dataclasses.dataclass
class RunFigures:
    label: str
    profile: str
    rate: float  # the provider's accepted messages/s (X)
    injected: int
    delivered: int  # final status "sent"
    bounced: int  # final status "bounced"
    still_queued: int  # messages left in the queue at the deadline
    deferred_attempts: int  # "status=deferred" lines for the provider's domain (any program)
    smtp_attempts: int  # delivery lines logged by the smtp client(s) for the domain
    elapsed: float  # injection start -> queue empty (or deadline)
    sink: dict[str, Any]  # the provider's own counts (sink.py stats)

    @property
    def accept_rate(self) -> float | None:
        """Messages/s the provider accepted between its first and last accept."""
        first, last = self.sink.get("first_accept"), self.sink.get("last_accept")
        if first is None or last is None or last <= first:
            return None
        return (self.sink["accepted"] - 1) / (last - first)

    @property
    def offered_rate(self) -> float | None:
        """Recipients/s the sender offered the provider (accepted or not) from first to last attempt."""
        first, last = self.sink.get("first_attempt"), self.sink.get("last_attempt")
        if first is None or last is None or last <= first:
            return None
        return (self.sink["attempts"] - 1) / (last - first)

    def summary(self) -> str:
        s = self.sink
        rate = self.accept_rate
        return (
            f"[{self.label}] provider={self.profile} X={self.rate:g}/s injected={self.injected} "
            f"delivered={self.delivered} bounced={self.bounced} still_queued={self.still_queued} "
            f"elapsed={self.elapsed:.1f}s deferred_attempts={self.deferred_attempts} "
            f"smtp_attempts={self.smtp_attempts} | sink: accepted={s['accepted']} throttled={s['throttled']} "
            f"blocked={s['blocked']} block_events={s['block_events']} first_throttle={s['first_throttle']} "
            f"first_block={s['first_block']} peak_1s={s['peak_accepts_1s']} "
            f"accept_rate={'%.2f/s' % rate if rate else 'n/a'} attempts={s['attempts']} "
            f"offered_rate={'%.1f/s' % self.offered_rate if self.offered_rate else 'n/a'} "
            f"attempt_span={s['first_attempt']}..{s['last_attempt']}s"
        )


def provider_run(
    loopback: pfx.Loopback,
    *,
    label: str,
    profile: str = "gmail",
    messages: int = 300,
    rate: float = 5.0,
    block_after: int = 30,
    block_duration: float = 600.0,
    throttle_at: str = "rcpt",
    deadline: float = 60.0,
    configure: Callable[[str, int], dict[str, Any]] | None = None,
    domain: str | None = None,
    inspect: Callable[[pfx.Postfix, sink.SinkProcess], None] | None = None,
    sink_params: dict[str, Any] | None = None,
) -> RunFigures:
    """Inject ``messages`` to one provider and wait for the queue to drain.

    configure(sink_host, sink_port) may return keyword arguments for
    :class:`pfx.Postfix` (main_cf_extra, master_cf_extra, main_cf, routes):
    the hook through which a sidecar's generated config is wired in.
    inspect(mta, provider) runs after the queue drained (or the deadline
    passed), before anything is torn down: the place for checks that need
    the maillog or the live sink. sink_params add to the provider listener's
    parameters (e.g. ``window``, ``burst``).
    """
    domain = domain or f"{profile}.test"
    listener = {
        "addr": f"{loopback.addr()}:0", "name": profile, "profile": profile, "rate": rate,
        "block_after": block_after, "block_duration": block_duration, "throttle_at": throttle_at,
        **(sink_params or {}),
    }
    with sink.SinkProcess([listener]) as provider:
        host, port = provider.addr(profile)
        kwargs: dict[str, Any] = {"routes": {domain: f"{host}:{port}"}}
        if configure:
            extra = configure(host, port)
            kwargs["routes"].update(extra.pop("routes", {}))
            kwargs.update(extra)
        with pfx.Postfix(smtpd_host=loopback.addr(), **kwargs) as mta:
            provider.reset()
            t0 = time.monotonic()
            result = mta.inject([f"user{i}@{domain}" for i in range(messages)])
            mta.wait_empty(max(0.0, deadline - (time.monotonic() - t0)))
            elapsed = time.monotonic() - t0
            finals = collections.Counter(mta.final_statuses(domain).values())
            lines = mta.deliveries(domain=domain)
            figures = RunFigures(
                label=label, profile=profile, rate=rate, injected=len(result.queued),
                delivered=finals["sent"], bounced=finals["bounced"], still_queued=mta.queue_files(),
                deferred_attempts=sum(1 for d in lines if d.status == "deferred"),
                smtp_attempts=sum(1 for d in lines if d.program == "smtp"),
                elapsed=elapsed, sink=provider.stats()["listeners"][profile],
            )
            if inspect:
                inspect(mta, provider)
    print(figures.summary())
    print(f"[{label}] provider accept histogram (s since reset -> accepted): "
          f"{json.dumps(figures.sink['accept_histogram'])}")
    return figures
