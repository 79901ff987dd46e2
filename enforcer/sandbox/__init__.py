"""The task sandbox's kernel-side locks: the syscall filter and the Landlock write ruleset."""
