"""The AMP commands between the supervisor and its worker processes [10], over the
supervisor's UNIX socket (C{<state_dir>/workers.sock}, mode 0600): the listening
sockets travel as file descriptors (L{amp.Descriptor}); structured values as JSON."""

from __future__ import annotations

from twisted.protocols import amp

from mailgw.admin.commands import JSON

# -- worker → supervisor --------------------------------------------------------------


class Hello(amp.Command):
    """A worker started: which one it is.  The supervisor sends it the listening
    sockets (L{AdoptListener}) before it answers whether to report its
    unauthenticated sessions (L{Track}) and the current TLS session-ticket key
    (L{mailgw.tlstickets}; absent when the supervisor rotates none)."""

    arguments = [(b"index", amp.Integer()), (b"pid", amp.Integer())]
    response = [(b"track", amp.Boolean()), (b"ticket_key", amp.String(optional=True))]


class Ready(amp.Command):
    """The worker serves: every listener it was given is adopted."""


class Claim(amp.Command):
    """A login (L{mailgw.proxy.directory.ISessionDirectory.claim}): C{session} is a
    L{mailgw.state.directory.DirectorySession} as JSON, C{local} the worker's logins
    of that user as pairs (client address, protocol)."""

    arguments = [(b"session", JSON()), (b"limit", amp.Integer()), (b"local", JSON())]


class Withdraw(amp.Command):
    arguments = [(b"session_id", amp.Unicode())]
    requiresAnswer = False


class Failed(amp.Command):
    """A login from C{ip} failed (the failure penalty [4.10])."""

    arguments = [(b"ip", amp.Unicode())]
    requiresAnswer = False


class Succeeded(amp.Command):
    arguments = [(b"ip", amp.Unicode())]
    requiresAnswer = False


class Delay(amp.Command):
    """The failure penalty of C{ip} by every worker's failures."""

    arguments = [(b"ip", amp.Unicode())]
    response = [(b"delay", amp.Float())]


class Pending(amp.Command):
    """Changes of the worker's non-authenticated sessions: C{["+", id, protocol,
    started, state]} (arrived or changed state), C{["-", id]} (logged in or gone)."""

    arguments = [(b"events", JSON())]
    requiresAnswer = False


# -- supervisor → worker --------------------------------------------------------------


class AdoptListener(amp.Command):
    """A listening socket for the listener C{key} (JSON) of the configuration."""

    arguments = [(b"key", amp.Unicode()), (b"fd", amp.Descriptor()), (b"family", amp.Integer())]


class Track(amp.Command):
    """Whether to report the non-authenticated sessions (some proxy has a limit)."""

    arguments = [(b"track", amp.Boolean())]


class TicketKey(amp.Command):
    """The TLS session-ticket key changed (a rotation): every worker's contexts take it,
    so a ticket one worker issued resumes on any other."""

    arguments = [(b"key", amp.String())]
    requiresAnswer = False


class Reload(amp.Command):
    """Load the configuration file C{path} again; answers its problems (JSON list)."""

    arguments = [(b"path", amp.Unicode())]
    response = [(b"problems", JSON())]


class Drain(amp.Command):
    """Stop gracefully: stop accepting, let logged-in sessions finish (up to the grace
    period), then exit."""


class Sessions(amp.Command):
    """The worker's live sessions (JSON list, as C{mailgwctl sessions} shows them)."""

    arguments = [(b"protocol", amp.Unicode(optional=True))]
    response = [(b"sessions", JSON())]


class Kill(amp.Command):
    """Log off C{session_id} if this worker holds it; answers it (JSON) or C{null}."""

    arguments = [(b"session_id", amp.Unicode()), (b"reason", amp.Unicode())]
    response = [(b"session", JSON())]


class Terminate(amp.Command):
    """Log off C{session_ids} (JSON list) for C{reason} (a limit across workers)."""

    arguments = [(b"session_ids", JSON()), (b"reason", amp.Unicode()), (b"cause", amp.Unicode())]
    requiresAnswer = False


class WorkerStatus(amp.Command):
    """The worker's own status (JSON): sessions by protocol and state, listeners."""

    response = [(b"status", JSON())]


class Flush(amp.Command):
    """C{mailgwctl aaa flush} in this worker's authentication cache [5.6]."""

    arguments = [(b"group", amp.Unicode(optional=True)), (b"user", amp.Unicode(optional=True))]
    response = [(b"flushed", amp.Integer())]


class MetricsText(amp.Command):
    """The worker's metrics in the Prometheus text format."""

    response = [(b"text", JSON())]
