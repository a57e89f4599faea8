"""The DistributedFunction part of the store: checkpoints, numbered steps, fencing.

A mixin of `JobStore` (the one class that writes to ZODB): every method runs its operation
through the store's writer thread with `self._run`, like the rest of the store."""
from __future__ import annotations

from twisted.internet import defer

from dsage import errors
from dsage.job import FINAL
from dsage.server import scheduler
from dsage.server.model import FunctionRecord, Root, load_bytes, store_bytes


class FunctionOps:
    """Checkpoints of DistributedFunctions (mixed into JobStore)."""

    def function_start(self, owner: str, name: str, state: bytes, session: str) -> defer.Deferred:
        """Create a function's first checkpoint (a finished one of that name is replaced)."""
        return self._run(self._function_start, owner, name, state, session)

    def _function_start(self, root: Root, owner: str, name: str, state: bytes, session: str) -> dict:
        old = root.functions.get((owner, name))
        if old is not None and old.session == session:
            return {"name": name}            # a retry of this very start
        if old is not None and not old.done:
            raise errors.RemoteError(f"a function named {name!r} is still running: restore it, "
                                     f"or give the new one another name")
        fn = FunctionRecord(owner, name, store_bytes(state, self.blobs), self.now())
        fn.session = session
        root.functions[(owner, name)] = fn
        return {"name": name}

    def function_step(self, owner: str, name: str, session: str, step: int, state: bytes,
                      processed: list[int], specs: list[dict], done: bool,
                      limit: int | None = None) -> defer.Deferred:
        """One atomic checkpoint: results processed, new state, new jobs (and kills when done).

        Steps are numbered: a retry of the last step (its reply was lost) gets that step's
        reply again; a client whose function was restored elsewhere since is refused."""
        clean = [scheduler.validate_spec(s) for s in specs]
        return self._run(self._function_step, owner, name, session, step, state, processed, clean, done, limit)

    def _function_step(self, root: Root, owner: str, name: str, session: str, step: int, state: bytes,
                       processed: list[int], specs: list[dict], done: bool, limit: int | None = None) -> dict:
        fn = self._function(root, owner, "client", name)
        if fn.session != session:
            raise errors.RemoteError(f"function {name!r} was restored by another client since; "
                                     f"this one must stop")
        if step == fn.steps and step > 0:
            return {"job_ids": list(fn.last_ids), "killed": [], "running": []}
        if step != fn.steps + 1:
            raise errors.RemoteError(f"function {name!r}: step {step} out of order (last {fn.steps})")
        if fn.done and specs:
            raise errors.RemoteError(f"function {name!r} is already done: it takes no new jobs")
        for job_id in processed:
            if job_id in fn.jobs:
                fn.processed.add(job_id)
        fn.state = store_bytes(state, self.blobs)
        fn.updated = self.now()
        fn.steps = step
        ids = self._submit(root, owner, specs, name, None, limit) if specs else []
        fn.jobs.update(ids)
        fn.last_ids = tuple(ids)
        killed, running = [], []
        if done and not fn.done:
            fn.done = True
            for job_id in fn.jobs:
                if job_id not in fn.processed and root.jobs[job_id].status not in FINAL:
                    out = self._kill(root, owner, "client", job_id)
                    killed.append(out["job"])
                    if out["worker"]:
                        running.append(out["worker"])
        return {"job_ids": ids, "killed": killed, "running": running}

    def function_get(self, owner: str, role: str, name: str, attach: str | None = None) -> defer.Deferred:
        """A function's last checkpoint: state, its jobs and the ones processed.  With
        `attach`, that client session takes the function over (the previous one is fenced)."""
        return self._run(self._function_get, owner, role, name, attach)

    def _function_get(self, root: Root, owner: str, role: str, name: str, attach: str | None) -> dict:
        fn = self._function(root, owner, role, name)
        if attach is not None:
            if fn.owner != owner:
                raise errors.AuthError(f"the function {name!r} belongs to another user")
            fn.session = attach
        return {"name": fn.name, "owner": fn.owner, "state": load_bytes(fn.state), "jobs": list(fn.jobs),
                "processed": list(fn.processed), "done": fn.done, "created": fn.created,
                "updated": fn.updated, "steps": fn.steps}

    def _function(self, root: Root, owner: str, role: str, name: str) -> FunctionRecord:
        fn = root.functions.get((owner, name))
        if fn is not None:
            return fn
        others = [o for (o, n) in root.functions.keys() if n == name]
        if others and role == "admin":
            return root.functions[(others[0], name)]
        if others:
            raise errors.AuthError(f"the function {name!r} belongs to another user")
        raise errors.RemoteError(f"no distributed function named {name!r}")
