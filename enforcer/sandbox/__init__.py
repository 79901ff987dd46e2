"""The task sandbox: what the task may see and do besides the network."""
