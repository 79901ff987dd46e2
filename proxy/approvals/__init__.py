"""Human approvals (docs/approvals.md): `pending` is the pure core (the state table,
coalescing, scopes and grants); `holder` the adapter on the gateway's loop that holds
connections and requests while a human decides; `overlay` appends `always` grants to
approved.yaml."""
