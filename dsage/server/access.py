"""Who may use the database: the identities (admins, clients, workers) that log in, and
the one server that holds a database others can reach too (ZEO, RelStorage).

A mixin of `JobStore` (the one class that writes to ZODB): every method runs its operation
through the store's writer thread with `self._run`, like the rest of the store."""
from __future__ import annotations

import os

from twisted.internet import defer

from dsage import errors
from dsage.server.model import Identity, Root


class Held(errors.DsageError):
    """The database is held by another live server."""


def _alive(pid: int) -> bool:
    """Whether a process of this host has that id."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


class AccessOps:
    """Identities, and the server's hold on the database."""

    # -- identities ------------------------------------------------------------------
    def add_identity(self, name: str, role: str, serial: int, force: bool = False) -> defer.Deferred:
        """Record an identity (a re-issue with `force`, or of a revoked one, replaces it)."""
        return self._run(self._add_identity, name, role, serial, force)

    def _add_identity(self, root: Root, name: str, role: str, serial: int, force: bool) -> dict:
        old = root.identities.get(name)
        if old is not None and not old.revoked and not force:
            raise errors.RemoteError(f"{name} already exists (revoke it first, or use --force to re-issue)")
        root.identities[name] = Identity(name, role, serial, self.now())
        return {"name": name, "role": role}

    def first_admin(self, name: str, serial: int) -> defer.Deferred:
        """Record an admin in a database that knows no identity yet (a new ZEO or PostgreSQL
        database named after `dsage init`); fires with whether it was recorded."""
        return self._run(self._first_admin, name, serial)

    def _first_admin(self, root: Root, name: str, serial: int) -> bool:
        if root.identities:
            return False
        root.identities[name] = Identity(name, "admin", serial, self.now())
        return True

    def revoke(self, name: str) -> defer.Deferred:
        """Mark an identity revoked: its certificate is refused from now on (a worker's
        running jobs are queued again, no failure counted)."""
        return self._run(self._revoke, name)

    def _revoke(self, root: Root, name: str) -> dict:
        ident = root.identities.get(name)
        if ident is None:
            raise errors.RemoteError(f"no user or worker named {name}")
        ident.revoked = True
        released = 0
        if ident.role == "worker":     # it will never report: its running jobs go back to the queue now
            held = [(job.job_id, job.attempt, job.lease) for job_id in list(root.status_ids("processing"))
                    if (job := root.jobs[job_id]).lease_worker == name]
            released = self._release(root, name, held, "revoked")
        return {"name": name, "role": ident.role, "released": released}

    def identities(self) -> defer.Deferred:
        """Every known identity as a dict."""
        return self._run(lambda root: [
            {"name": i.name, "role": i.role, "revoked": i.revoked, "created": i.created}
            for i in root.identities.values()])

    def authenticate(self, name: str, serial: int) -> defer.Deferred:
        """The role of a certificate, or AuthError if unknown, revoked or superseded."""
        return self._run(self._authenticate, name, serial)

    def _authenticate(self, root: Root, name: str, serial: int) -> str:
        ident = root.identities.get(name)
        if ident is None:
            raise errors.AuthError(f"unknown identity {name!r}")
        if ident.revoked:
            raise errors.AuthError(f"the certificate of {name!r} has been revoked")
        if ident.serial != serial:
            raise errors.AuthError(f"the certificate of {name!r} has been replaced by a newer one")
        return ident.role

    # -- the server that holds the database (ZEO, RelStorage) ----------------------------
    def hold(self, holder: dict, ttl: float) -> defer.Deferred:
        """Mark the database as held by this server (`holder`: host, boot, pid, token) for `ttl`
        seconds; hold it again before they pass.  `Held` if another live server holds
        it: a ZEO or PostgreSQL database can be reached by several, which would lease the
        same jobs.  (A FileStorage is locked by the one process that has it open.)"""
        return self._run(self._hold, holder, ttl)

    def _hold(self, root: Root, holder: dict, ttl: float) -> None:
        now = self.now()
        held = root.holder
        if held and held["token"] != holder["token"]:
            age, lasts = now - held["renewed"], held.get("ttl", ttl)      # the holder's own ttl
            here = all(held.get(k) == holder.get(k) for k in ("host", "boot"))
            gone = here and not _alive(held["pid"])
            if age < lasts and not gone:
                raise Held(
                    f"the database is in use by the dsage_server on {held['host']} (pid {held['pid']}, "
                    f"last seen {max(age, 0):.0f} s ago): two servers on one database would run the same "
                    f"jobs; stop that one first (if it is gone, its hold lapses within {lasts - age:.0f} s)")
        root.holder = dict(holder, renewed=now, ttl=ttl)

    def let_go(self, token: str) -> defer.Deferred:
        """Release the database held under `token` (a server that stops)."""
        return self._run(self._let_go, token)

    def _let_go(self, root: Root, token: str) -> None:
        if root.holder and root.holder["token"] == token:
            root.holder = None
