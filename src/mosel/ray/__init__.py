"""Scale a mosel model out as Ray Serve replicas, one mosel scheduler per replica.

Needs the ``ray`` extra (``pip install 'mosel[ray]'``); the rest of mosel never imports Ray.

::

    import mosel.ray
    from ray import serve

    app = mosel.ray.deployment(make_model, "av.profile.json", num_replicas=2)
    client = mosel.ray.Client(serve.run(app, name="av"))
    result = client.infer({"audio": a, "video": v}, deadline_ms=40.0, min_accuracy=0.72)

- Each replica builds its model with ``factory()``, attaches the saved profile (or profiles on
  its own device at start-up when ``profile`` is a function) and serves with its own online
  stage: the replica's scheduler sees every job routed to it.
- A :class:`Request` carries its SLO and the wall-clock time it was sent; the time it spent
  before reaching the replica (ingress, router, transport) is charged to its deadline, so the
  replica plans with the budget that is really left. A :class:`mosel.Result` comes back with
  ``completion_ms`` and ``queue_ms`` counted from the send and ``deadline_met`` against the
  caller's deadline.
- Errors: mosel's typed errors come back as the same types (:class:`Client` unwraps Ray's
  ``RayTaskError``); Serve's back-pressure (``max_queued_requests``) becomes
  :class:`mosel.QueueFullError`; a replica that dies under a job is retried on another while
  the deadline allows, then :class:`mosel.ReplicaError`. Every wait of :class:`Client` ends by
  the deadline plus its ``grace_ms`` (:class:`mosel.DeadlineError`), or ``timeout_s`` without
  one; a cancelled caller cancels its job, which leaves the replica's queue.
- Routing: :class:`SlackRequestRouter`, a Ray Serve ``RequestRouter`` that reads the
  :class:`mosel.Load` each replica reports (``record_routing_stats``) and lets
  :class:`mosel.routing.SlackRouter` pick the replica where the request is predicted to get
  the highest accuracy within its deadline; a replica without a fresh report gets bounded
  probe traffic; with no fresh statistics at all it falls back to Serve's power of two
  choices. :func:`http_ingress` puts an HTTP front door before the deployment whose requests
  the slack router places (Serve's proxy alone routes HTTP by Serve's own router).
- Monitoring: ``deployment(..., monitoring=mosel.Monitoring())`` watches each replica's accuracy;
  :meth:`Client.feedback` takes a job's labels back to the replica that served it (its result
  id's prefix names the replica's process, and the slack router routes by it).
- Autoscaling: replicas report mosel's own signals (``record_autoscaling_stats``), which
  :class:`DegradationPolicy`, a Serve custom autoscaling policy, turns into a replica count.

Clocks: deadlines cross processes as wall-clock (``time.time``) timestamps; across hosts they
are only as good as the hosts' clock synchronisation (NTP keeps it to a millisecond or so).
"""

from __future__ import annotations

from mosel.ray.autoscaling import DegradationPolicy, autoscaling_config
from mosel.ray.client import Client
from mosel.ray.deployment import ProfileSource, deployment
from mosel.ray.ingress import HTTPIngress, http_ingress
from mosel.ray.replica import MoselReplica
from mosel.ray.request import IDS_KEY, LOAD_KEY, Feedback, Request
from mosel.ray.router import SlackRequestRouter

__all__ = [
    "IDS_KEY",
    "LOAD_KEY",
    "Client",
    "DegradationPolicy",
    "Feedback",
    "HTTPIngress",
    "MoselReplica",
    "ProfileSource",
    "Request",
    "SlackRequestRouter",
    "autoscaling_config",
    "deployment",
    "http_ingress",
]
