"""GPU leasing on Prefect global concurrency limits, one limit of 1 per GPU.

`pool` (the value the rest needs of the settings), `limits` (the limits on the server and
who holds them), `lease` (one slot: take, renew, give back), `broker` (which waiting beam
gets a GPU: `gpu_lease`), `wakeup` (releases heard as events), `handoff` (a lease handed
to a process on the same machine), `nvidia_smi` (GPUs in use by someone else).
"""
