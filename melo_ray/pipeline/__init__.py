"""The Ray bulk-edit job: an edit stream (Ray Data), a trainer actor, an index actor, a snapshot store."""
