"""Tasks: a prompt source plus a reward function, registered by name."""
