"""The runtime every job shares, so that train/, eval/, capfilt/, serve/ and jobs/ do not each repeat it.

- `cluster`: Ray start-up (`init_ray`: --address, else RAY_ADDRESS, else a new local instance) and `free_port`.
- `cli`: the job command line (`job_parser`: --config, --set, --address, --json) and `cli_main`.
- `compute`: the actor-pool section of a batch job's config, its Ray resources, the device and dtype.
- `user_errors`: a UserError raised inside a Ray worker reaches the driver as the same one sentence.
- `files`: files that appear complete or not at all.

Nothing here imports Ray or torch at module level: a job's `--help` and its config errors stay fast.
"""
