<<<<<<< HEAD
"""The task sandbox: what the task may see and do besides the network."""
=======
"""The task sandbox's kernel-side locks: the syscall filter and the Landlock write ruleset."""
>>>>>>> h-seccomp
