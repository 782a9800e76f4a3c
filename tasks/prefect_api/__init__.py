"""The Prefect side that is not a task: a client for a busy server, the reuse of finished
simulations through Prefect's result store, secrets from Prefect blocks, and (in `internals`,
alone) every use of Prefect's private internals."""
