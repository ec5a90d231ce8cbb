"""The operator-facing parts of a worker, built from settings in one call: metrics, health and
the webhook sender. The lane reports events here; the ops server (processor/ops/server.py) and the
webhook receivers read the results.

Building checks the webhook settings together, so a worker with a webhook URL but no secret,
or an allowlist entry that is not a host pattern, stops at start with one readable message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from processor.errors import SettingsError
from processor.job.runner import JobOutcome, Verdict
from processor.ops.fetch_guard import Lookup, fetch_policy, parse_allowlist
from processor.ops.metrics import Health, Metrics
from processor.ops.webhooks import (
    Notifier,
    OnDone,
    RetryPolicy,
    Signer,
    WebhookPolicy,
)
from processor.settings import WorkerSettings, webhook_key

log = logging.getLogger("comfys3.ops")

# Storage must have worked this recently for /healthz to say ready. An idle worker lists the
# intake prefix every COMFYS3_POLL_MAX_INTERVAL seconds and a busy one renews leases, so two
# minutes of silence means storage is down, not that the worker is quiet.
STORAGE_WINDOW = 120.0


@dataclass
class Ops:
    metrics: Metrics
    health: Health
    policy: WebhookPolicy
    notifier: Notifier | None

    @classmethod
    def quiet(cls) -> Ops:
        """Counting into a registry nobody scrapes, and no webhooks: a worker in a test or a
        command that serves no metrics."""
        policy = WebhookPolicy(allow=(), allow_http=False, allow_private=False, default_url=None)
        return cls(Metrics(), Health(storage_window=STORAGE_WINDOW), policy, None)

    # -- webhooks ---------------------------------------------------------------------------

    def webhook_refusal(self, manifest_url: object) -> str | None:
        """Why a manifest's ``notify.url`` is refused (for its ManifestError), or None."""
        return self.policy.refusal(manifest_url, from_manifest=True)

    def notify(
        self, manifest_url: str | None, message_id: str, body: bytes, on_done: OnDone
    ) -> bool:
        """Send a finished job's status to its webhook, in the background. False when the job
        has no webhook (no manifest URL, no worker default) or webhooks are off."""
        url = self.policy.choose(manifest_url)
        if url is None or self.notifier is None:
            return False
        self.notifier.submit(url, message_id, body, on_done)
        return True

    # -- storage, for both health and metrics -----------------------------------------------

    def storage_ok(self) -> None:
        self.health.storage_ok()

    def storage_failed(self, operation: str, error: BaseException | str) -> None:
        self.metrics.storage_error(operation)
        self.health.storage_failed(str(error))

    # -- jobs -------------------------------------------------------------------------------

    def observe(self, outcome: JobOutcome) -> None:
        """One attempt's outcome into the metrics: attempts by outcome and error type, phase
        timings, ComfyUI's execution time, and the job count when the state is final."""
        status = outcome.status
        error_type = status.error.type if status.error is not None else None
        self.metrics.attempt_finished(outcome.verdict.value, error_type)
        if outcome.verdict is Verdict.skipped:
            self.metrics.job_finished("skipped", status.workflow)
            return
        self.metrics.job_phases(status.timings)
        if "execute" in status.timings:
            self.metrics.comfyui_executed(status.timings["execute"], status.workflow)
        if outcome.verdict in (Verdict.succeeded, Verdict.failed, Verdict.cancelled):
            self.metrics.job_finished(outcome.verdict.value, status.workflow)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self.notifier is not None:
            await self.notifier.start()

    async def aclose(self, timeout: float = 10.0) -> None:
        """Stop: webhooks still pending get ``timeout`` seconds, then are recorded abandoned."""
        self.health.stopping()
        if self.notifier is not None:
            await self.notifier.aclose(timeout)


def webhook_policy(settings: WorkerSettings) -> WebhookPolicy:
    """The URL policy from COMFYS3_WEBHOOK_* and the fetch guard's COMFYS3_FETCH_* (one policy
    for every outside fetch: the fetch opt-ins open webhooks too, and the webhook opt-ins
    still work for webhooks alone); SettingsError names what is wrong."""
    try:
        allow = parse_allowlist(settings.webhooks.allow)
    except ValueError as error:
        raise SettingsError(f"COMFYS3_WEBHOOK_ALLOW: {error}") from None
    fetch = fetch_policy(settings)
    policy = WebhookPolicy(
        allow=allow,
        allow_http=settings.webhooks.allow_http or settings.fetch.allow_http,
        allow_private=settings.webhooks.allow_private or settings.fetch.allow_private,
        default_url=settings.webhooks.url,
        fetch_hosts=fetch.allow_hosts,
    )
    if settings.webhooks.url is not None:
        refusal = policy.refusal(settings.webhooks.url, from_manifest=False)
        if refusal:
            raise SettingsError(f"COMFYS3_WEBHOOK_URL {refusal}")
    return policy


def build_ops(
    settings: WorkerSettings, *, lookup: Lookup | None = None, listing_interval: float = 0.0
) -> Ops:
    """Metrics, health and (when a webhook URL or allowlist is set) the webhook sender.

    ``listing_interval``: how long an idle worker may go without touching storage at all (with
    ``--events sqs``, its fallback listing): health allows for it, or an idle worker waiting
    for events would look unready between two listings.

    Call ``await ops.start()`` before submitting webhooks and ``await ops.aclose()`` before
    storage closes (a webhook's record is written to the status through storage).
    """
    policy = webhook_policy(settings)
    metrics = Metrics()
    quiet = max(3 * settings.triggers.poll_max_interval, 1.5 * listing_interval)
    health = Health(storage_window=max(STORAGE_WINDOW, quiet))
    metrics.watch_health(health)
    notifier = None
    if policy.default_url is not None or policy.allow:
        if settings.webhooks.secret is None:
            raise SettingsError(
                "COMFYS3_WEBHOOK_SECRET is required when COMFYS3_WEBHOOK_URL or "
                "COMFYS3_WEBHOOK_ALLOW is set: every webhook is signed"
            )
        notifier = Notifier(
            policy,
            Signer(webhook_key(settings.webhooks.secret.get_secret_value())),
            retry=RetryPolicy(
                attempts=settings.webhooks.attempts, timeout=settings.webhooks.timeout
            ),
            lookup=lookup,
            observe=metrics.webhook_result,
        )
    return Ops(metrics=metrics, health=health, policy=policy, notifier=notifier)
