"""A job's webhook event and its delivery, as ``job.webhooks`` drives it: one event per job end,
delivered at least once, each attempt fenced by number. Mixed into ``StateStore``."""

from __future__ import annotations

import json

from lipfarm.common.state.guard import guarded
from lipfarm.common.state.records import WebhookRecord, redis_text

class WebhookVerbs:
    """Webhook delivery state (a part of ``StateStore``)."""

    # --- webhooks (common.webhooks): one event per job end, each attempt recorded --------------------

    def _webhook_call(self, name: str, job_id: str, *args) -> object:
        return self._scripts[name](keys=[self.keys.webhook(job_id), self.keys.webhook_attempts(job_id),
                                         self.keys.webhooks_due()],
                                   args=[redis_text(a) for a in (*args, job_id)])

    @guarded
    def open_webhook(self, job_id: str, *, event_id: str, event_type: str, url: str, now: float | None = None) -> bool:
        """Record the job's webhook event (replacing an earlier event of the job, e.g. before a resume);
        True if this very event was queued for delivery already."""
        now = self._at(now)
        return bool(self._webhook_call("webhook_open", job_id, event_id, event_type, url, now))

    @guarded
    def mark_webhook_queued(self, job_id: str, event_id: str, *, now: float | None = None) -> None:
        now = self._at(now)
        key = self.keys.webhook(job_id)
        if self.redis.hget(key, "event_id") == event_id:
            self.redis.hsetnx(key, "queued_at", repr(now))

    @guarded
    def begin_webhook_attempt(self, job_id: str, event_id: str, attempt: int, *, now: float | None = None,
                              stale_s: float) -> tuple[str, str]:
        """May attempt ``attempt`` of the event go now? ('ok', ''), ('skip', why) if it was made, the
        event delivered, given up or superseded, or ('busy', why) while another sender is at it."""
        now = self._at(now)
        verdict, detail = self._webhook_call("webhook_begin", job_id, event_id, attempt, now, stale_s)
        return str(verdict), str(detail)

    @guarded
    def end_webhook_attempt(self, job_id: str, event_id: str, attempt: int, *, now: float | None = None, outcome: str,
                            status: int, error: str, duration_s: float, next_at: float | None) -> None:
        """Record how an attempt went: ``outcome`` delivered, retry (at ``next_at``) or failed (given up)."""
        now = self._at(now)
        self._webhook_call("webhook_end", job_id, event_id, attempt, now, outcome, status, error[:500],
                           round(duration_s, 3), "" if next_at is None else next_at)

    @guarded
    def overdue_webhooks(self, *, now: float | None = None, grace_s: float) -> list[tuple[str, str, int]]:
        """Pending webhook events whose next attempt should have begun more than ``grace_s`` ago:
        (job id, event id, the attempt to make). Their delivery message was lost (or a sender died)."""
        now = self._at(now)
        overdue = []
        for job_id in self.redis.zrangebyscore(self.keys.webhooks_due(), "-inf", now - grace_s):
            record = self.webhook(job_id)
            if record is None or record.state != "pending":  # its record is gone: nothing to send
                self.redis.zrem(self.keys.webhooks_due(), job_id)
                continue
            overdue.append((job_id, record.event_id, record.attempts + 1))
        return overdue

    @guarded
    def webhook(self, job_id: str) -> WebhookRecord | None:
        """The job's webhook event and its delivery, or None if it has none (no URL, or not ended)."""
        data = self.redis.hgetall(self.keys.webhook(job_id))
        if not data:
            return None
        log = [json.loads(e) for e in self.redis.lrange(self.keys.webhook_attempts(job_id), 0, -1)]
        return WebhookRecord.from_hash(data, log)
