"""The batches a worker has seen: each manifest read once (it never changes), and its submit
record until that says submitted (a batch still submitting may yet be aborted)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from farm.errors import NotFound
from farm.records import Manifest, Submit, SubmitState, read_manifest, read_submit


class Manifests:
    """The batches this worker has seen: each manifest read once (it never changes), and its
    submit record until that says submitted (a batch still submitting may yet be aborted)."""

    def __init__(self, store: Any, settings: Any, size: int = 256) -> None:
        self.store, self.settings, self.size = store, settings, size
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._submitted: set[str] = set()

    def get(self, batch: str) -> tuple[Manifest, Submit | None]:
        """The batch's manifest, and its submit record (None once known submitted)."""
        submit = None
        if batch not in self._submitted:
            found = read_submit(self.store, batch)
            if found is None:
                raise NotFound(f"batch {batch} has no submit record")
            submit = found[0]
        manifest = self._manifests.get(batch)
        if manifest is None:
            manifest = read_manifest(self.store, batch, self.settings)
            self._manifests[batch] = manifest
            while len(self._manifests) > self.size:
                self._submitted.discard(self._manifests.popitem(last=False)[0])
        else:
            self._manifests.move_to_end(batch)
        if submit is not None and submit.state is SubmitState.SUBMITTED:
            self._submitted.add(batch)
            submit = None
        return manifest, submit
