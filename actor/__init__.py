"""The actor daemon: a vLLM V1 engine that generates version-tagged rollouts for the broker."""
